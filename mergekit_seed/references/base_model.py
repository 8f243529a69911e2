"""The base model of an adapter merge, read tensor by tensor.

An adapter merge needs the base's weights only where an adapter holds more than low-rank
factors: tensors PEFT saved whole (their delta is taken from the base's), trainable-token
rows, Conv1D layouts (``fan_in_fan_out``), and ``output.format: full``. Only the tensors
asked for are read (safetensors headers are indexed once).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Set

import torch
from huggingface_hub import try_to_load_from_cache

from mergekit_seed.errors import UserError
from mergekit_seed.reader import read_json, safetensors_file
from mergekit_seed.references.hub import local_folder
from mergekit_seed.references.weights import confined_glob, safetensors_index


# model_type of the transformers architectures with Conv1D layers (transformers 5: the models
# whose modeling file builds a Conv1D). PEFT treats those layers as fan_in_fan_out whatever
# the saved config says (its flag keeps the value set for the last layer it wrapped).
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "convbert", "omniasr"}
)


def cached_config(reference: str) -> Optional[dict]:
    """The base's ``config.json`` from a local folder or the Hub cache (never the network)."""
    path, within = Path(reference, "config.json"), Path(reference)
    if not path.is_file():
        try:
            found = try_to_load_from_cache(reference, "config.json")
        except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id either
            return None
        if not isinstance(found, str):
            return None
        path, within = Path(found), Path(found).parent
    try:
        config = read_json(path, "model config", within=within)
    except UserError:
        return None
    return config if isinstance(config, dict) else None


def has_conv1d_layers(reference: Optional[str]) -> bool:
    """Whether the base (when its config is on this machine) is an architecture with Conv1D layers."""
    config = cached_config(reference) if reference else None
    return bool(config) and config.get("model_type") in CONV1D_MODEL_TYPES


def locate_base(reference: str) -> Path:
    """A local model folder, or a Hub model's snapshot in (or downloaded to) the Hub cache."""
    try:
        folder = local_folder(reference)
    except UserError as error:
        raise UserError(f"base_model {error}") from None
    if not folder.is_dir():
        raise UserError(f"base_model {reference}: not a folder")
    return folder


class BaseWeights:
    """The safetensors weights of a base model folder, by tensor name.

    Not mergekit's ``LazyTensorLoader``: an adapter merge asks for shapes and for single rows
    (trainable tokens), which that loader can only give by reading whole tensors."""

    def __init__(self, reference: str):
        self.reference = reference
        self.folder = locate_base(reference)
        self.shards = confined_glob(self.folder, "*.safetensors")
        if not self.shards:
            raise UserError(f"base_model {reference}: no .safetensors weights found")

    @cached_property
    def _files(self) -> Dict[str, Path]:
        return {name: file for name, (file, _) in safetensors_index(self.shards).items()}

    def names(self) -> List[str]:
        """Every tensor name of the base's files."""
        return list(self._files)

    def _require(self, name: str, why: str) -> Path:
        if name not in self._files:
            raise UserError(
                f"base_model {self.reference}: has no tensor {name}, which {why}; give the base the seeds were "
                "trained from"
            )
        return self._files[name]

    def shape(self, name: str, why: str) -> tuple:
        """The shape of the base's ``name`` (from the file header)."""
        with safetensors_file(self._require(name, why), within=self.folder) as reader:
            return tuple(reader.get_slice(name).get_shape())

    def tensor(self, name: str, why: str) -> torch.Tensor:
        """The base's ``name`` as float32 (float64 stays float64)."""
        with safetensors_file(self._require(name, why), within=self.folder) as reader:
            tensor = reader.get_tensor(name)
        return tensor if tensor.dtype == torch.float64 else tensor.float()

    def rows(self, name: str, indices: List[int], why: str) -> torch.Tensor:
        """Rows ``indices`` of the 2-D base tensor ``name`` as float32, without reading the rest."""
        with safetensors_file(self._require(name, why), within=self.folder) as reader:
            view = reader.get_slice(name)
            rows = [view[index : index + 1] for index in indices]
        return torch.cat(rows).float() if rows else torch.zeros(0)

    def conv1d_weights(self) -> Set[str]:
        """Weights of the base's transformers ``Conv1D`` layers (stored (in, out), GPT-2 style).

        PEFT decides per layer whether a LoRA is ``fan_in_fan_out`` by its class, whatever the
        config says; the class comes from building the base's architecture on the meta device
        (no weights, no remote code).
        """
        import transformers
        from transformers import AutoConfig
        from transformers.pytorch_utils import Conv1D

        try:
            config = AutoConfig.from_pretrained(self.folder)
            architecture = (config.architectures or [None])[0]
            model_class = getattr(transformers, architecture or "", None)
            if model_class is None:
                raise ValueError(f"transformers has no architecture {architecture!r}")
            with torch.device("meta"):
                model = model_class(config)
        except Exception as error:  # transformers raises many types for configs it cannot build
            raise UserError(
                f"base_model {self.reference}: cannot tell which layers are Conv1D for these fan_in_fan_out "
                f"adapters ({str(error).splitlines()[0]})"
            ) from None
        return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}

"""Reading PEFT LoRA and SeRA adapter folders as factored deltas, and writing LoRA adapters.

Every adapter module becomes a :class:`~mergekit_seed.maths.linalg.LowRank` delta keyed by the base
weight it changes (``model.layers.0.self_attn.q_proj.weight``), in PyTorch (out, in) layout
for linear layers and (num_embeddings, dim) for embeddings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import Annotated, Literal

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.finite import is_finite_tensor
from mergekit_seed.maths.kernels.sera import sera_delta_factors
from mergekit_seed.maths.linalg import LowRank
from mergekit_seed.output import write_tensors, write_text
from mergekit_seed.reader import load_pickled_tensors, load_safetensors, read_json_object
from mergekit_seed.references.base_model import has_conv1d_layers
from mergekit_seed.references.hub import local_folder
from mergekit_seed.references.sera_files import CONFIG_NAME, KEY_PREFIX
from mergekit_seed.references.sera_layer import PEFT_TYPE as SERA_TYPE
from mergekit_seed.references.sera_layer import SeraConfig
from mergekit_seed.references.weights import confined_file, full_model_files, safetensors_index
from mergekit_seed.untrusted import names_module, pattern_key


SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
LINEAR, EMBEDDING, CONV1D = "linear", "embedding", "conv1d"


class LoraFolderConfig(BaseModel):
    """The fields of a PEFT LoRA ``adapter_config.json`` that define what its tensors mean."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(ge=1, strict=True)  # `r: true` is not a rank
    lora_alpha: float = Field(allow_inf_nan=False)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    alpha_pattern: Dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    base_model_name_or_path: Optional[str] = None
    task_type: Optional[str] = None
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    modules_to_save: Optional[List[str]] = None
    trainable_token_indices: Optional[Union[List[int], Dict[str, List[int]]]] = None
    target_parameters: Optional[List[str]] = None


# LoraConfig fields (peft 0.21) whose non-default value makes the adapter compute something a
# low-rank delta of the base's weights cannot hold, or that this reader cannot vouch for; each
# is refused in one line. tests/test_peft_inputs.py checks that every LoraConfig field is here,
# read by LoraFolderConfig, or listed in LORA_FIELDS_WITHOUT_EFFECT.
LORA_FIELDS_REFUSED = {
    "use_dora": "DoRA adapters rescale the weight's columns: not a low-rank delta",
    "alora_invocation_tokens": (
        "an activated LoRA (aLoRA) changes the model only after its invocation tokens appear; merged into "
        "weights it would act everywhere (PEFT refuses to merge aLoRA too)"
    ),
    "layer_replication": (
        "PEFT builds a deeper model by repeating base layers for this adapter; neither a LoRA output nor the "
        "base's tensors can hold that"
    ),
    "use_qalora": "QA-LoRA pools the layer's inputs before the LoRA product: not a low-rank delta of the weight",
    "arrow_config": "Arrow routes between several LoRA experts per token: not one delta",
    "kasa_config": "KaSA changes the base weights' singular values: not a delta from the original base",
    "lora_ga_config": (
        "LoRA-GA initialises from gradients and changes the base weights: not a delta from the original base"
    ),
    "monteclora_config": (
        "MonteCLoRA's adapter is a distribution, not one fixed delta; mergekit-seed cannot vouch for it"
    ),
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not read by mergekit-seed; its factors would be misread",
    "velora_config": "VeLoRA changes how the adapter is trained and run; mergekit-seed cannot vouch for it",
}
# fields that change nothing in what the saved tensors mean: metadata, training-time settings,
# and which modules the adapter covers (the saved tensors say that themselves)
LORA_FIELDS_WITHOUT_EFFECT = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "megatron_config",
    "megatron_core",
    "runtime_config",
    "eva_config",
    "corda_config",
    "loftq_config",
    "qalora_group_size",
    "ensure_weight_tying",
    # fields of older PEFT releases' LoraConfig, gone since, that changed nothing the tensors mean
    "enable_lora",
    "merge_weights",
)


def _unclassified_field(config: dict) -> Optional[str]:
    """The first field of an adapter config that is neither read, refused nor known to change
    nothing: a newer PEFT's option, which might change what the tensors mean."""
    known = set(LoraFolderConfig.model_fields) | set(LORA_FIELDS_REFUSED) | set(LORA_FIELDS_WITHOUT_EFFECT)
    return next((name for name in config if name not in known), None)


def _peft_version() -> str:
    try:
        return version("peft")
    except PackageNotFoundError:
        return "(not installed)"


def _refused_field_problem(config: dict) -> Optional[str]:
    for name, reason in LORA_FIELDS_REFUSED.items():
        value = config.get(name)
        if value not in (None, False, [], {}, ""):
            return f"{name} {json.dumps(value)[:60]}: {reason}; it is refused, and so is a merge through checkpoints"
    return None


@dataclass
class TokenRows:
    """PEFT trainable tokens of one embedding: the rows ``indices`` of the weight are replaced
    by ``values`` (k, dim) (PEFT's ``trainable_tokens_delta`` holds new rows, not differences)."""

    indices: List[int]
    values: torch.Tensor


@dataclass
class AdapterSeed:
    """One seed, every tensor of its file by role, keyed by the base tensor it changes.

    - ``deltas``: low-rank deltas ``left @ right`` of weights, in PEFT's orientation
      (out, in) for linear and Conv1D layers, (num_embeddings, dim) for embeddings;
      ``module_kinds`` says which (:func:`AdapterSeed.in_base_layout` turns Conv1D modules
      into the base's stored (in, out) layout);
    - ``bias_deltas``: ``lora_bias`` deltas (scaling * lora_B.bias) of biases, (out,);
    - ``whole``: tensors PEFT saved whole (``modules_to_save`` modules, trained biases with
      ``bias: all``/``lora_only``, embedding layers saved with the adapter): new values;
    - ``token_rows``: trainable tokens of embedding weights.
    """

    path: Path
    kind: str
    base_model: Optional[str]
    deltas: Dict[str, LowRank]
    module_kinds: Dict[str, str] = field(default_factory=dict)
    task_type: Optional[str] = None
    bias_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)
    whole: Dict[str, torch.Tensor] = field(default_factory=dict)
    token_rows: Dict[str, TokenRows] = field(default_factory=dict)
    modules_to_save: List[str] = field(default_factory=list)
    token_indices_by_module: bool = False  # trainable_token_indices given as {module: indices}
    fan_in_fan_out: bool = False
    # LoRA on parameters (PEFT's ``target_parameters``, e.g. an MoE router's ``mlp.gate.weight``)
    target_parameters: List[str] = field(default_factory=list)

    def tensor_names(self) -> List[str]:
        return sorted(set(self.deltas) | set(self.bias_deltas) | set(self.whole) | set(self.token_rows))

    def shapes(self) -> Dict[str, tuple]:
        """The shape of every base tensor this seed changes, in the base's stored layout. A
        weight saved whole whose shape is not its LoRA delta's is refused: one of the two would
        otherwise hide the other's mismatch with the base."""
        shapes = {name: tuple(delta.shape) for name, delta in self.deltas.items()}
        for name, tensor in {**self.bias_deltas, **self.whole}.items():
            if name in shapes and shapes[name] != tuple(tensor.shape):
                raise UserError(
                    f"{self.path}: {name} is saved whole with shape {tuple(tensor.shape)} but its LoRA delta has "
                    "shape "
                    f"{shapes[name]}; the adapter does not fit together (re-save it)"
                )
            shapes[name] = tuple(tensor.shape)
        return shapes

    def in_base_layout(self, conv1d_weights: Iterable[str]) -> "AdapterSeed":
        """This seed with the deltas of Conv1D weights (GPT-2's ``c_attn``, ...) transposed to
        the (in, out) layout the base stores them in, so that every delta has its weight's shape."""
        conv1d = set(conv1d_weights) & set(self.deltas)
        deltas = dict(self.deltas)
        kinds = dict(self.module_kinds)
        for name in conv1d:
            if kinds.get(name) == CONV1D:
                continue
            pair = deltas[name]
            deltas[name] = LowRank(pair.right.T, pair.left.T)
            kinds[name] = CONV1D
        return replace(self, deltas=deltas, module_kinds=kinds)


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT LoRA or SeRA adapter folder: it has an ``adapter_config.json`` and no full-model
    weights. A folder with both (an adapter saved next to the model merged from it) is a full
    model, as mergekit reads it (:func:`holds_model_and_adapter` tells them apart)."""
    return Path(path, CONFIG_NAME).is_file() and not full_model_files(Path(path))


def holds_model_and_adapter(path: str | Path) -> bool:
    """A full model folder that also holds an adapter config (merged as the full model)."""
    return Path(path, CONFIG_NAME).is_file() and bool(full_model_files(Path(path)))


def peft_type(config: dict) -> str:
    """An adapter config's ``peft_type``, upper case (``LORA`` when it names none, as PEFT's
    LoRA configs written before the field existed)."""
    return str(config.get("peft_type", "LORA")).upper()


def read_adapter_config(folder: Path) -> dict:
    """The JSON object of an adapter folder's ``adapter_config.json`` (bounded, read from inside
    the folder); one line naming the file when it is missing or malformed."""
    config_path = confined_file(folder, CONFIG_NAME)
    if not config_path.exists():
        raise UserError(f"{folder}: not an adapter folder ({CONFIG_NAME} is missing)")
    return read_json_object(config_path, "adapter config (the adapter's settings)", within=folder)


def _read_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors, or a ``.bin`` read with ``weights_only=True`` only."""
    safetensors_path = confined_file(folder, SAFETENSORS_NAME)
    if safetensors_path.exists():
        return load_safetensors(safetensors_path, folder)
    bin_path = confined_file(folder, BIN_NAME)
    if bin_path.exists():
        return load_pickled_tensors(bin_path, folder)
    raise UserError(f"{folder}: no {SAFETENSORS_NAME} (or {BIN_NAME}) with the adapter weights")


def _check_finite(folder: Path, tensors: Dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not is_finite_tensor(tensor):
            raise UserError(f"{folder}: tensor {key} contains NaN or Inf; this adapter cannot be merged")


def _field_error(path: Path, error: ValidationError) -> UserError:
    location, message = first_validation_problem(error)
    return UserError(f"{path / CONFIG_NAME}: field '{location}': {message}")


def _pattern_value(patterns: Dict, module: str, default, where: str):
    """The value of ``module``'s key in ``patterns`` (PEFT's ``rank_pattern`` rule), else ``default``."""
    key = pattern_key(patterns, module, where) if patterns else None
    return default if key is None else patterns[key]


def _strip_prefix(key: str) -> str:
    return key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key


def _saved_whole(name: str, modules_to_save: Iterable[str]) -> bool:
    """Whether tensor ``name`` belongs to a module PEFT saves whole: one whose name is an
    entry of ``modules_to_save`` or ends with ``.entry`` (PEFT's own matching rule)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts))]
    return any(names_module(prefix, entry) for prefix in prefixes for entry in modules_to_save)


def _token_indices(lora: LoraFolderConfig, module: str) -> Optional[List[int]]:
    """The trainable token indices PEFT gave embedding ``module``, or None."""
    indices = lora.trainable_token_indices
    if isinstance(indices, dict):
        for target, values in indices.items():
            if names_module(module, target):
                return list(values)
        return None
    return list(indices) if indices is not None else None


# the roles a tensor of a PEFT LoRA file can have, by the key it is saved under
LORA_A, LORA_B, BIAS_DELTA, EMBEDDING_A, EMBEDDING_B, TOKENS, WHOLE = (
    "lora_A",
    "lora_B",
    "bias_delta",
    "lora_embedding_A",
    "lora_embedding_B",
    "tokens",
    "whole",
)
_ROLE_SUFFIXES = (
    (".lora_A.weight", LORA_A, ".weight"),
    (".lora_B.weight", LORA_B, ".weight"),
    (".lora_B.bias", BIAS_DELTA, ".bias"),
    (".lora_embedding_A", EMBEDDING_A, ".weight"),
    (".lora_embedding_B", EMBEDDING_B, ".weight"),
    (".token_adapter.trainable_tokens_delta", TOKENS, ".weight"),
)


def lora_key_role(key: str, modules_to_save: Iterable[str], bias: str) -> Tuple[Optional[str], str]:
    """(role, the base tensor it changes) of a key of a PEFT LoRA file; role None: no known role.
    Decided from the key and the config alone, so file headers suffice."""
    name = _strip_prefix(key)
    for suffix, role, target in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return role, name[: -len(suffix)] + target
    if ".base_layer." in name:  # a tensor of the layer a LoRA wraps, saved whole (trained bias, saved embedding)
        return WHOLE, name.replace(".base_layer.", ".")
    if _saved_whole(name, modules_to_save) or (name.endswith(".bias") and bias != "none"):
        return WHOLE, name
    return None, name


UNKNOWN_KEY_HINT = (
    "it is not a LoRA factor, a saved module, a bias or a trainable token, and nothing is dropped "
    "silently; remove it if it is not part of the fine-tune, or merge through checkpoints "
    "(model: BASE+ADAPTER)"
)


# LoRA initialisations that change the base weights at init (PEFT subtracts the initial
# adapter from them): an adapter saved without PEFT's conversion is relative to that changed base
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq")


def modified_base_problem(init_lora_weights: Any) -> Optional[str]:
    """Why an adapter saved with this ``init_lora_weights`` is not a delta from the original
    base (PiSSA, OLoRA, CorDA, LoftQ, unconverted), or None. PEFT's conversion saves the
    converted adapter with ``init_lora_weights: true``."""
    init = init_lora_weights.lower() if isinstance(init_lora_weights, str) else ""
    kind = next((name for name in MODIFIED_BASE_INITS if init.startswith(name)), None)
    if kind is None:
        return None
    return (
        f"init_lora_weights {init_lora_weights!r}: this adapter is relative to a base that PEFT changed when it "
        f"initialised the adapter ({kind}), so merged onto the original base it is wrong; convert it as PEFT "
        "documents, "
        "save_pretrained(DIR, path_initial_model_for_weight_conversion=INITIAL_ADAPTER_DIR) (or "
        "convert_pissa_to_lora/convert_mutated_to_lora), and merge the converted adapter"
    )


def folder_modified_base_problem(folder: Path) -> Optional[str]:
    """:func:`modified_base_problem` of an adapter folder's config, naming the file; None when
    the config cannot be read (whoever reads the adapter reports that)."""
    try:
        config = read_adapter_config(folder)
    except UserError:
        return None
    problem = modified_base_problem(config.get("init_lora_weights"))
    return f"{folder / CONFIG_NAME}: {problem}" if problem else None


def _checked_lora_config(folder: Path, config: dict) -> LoraFolderConfig:
    """The adapter's ``LoraConfig`` fields checked by type, refusing what no delta expresses
    (DoRA, refused fields, LoRA on parameters that are not a layer's weight, a modified base)."""
    try:
        lora = LoraFolderConfig.model_validate(config)
    except ValidationError as error:
        raise _field_error(folder, error) from None
    if lora.use_dora:
        raise UserError(
            f"{folder / CONFIG_NAME}: DoRA adapters (use_dora) are not a low-rank delta; merge them with model: "
            "BASE+ADAPTER"
        )
    problem = _refused_field_problem(config)
    if problem:
        raise UserError(f"{folder / CONFIG_NAME}: {problem}")
    unknown = _unclassified_field(config)
    if unknown is not None:
        raise UserError(
            f"{folder / CONFIG_NAME}: field {unknown!r} is not a LoraConfig field of the PEFT releases mergekit-seed "
            f"knows (it reads peft {_peft_version()}'s); it may change what the tensors mean, so the adapter is "
            "refused: save it with a PEFT release mergekit-seed supports, or merge through checkpoints "
            "(model: BASE+ADAPTER)"
        )
    for target in lora.target_parameters or []:
        if target.rsplit(".", 1)[-1] != "weight":
            raise UserError(
                f"{folder / CONFIG_NAME}: target_parameters {target!r}: a LoRA on a parameter that is not a layer's "
                "weight "
                "(such as MoE experts' 3-D gate_up_proj) is not a delta this reader can place; train the seeds "
                "without it "
                "(attention and router LoRAs merge), or materialise each seed with PEFT's merge_and_unload() and "
                "merge "
                "those checkpoints with mergekit-seed run (the full route)"
            )
    problem = modified_base_problem(lora.init_lora_weights)
    if problem:
        raise UserError(f"{folder / CONFIG_NAME}: {problem}")
    return lora


class _LoraTensors:
    """One LoRA file's tensors placed into an :class:`AdapterSeed` by role, with PEFT's scaling
    (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; ``rank_pattern``/``alpha_pattern`` per module)."""

    def __init__(self, folder: Path, lora: LoraFolderConfig, tensors: Dict[str, torch.Tensor], seed: AdapterSeed):
        self.folder, self.lora, self.tensors, self.seed = folder, lora, tensors, seed
        self.file = folder / SAFETENSORS_NAME

    def rank(self, module: str) -> int:
        return _pattern_value(
            self.lora.rank_pattern, module, self.lora.r, f"{self.folder / CONFIG_NAME}: rank_pattern"
        )

    def scaling(self, module: str) -> float:
        r = self.rank(module)
        alpha = _pattern_value(
            self.lora.alpha_pattern, module, self.lora.lora_alpha, f"{self.folder / CONFIG_NAME}: alpha_pattern"
        )
        return alpha / math.sqrt(r) if self.lora.use_rslora else alpha / r

    def partner(self, key: str, suffix: str, other: str) -> torch.Tensor:
        tensor = self.tensors.get(key[: -len(suffix)] + other)
        if tensor is None:
            raise UserError(f"{self.file}: {key} has no matching {other[1:]}")
        return tensor.float()

    def _check_rank(self, key: str, found: int, module: str) -> None:
        rank = self.rank(module)
        if found != rank:
            raise UserError(
                f"{self.file}: {key} has rank {found} but {CONFIG_NAME} says {rank} for {module} (r, rank_pattern); "
                "the scaling would be wrong, and PEFT refuses to load it: re-save the adapter"
            )

    def add_linear(self, key: str, tensor: torch.Tensor, module: str) -> None:
        A, B = tensor.float(), self.partner(key, ".lora_A.weight", ".lora_B.weight")
        if A.dim() == 2:
            self._check_rank(key, A.shape[0], module)
        if A.dim() != 2 or B.dim() != 2:
            raise UserError(
                f"{self.file}: {key} is a LoRA on a convolution layer ({A.dim()}-D factors), which cannot be merged "
                "here; merge through checkpoints (model: BASE+ADAPTER)"
            )
        if A.shape[0] != B.shape[1]:
            raise UserError(
                f"{self.file}: {key} has {A.shape[0]} rows but its lora_B has {B.shape[1]} columns; the factors do "
                "not fit together (re-save the adapter)"
            )
        self.seed.deltas[f"{module}.weight"] = LowRank(self.scaling(module) * B, A)  # scaling * B A, (out, in)
        self.seed.module_kinds[f"{module}.weight"] = LINEAR

    def add_embedding(self, key: str, tensor: torch.Tensor, module: str) -> None:
        B = self.partner(key, ".lora_embedding_A", ".lora_embedding_B")
        if tensor.dim() != 2 or B.dim() != 2 or tensor.shape[0] != B.shape[1]:
            raise UserError(
                f"{self.file}: {key} {tuple(tensor.shape)} and its lora_embedding_B {tuple(B.shape)} do not fit "
                "together (re-save the adapter)"
            )
        self._check_rank(key, tensor.shape[0], module)
        # weight (num_embeddings, dim) += scaling * (B A)^T
        self.seed.deltas[f"{module}.weight"] = LowRank(tensor.float().T, self.scaling(module) * B.T)
        self.seed.module_kinds[f"{module}.weight"] = EMBEDDING

    def add_tokens(self, key: str, tensor: torch.Tensor, module: str) -> None:
        indices = _token_indices(self.lora, module)
        if indices is None or len(indices) != tensor.shape[0] or tensor.dim() != 2:
            raise UserError(
                f"{self.file}: {key} holds {tensor.shape[0]} token rows but trainable_token_indices in "
                f"{CONFIG_NAME} gives {'none' if indices is None else len(indices)} for {module}"
            )
        self.seed.token_rows[f"{module}.weight"] = TokenRows(indices, tensor.float())

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Place one tensor by its role (:func:`lora_key_role`), or refuse it."""
        role, target = lora_key_role(key, self.seed.modules_to_save, self.lora.bias)
        module = target.rsplit(".", 1)[0]
        if role in (LORA_A, LORA_B, EMBEDDING_A, EMBEDDING_B, BIAS_DELTA) and not tensor.is_floating_point():
            raise UserError(
                f"{self.file}: {key} is {str(tensor.dtype).replace('torch.', '')}: LoRA factors are floating point "
                "(PEFT refuses to load this adapter too); save the adapter unquantized"
            )
        if role == LORA_A:
            self.add_linear(key, tensor, module)
        elif role == LORA_B:
            self.partner(key, ".lora_B.weight", ".lora_A.weight")
        elif role == BIAS_DELTA:
            self.seed.bias_deltas[f"{module}.bias"] = (
                self.scaling(module) * tensor.float()
            )  # added to the output like B A x
        elif role == EMBEDDING_A:
            self.add_embedding(key, tensor, module)
        elif role == EMBEDDING_B:
            self.partner(key, ".lora_embedding_B", ".lora_embedding_A")
        elif role == TOKENS:
            self.add_tokens(key, tensor, module)
        elif role == WHOLE:
            self.seed.whole[target] = tensor.float()
        else:
            raise UserError(f"{self.file}: tensor {key} has no known role: {UNKNOWN_KEY_HINT}")


def read_lora(folder: Path, config: dict) -> AdapterSeed:
    """Read a PEFT LoRA folder; every tensor of its file gets a role or the folder is refused."""
    lora = _checked_lora_config(folder, config)
    tensors = _read_tensors(folder)
    _check_finite(folder, tensors)
    seed = AdapterSeed(
        folder,
        "lora",
        lora.base_model_name_or_path,
        {},
        task_type=lora.task_type,
        modules_to_save=list(lora.modules_to_save or []),
        token_indices_by_module=isinstance(lora.trainable_token_indices, dict),
        fan_in_fan_out=lora.fan_in_fan_out,
    )
    placer = _LoraTensors(folder, lora, tensors, seed)
    for key, tensor in tensors.items():
        placer.add(key, tensor)
    seed.target_parameters = list(lora.target_parameters or [])
    file = folder / SAFETENSORS_NAME
    for name in set(seed.token_rows) & set(seed.deltas):
        raise UserError(
            f"{file}: {name} has both a LoRA and trainable tokens; merge through checkpoints (model: BASE+ADAPTER)"
        )
    if not (seed.deltas or seed.whole or seed.token_rows or seed.bias_deltas):
        raise UserError(f"{file}: no LoRA tensors found")
    return seed


def read_sera(folder: Path, config: dict) -> AdapterSeed:
    try:
        sera = SeraConfig.model_validate(config)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(f"{folder / CONFIG_NAME}: {location or 'config'}: {message}") from None
    tensors = _read_tensors(folder)
    _check_finite(folder, tensors)
    deltas: Dict[str, LowRank] = {}
    for key in tensors:
        if not key.endswith((".sera_A", ".sera_B", ".sera_C")):
            raise UserError(f"{folder / SAFETENSORS_NAME}: tensor {key} has no known role: {UNKNOWN_KEY_HINT}")
    for key in tensors:
        if key.endswith((".sera_B", ".sera_C")) and key[: -len(".sera_B")] + ".sera_A" not in tensors:
            raise UserError(f"{folder / SAFETENSORS_NAME}: {key} has no matching sera_A")
    for key, A in tensors.items():
        if not key.endswith(".sera_A"):
            continue
        module_key = key[: -len(".sera_A")]
        C, B = tensors.get(module_key + ".sera_C"), tensors.get(module_key + ".sera_B")
        if C is None or B is None:
            raise UserError(f"{folder / SAFETENSORS_NAME}: {key} has no matching sera_C/sera_B")
        expected_A = (sera.split, A.shape[1], sera.r // sera.split)
        if (
            tuple(A.shape) != expected_A
            or tuple(C.shape) != (sera.r, sera.r)
            or B.shape[:2] != (sera.split, sera.r // sera.split)
        ):
            raise UserError(
                f"{folder / SAFETENSORS_NAME}: {module_key} has shapes A {tuple(A.shape)}, C {tuple(C.shape)}, "
                f"B {tuple(B.shape)}, which do not match r={sera.r}, split={sera.split}"
            )
        module = module_key[len(KEY_PREFIX) :] if module_key.startswith(KEY_PREFIX) else module_key
        left, right = sera_delta_factors(A.float(), C.float(), B.float(), sera.scaling)
        deltas[f"{module}.weight"] = LowRank(left, right)
    if not deltas:
        raise UserError(f"{folder / SAFETENSORS_NAME}: no sera_A/sera_C/sera_B tensors found")
    kinds = dict.fromkeys(deltas, LINEAR)
    return AdapterSeed(folder, "sera", sera.base_model_name_or_path, deltas, kinds)


def _roles_from_headers(folder: Path) -> Tuple[bool, Dict[Optional[str], set]]:
    """(fan_in_fan_out, {role: the base tensors it changes}) of an adapter folder, from its config
    and the keys of its weight file (a safetensors header; a ``.bin`` is read with
    ``weights_only=True``, it has no header)."""
    config = read_adapter_config(folder)
    if peft_type(config) == SERA_TYPE:
        return False, {}  # SeRA adapters hold factors only
    if os.path.lexists(folder / SAFETENSORS_NAME):
        keys = list(safetensors_index([confined_file(folder, SAFETENSORS_NAME)]))
    else:
        keys = list(_read_tensors(folder))
    roles: Dict[Optional[str], set] = {}
    modules_to_save, bias = config.get("modules_to_save") or [], config.get("bias", "none")
    for key in keys:
        role, target = lora_key_role(key, modules_to_save if isinstance(modules_to_save, list) else [], bias)
        roles.setdefault(role, set()).add(target)
    return bool(config.get("fan_in_fan_out")), roles


def saved_whole_everywhere(name: str, seeds: Iterable[Tuple[Iterable[str], Iterable[str]]]) -> bool:
    """Whether every seed, given as (tensors it saves whole, tensors its deltas change), saves
    ``name`` whole and changes it no other way: a base-free method then needs no base value."""
    return all(name in whole and name not in changed for whole, changed in seeds)


def why_base_is_read(
    folders: Iterable[Union[str, Path]], needs_base: bool, output_format: str, base_model: Optional[str]
) -> Optional[str]:
    """Why merging these adapter folders reads the base model's weights, or None when the
    adapters suffice: the one answer the adapter engine acts on and the model card records.

    The base is read for a full output, for Conv1D layers (``fan_in_fan_out``, or a base whose
    architecture has them), for trainable tokens, and for tensors saved whole, unless the method
    needs no base (``needs_base`` false: ``lore``) and every seed saves the tensor whole with
    nothing else changing it. From configs and file headers; folders that are not on this
    machine (Hub ids not downloaded yet) are skipped.
    """
    if output_format == "full":
        return "output.format: full"
    if has_conv1d_layers(base_model):
        return f"base_model {base_model} has Conv1D layers (their deltas are stored (in, out))"
    roles = []
    for folder in (Path(folder) for folder in folders):
        if not folder.is_dir():
            continue
        fan_in_fan_out, found = _roles_from_headers(folder)
        if fan_in_fan_out:
            return f"{folder} is fan_in_fan_out (Conv1D layers)"
        if found.get(TOKENS):
            return f"{folder} has trainable tokens (their delta is taken from the base's rows)"
        roles.append(found)
    seeds = [
        (found.get(WHOLE, set()), set().union(*(found.get(role, set()) for role in (LORA_A, EMBEDDING_A, BIAS_DELTA))))
        for found in roles
    ]
    for name in sorted(set().union(*(whole for whole, _ in seeds))):
        if needs_base or not saved_whole_everywhere(name, seeds):
            return f"{name} is saved whole by the adapters (its delta is taken from the base's)"
    return None


def locate_adapter(path: str | Path) -> Path:
    """A local adapter folder, or a Hub adapter repository's snapshot in the Hub cache."""
    return local_folder(str(path))


def read_adapter(path: str | Path) -> AdapterSeed:
    """Read a PEFT LoRA or SeRA adapter folder; any problem is a one-line :class:`UserError`."""
    folder = locate_adapter(path)
    config = read_adapter_config(folder)
    kind = peft_type(config)
    if kind == SERA_TYPE:
        return read_sera(folder, config)
    if kind == "LORA":
        return read_lora(folder, config)
    raise UserError(f"{folder / CONFIG_NAME}: peft_type {kind!r} is not supported (LORA or SERA)")


@dataclass
class MergedAdapter:
    """What a merge writes as a PEFT LoRA adapter, keyed by base tensor name.

    ``pairs``: merged low-rank deltas in the base's layout (``module_kinds`` says linear,
    Conv1D or embedding); ``bias_deltas``: merged ``lora_bias`` deltas; ``whole``: merged
    values of tensors saved whole; ``token_rows``: merged trainable-token rows (new values);
    ``modules_to_save``: the seeds' ``modules_to_save`` entries.
    """

    pairs: Dict[str, LowRank] = field(default_factory=dict)
    module_kinds: Dict[str, str] = field(default_factory=dict)
    bias_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)
    whole: Dict[str, torch.Tensor] = field(default_factory=dict)
    token_rows: Dict[str, TokenRows] = field(default_factory=dict)
    modules_to_save: List[str] = field(default_factory=list)
    token_indices_by_module: bool = False
    target_parameters: List[str] = field(default_factory=list)  # the seeds' entries, kept as saved

    def parameter_modules(self, modules: Iterable[str]) -> Set[str]:
        """The modules among ``modules`` whose weight a ``target_parameters`` entry names: the
        ones PEFT wraps in a ``ParamWrapper`` when it loads the written config."""
        return {
            module
            for module in modules
            if any(names_module(f"{module}.weight", entry) for entry in self.target_parameters)
        }


def _lora_factors(pair: LowRank, kind: str):
    """PEFT's (A, B) tensors for a delta ``pair`` given in the base's layout, scaling 1."""
    if kind == EMBEDDING:  # weight (num_embeddings, dim) += (B A)^T
        return pair.left.T, pair.right.T
    if kind == CONV1D:  # weight (in, out) += (B A)^T
        return pair.left.T, pair.right.T
    return pair.right, pair.left  # weight (out, in) += B A


def _lora_pair_tensors(
    merged: MergedAdapter, tensors: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, int], Dict[str, str]]:
    """Each merged pair's LoRA factors into ``tensors``; returns {module: rank} and {module: kind}."""
    ranks: Dict[str, int] = {}
    kinds: Dict[str, str] = {}
    pairs = dict(merged.pairs)
    for name, value in merged.whole.items():
        # a LoRA layer's weight saved whole (PEFT's save_embedding_layers) whose deltas the
        # merge folded into its new value: its layer must stay a LoRA target for PEFT to load it
        if name in merged.module_kinds and name not in pairs and not _saved_whole(name, merged.modules_to_save):
            pairs[name] = LowRank(torch.zeros(value.shape[0], 0), torch.zeros(0, value.shape[1]))
    for name, pair in sorted(pairs.items()):
        module = name[: -len(".weight")]
        if pair.rank == 0:
            if f"{module}.bias" not in merged.bias_deltas and name not in merged.whole:
                continue
            # a lora_B.bias, or a weight saved whole, needs its LoRA layer: a rank-1 zero pair carries it
            pair = LowRank(torch.zeros(pair.shape[0], 1), torch.zeros(1, pair.shape[1]))
        kind = merged.module_kinds.get(name, LINEAR)
        ranks[module], kinds[module] = pair.rank, kind
        A, B = _lora_factors(pair, kind)
        prefix = f"{KEY_PREFIX}{module}"
        if kind == EMBEDDING:
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = A, B
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    return ranks, kinds


def _pad_parameter_targets(merged: MergedAdapter, ranks: Dict[str, int], tensors: Dict[str, torch.Tensor]) -> None:
    """Zero-pad every parameter target's factors to the adapter's one rank r: PEFT wraps a
    targeted parameter in a ``ParamWrapper``, which takes r and ``lora_alpha`` from the config
    and ignores ``rank_pattern``. The padded delta is the same (zero rows of A, zero columns of B)."""
    r = max(ranks.values(), default=1)
    for module in merged.parameter_modules(ranks):
        if ranks[module] == r:
            continue
        A, B = tensors[f"{KEY_PREFIX}{module}.lora_A.weight"], tensors[f"{KEY_PREFIX}{module}.lora_B.weight"]
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)
        ranks[module] = r


def _lora_bias_tensors(
    merged: MergedAdapter, ranks: Dict[str, int], kinds: Dict[str, str], tensors: Dict[str, torch.Tensor]
) -> None:
    """``lora_B.bias`` for every LoRA layer when any seed trained ``lora_bias`` (zero where none did)."""
    missing_layer = sorted(set(merged.bias_deltas) - {f"{module}.bias" for module in ranks})
    if missing_layer:
        raise UserError(
            f"{missing_layer[0]}: a merged lora_bias whose layer has no LoRA delta in any seed; merge with "
            "output.format: full"
        )
    if not merged.bias_deltas:
        return
    for module, kind in kinds.items():
        if kind == EMBEDDING:
            raise UserError(
                f"{module}: PEFT has no lora_bias for embedding layers; merge these seeds with output.format: full"
            )
        B = tensors[f"{KEY_PREFIX}{module}.lora_B.weight"]
        bias = merged.bias_deltas.get(f"{module}.bias")
        tensors[f"{KEY_PREFIX}{module}.lora_B.bias"] = torch.zeros(B.shape[0]) if bias is None else bias


def _whole_and_token_tensors(
    merged: MergedAdapter, ranks: Dict[str, int], tensors: Dict[str, torch.Tensor]
) -> Tuple[bool, Dict[str, List[int]]]:
    """Tensors saved whole under PEFT's keys and trainable-token rows into ``tensors``; returns
    whether biases are saved (PEFT's ``bias: all``) and the token indices by module."""
    saved_biases = False
    for name, value in sorted(merged.whole.items()):
        module, parameter = name.rsplit(".", 1)
        tensors[f"{KEY_PREFIX}{module}.base_layer.{parameter}" if module in ranks else f"{KEY_PREFIX}{name}"] = value
        saved_biases |= parameter == "bias" and not _saved_whole(name, merged.modules_to_save)
    token_indices: Dict[str, List[int]] = {}
    for name, rows in sorted(merged.token_rows.items()):
        module = name[: -len(".weight")]
        token_indices[module] = rows.indices
        tensors[f"{KEY_PREFIX}{module}.token_adapter.trainable_tokens_delta"] = rows.values
    return saved_biases, token_indices


def _lora_config(
    merged: MergedAdapter,
    ranks: Dict[str, int],
    kinds: Dict[str, str],
    saved_biases: bool,
    token_indices: Dict[str, List[int]],
    base_model: Optional[str],
    task_type: Optional[str],
) -> Dict[str, Any]:
    """The fields of PEFT's ``LoraConfig`` that define the written tensors (scaling 1 everywhere)."""
    if len(token_indices) == 1 and not merged.token_indices_by_module:
        trainable_token_indices: Any = next(iter(token_indices.values()))
    else:
        trainable_token_indices = token_indices or None
    r = max(ranks.values(), default=1)
    parameters = merged.parameter_modules(ranks)
    modules = {m: k for m, k in ranks.items() if m not in parameters}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(modules),
        **({"target_parameters": merged.target_parameters} if merged.target_parameters else {}),
        "rank_pattern": {m: k for m, k in modules.items() if k != r},
        "alpha_pattern": {m: k for m, k in modules.items() if k != r},
        "lora_dropout": 0.0,
        "bias": "all" if saved_biases else "none",
        "lora_bias": bool(merged.bias_deltas),
        "fan_in_fan_out": CONV1D in kinds.values(),
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": sorted(merged.modules_to_save) or None,
        "trainable_token_indices": trainable_token_indices,
        "inference_mode": True,
    }
    try:
        config["peft_version"] = version("peft")
    except PackageNotFoundError:
        pass
    return config


def write_lora_adapter(
    folder: Path,
    merged: MergedAdapter,
    base_model: Optional[str],
    task_type: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> List[str]:
    """Write ``merged`` as a PEFT LoRA adapter (scaling 1 everywhere); returns the target modules.

    Each module keeps its own rank through ``rank_pattern``/``alpha_pattern``; zero-rank
    deltas are left out. Tensors saved whole are written under the keys PEFT saves them
    with (``<module>.base_layer.<param>`` inside a LoRA layer), trainable tokens as
    ``token_adapter.trainable_tokens_delta``, and ``lora_bias`` deltas as ``lora_B.bias``.
    The ``adapter_config.json`` holds the fields of PEFT's ``LoraConfig`` that define these
    (PEFT fills in its defaults for the rest when it loads the folder); it is written
    directly because importing peft costs seconds (``benchmarks/startup.json``). ``dtype``
    (default float32) is the dtype of every tensor written.
    """
    tensors: Dict[str, torch.Tensor] = {}
    ranks, kinds = _lora_pair_tensors(merged, tensors)
    _pad_parameter_targets(merged, ranks, tensors)
    _lora_bias_tensors(merged, ranks, kinds, tensors)
    saved_biases, token_indices = _whole_and_token_tensors(merged, ranks, tensors)
    if not tensors:
        raise UserError("every merged delta is zero: there is no adapter to write")
    config = _lora_config(merged, ranks, kinds, saved_biases, token_indices, base_model, task_type)
    target_dtype = dtype or torch.float32
    tensors = {key: tensor.to(target_dtype).contiguous() for key, tensor in tensors.items()}
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    write_tensors(folder / SAFETENSORS_NAME, tensors, metadata={"format": "pt"})
    return sorted(ranks)

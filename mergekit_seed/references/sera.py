"""SeRA adapters on disk (the layer itself is :mod:`mergekit_seed.maths.sera`).

A SeRA adapter is a folder like a PEFT adapter: ``adapter_config.json`` with
``"peft_type": "SERA"``, ``r``, ``split``, ``sera_alpha``, ``target_modules``,
``base_model_name_or_path``; ``adapter_model.safetensors`` with
``base_model.model.<module>.sera_A`` (split, d_in/split, r/split),
``.sera_C`` (r, r) and ``.sera_B`` (split, r/split, d_out/split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from safetensors.torch import load_file, save_file
from torch import nn

from mergekit_seed.errors import UserError
from mergekit_seed.maths.sera import SeraConfig, apply_sera, sera_layers
from mergekit_seed.untrusted import read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def read_sera_config(folder: Union[str, Path]) -> SeraConfig:
    """The :class:`SeraConfig` of a SeRA adapter folder (bounded read, checked by type)."""
    return SeraConfig.model_validate(read_json_object(Path(folder, CONFIG_NAME), "SeRA adapter config"))


def save_sera(model: nn.Module, folder: Union[str, Path], config: SeraConfig) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for a SeRA model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in sera_layers(model).items():
        for part in ("sera_A", "sera_C", "sera_B"):
            tensors[f"{KEY_PREFIX}{name}.{part}"] = getattr(layer, part).detach().contiguous().cpu()
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config.model_dump(), indent=2) + "\n")


def load_sera(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Apply the SeRA adapter stored in ``folder`` to ``model`` and load its weights."""
    apply_sera(model, read_sera_config(folder))
    tensors = load_file(Path(folder) / WEIGHTS_NAME)
    for name, layer in sera_layers(model).items():
        for part in ("sera_A", "sera_C", "sera_B"):
            key = f"{KEY_PREFIX}{name}.{part}"
            if key not in tensors:
                raise UserError(f"{folder}: {key} is missing from {WEIGHTS_NAME}")
            getattr(layer, part).data.copy_(tensors[key])
    return model

"""SeRA adapters on disk (the layer itself is :mod:`mergekit_seed.references.sera_layer`).

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

from torch import nn

from mergekit_seed.errors import UserError
from mergekit_seed.output import OutputFolder, write_tensors, write_text
from mergekit_seed.reader import load_safetensors, read_json_object
from mergekit_seed.references.sera_layer import SeraConfig, apply_sera, sera_layers


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def read_sera_config(folder: Union[str, Path]) -> SeraConfig:
    """The :class:`SeraConfig` of a SeRA adapter folder (bounded read, checked by type)."""
    return SeraConfig.model_validate(read_json_object(Path(folder, CONFIG_NAME), "SeRA adapter config", within=folder))


def save_sera(model: nn.Module, folder: Union[str, Path], config: SeraConfig, overwrite: bool = False) -> None:
    """Publish ``adapter_config.json`` and ``adapter_model.safetensors`` of a SeRA model as the
    folder ``folder`` (:class:`~mergekit_seed.output.OutputFolder`: atomic; ``overwrite``
    replaces an adapter saved here before)."""
    tensors = {}
    for name, layer in sera_layers(model).items():
        for part in ("sera_A", "sera_C", "sera_B"):
            tensors[f"{KEY_PREFIX}{name}.{part}"] = getattr(layer, part).detach().contiguous().cpu()
    with OutputFolder(folder, overwrite=overwrite, command="save-sera") as output:
        write_tensors(output.staging / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_text(output.staging / CONFIG_NAME, json.dumps(config.model_dump(), indent=2) + "\n")
        output.publish()


def load_sera(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Apply the SeRA adapter stored in ``folder`` to ``model`` and load its weights."""
    apply_sera(model, read_sera_config(folder))
    tensors = load_safetensors(Path(folder) / WEIGHTS_NAME, within=folder)
    for name, layer in sera_layers(model).items():
        for part in ("sera_A", "sera_C", "sera_B"):
            key = f"{KEY_PREFIX}{name}.{part}"
            if key not in tensors:
                raise UserError(f"{folder}: {key} is missing from {WEIGHTS_NAME}")
            getattr(layer, part).data.copy_(tensors[key])
    return model

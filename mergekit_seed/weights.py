"""Reading the safetensors files of a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from mergekit_seed.errors import UserError


def load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a folder's ``*.safetensors`` files (small models: tests, demo, checks)."""
    from safetensors.torch import load_file

    weights: Dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def safetensors_shapes(folder: Path) -> Dict[str, tuple]:
    """{tensor name: shape} from the headers of a folder's safetensors files (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    shapes: Dict[str, tuple] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    shapes[name] = tuple(reader.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
    return shapes

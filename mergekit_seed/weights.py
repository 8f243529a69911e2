"""Reading the safetensors files of a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from mergekit_seed.errors import UserError


def weight_files(folder: Path) -> list:
    """A folder's weight files: its ``*.safetensors``, else its PyTorch ``*.bin`` files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return files or sorted(Path(folder).glob("*.bin"))


def load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a folder's weight files (small models: tests, demo, checks); ``.bin``
    files are read with ``torch.load(weights_only=True)``, which runs no pickled code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: Dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            try:
                weights.update(load_file(file))
            except (SafetensorError, OSError, ValueError) as error:
                raise UserError(f"{file}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
            continue
        try:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # the unpickler raises many types; all mean "refused"
            raise UserError(f"{file}: not a plain tensor file ({str(error).splitlines()[0]})") from None
    return weights


def safetensors_index(files) -> Dict[str, tuple]:
    """{tensor name: (file, shape)} from the headers of safetensors ``files`` (no tensor data);
    a corrupt or truncated file (the header must cover the whole file) is one line."""
    from safetensors import SafetensorError, safe_open

    index: Dict[str, tuple] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    index[name] = (Path(file), tuple(reader.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
    return index


def safetensors_shapes(folder: Path) -> Dict[str, tuple]:
    """{tensor name: shape} from the headers of a folder's safetensors files (no tensor data)."""
    return {name: shape for name, (_, shape) in safetensors_index(sorted(Path(folder).glob("*.safetensors"))).items()}

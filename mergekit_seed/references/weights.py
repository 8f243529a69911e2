"""The weight files of a model folder: which they are, their headers, their hashes, their tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from mergekit_seed.errors import UserError
from mergekit_seed.reader import (
    load_pickled_tensors,
    load_safetensors,
    read_json_object,
    regular_file,
    safetensors_file,
    sha256,
)


if TYPE_CHECKING:  # torch is imported where tensors are read: hashing and headers need none of it
    import torch

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# what mergekit's loader reads for a full model (ShardedTensorIndex.from_disk), in its order
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def confined_file(folder: Path, name: str) -> Path:
    """``folder / name``, refused in one line unless it is a regular file inside ``folder``
    (:func:`~mergekit_seed.reader.confinement_root`) with every symlink followed: an index entry
    such as ``../x.safetensors`` or ``/etc/passwd``, a link out of the folder and a device, FIFO
    or socket are never read. A missing file is returned as it is, for the caller to name."""
    return regular_file(
        Path(folder) / name, folder, missing_ok=True, fix="remove it from the model folder", kind="model folder"
    )


def confined_glob(folder: Path, *patterns: str) -> List[Path]:
    """The regular files of ``folder`` matching ``patterns``, sorted, each :func:`confined_file`."""
    folder = Path(folder)
    names = sorted({path.name for pattern in patterns for path in folder.glob(pattern)})
    return [confined_file(folder, name) for name in names]


def full_model_files(folder: Path) -> List[Path]:
    """The weight files mergekit reads for a full model in ``folder``: ``model.safetensors``
    or the shards its ``.index.json`` names, else the same for ``pytorch_model.bin``; [] when
    the folder has none (an adapter folder, or only other files such as a Mistral
    ``consolidated.safetensors``, which mergekit does not read).

    mergekit's ``ShardedTensorIndex.from_disk`` makes the same choice (tests/test_parity.py
    holds the two equal) but parses the index unbounded and follows its entries wherever they
    point; this reads it bounded and confines every entry before mergekit opens any."""
    folder = Path(folder)
    for name in FULL_MODEL_FILES:
        index = folder / f"{name}.index.json"
        if os.path.lexists(index):  # a link or a FIFO is refused by the reader, not taken for "no index"
            weight_map = read_json_object(index, "weight index mergekit can read", within=folder).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: its weight_map is not a mapping of tensor names to files")
            return [confined_file(folder, shard) for shard in sorted(set(map(str, weight_map.values())))]
        if os.path.lexists(folder / name):
            return [confined_file(folder, name)]
    return []


def hashed_weight_files(folder: Path) -> List[Path]:
    """Every weight file of a folder a card records a hash for (``WEIGHT_PATTERNS``), sorted."""
    return confined_glob(folder, *WEIGHT_PATTERNS)


# besides the weights, what decides how a folder loads and scores (its card does not)
LOADING_FILES = (
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def folder_identity(folder: Path) -> Dict[str, str]:
    """{file name: sha256} of what a model or adapter folder is: its weight files and the files
    that decide how it loads and tokenizes (:data:`LOADING_FILES`). Two folders with equal
    identities score alike; a changed weight, config or tokenizer file changes it."""
    hashes = weight_file_hashes(folder)
    for name in LOADING_FILES:
        if os.path.lexists(Path(folder) / name):
            hashes[name] = sha256(confined_file(folder, name), folder)
    return hashes


def weight_file_hashes(folder: Path) -> Dict[str, str]:
    """{weight file name: sha256} of a folder's weight files (hashing the bytes, through any
    symlink, as in a Hub cache snapshot)."""
    return {f.name: sha256(f, folder) for f in hashed_weight_files(folder)}


def weight_files(folder: Path) -> list:
    """A folder's weight files: its ``*.safetensors``, else its PyTorch ``*.bin`` files."""
    return confined_glob(folder, "*.safetensors") or confined_glob(folder, "*.bin")


def load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a folder's weight files (small models: tests, demo, checks); ``.bin``
    files are read with ``torch.load(weights_only=True)``, which runs no pickled code."""
    weights: Dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            weights.update(load_safetensors(file, folder))
        else:
            weights.update(load_pickled_tensors(file, folder))
    return weights


def safetensors_index(files) -> Dict[str, tuple]:
    """{tensor name: (file, shape)} from the headers of safetensors ``files`` (no tensor data);
    a corrupt or truncated file (the header must cover the whole file) is one line."""
    index: Dict[str, tuple] = {}
    for file in files:
        with safetensors_file(file) as reader:
            for name in reader.keys():
                index[name] = (Path(file), tuple(reader.get_slice(name).get_shape()))
    return index


def full_model_shapes(folder: Path) -> Dict[str, tuple]:
    """{tensor name: shape} of the safetensors files mergekit reads for a full model
    (:func:`full_model_files`); empty for ``.bin`` checkpoints, which mergekit reads itself."""
    files = [file for file in full_model_files(folder) if file.suffix == ".safetensors"]
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: named by the folder's weight index but missing")
    return {name: shape for name, (_, shape) in safetensors_index(files).items()}


def full_model_dtype_kinds(folder: Path) -> Dict[str, str]:
    """{tensor name: "float" or "integer"} from the headers of the safetensors files mergekit
    reads for a full model (:func:`full_model_files`; no tensor data)."""
    kinds: Dict[str, str] = {}
    for file in full_model_files(folder):
        if file.suffix == ".safetensors" and file.is_file():
            with safetensors_file(file) as reader:
                for name in reader.keys():
                    dtype = reader.get_slice(name).get_dtype()
                    kinds[name] = "float" if dtype.startswith(("F", "BF")) else "integer"
    return kinds


def safetensors_shapes(folder: Path) -> Dict[str, tuple]:
    """{tensor name: shape} from the headers of a folder's safetensors files (no tensor data)."""
    return {name: shape for name, (_, shape) in safetensors_index(confined_glob(folder, "*.safetensors")).items()}

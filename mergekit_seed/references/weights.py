"""The weight files of a model folder: which they are, their headers, their hashes, their tensors."""

from __future__ import annotations

import hashlib
import pickle
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from safetensors import SafetensorError, safe_open

from mergekit_seed.errors import UserError
from mergekit_seed.untrusted import read_json_object

if TYPE_CHECKING:  # torch is imported where tensors are read: hashing and headers need none of it
    import torch

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# what mergekit's loader reads for a full model (ShardedTensorIndex.from_disk), in its order
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def confinement_root(folder: Path) -> Path:
    """The folder a model folder's files must lie in, symlinks followed: the folder itself, or
    for a Hugging Face cache snapshot (``models--org--name/snapshots/REV``) its repository
    folder, whose ``blobs/`` the snapshot's links point into."""
    resolved = Path(folder).absolute().resolve()
    return resolved.parent.parent if resolved.parent.name == "snapshots" else resolved


def confined_file(folder: Path, name: str, root: Optional[Path] = None) -> Path:
    """``folder / name``, refused in one line unless it is a regular file inside ``folder``
    (:func:`confinement_root`; ``root`` when already known) with every symlink followed: an
    index entry such as ``../x.safetensors`` or ``/etc/passwd``, a link out of the folder and a
    device, FIFO or socket are never read. A missing file is returned as it is, for the caller
    to name."""
    path = Path(folder) / name
    try:
        target = path.resolve()
        mode = target.stat().st_mode if target.exists() else None
    except (OSError, RuntimeError) as error:
        raise UserError(f"{path}: cannot resolve the path ({error}); fix the link") from None
    root = root or confinement_root(folder)
    if not target.is_relative_to(root):
        raise UserError(
            f"{path}: leads outside the model folder {folder} (to {target}); a model's files are read only from "
            "inside its folder: copy the file in instead of linking or indexing it"
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a folder, device, pipe or socket); remove it from the model folder")
    return path


def confined_glob(folder: Path, *patterns: str) -> List[Path]:
    """The regular files of ``folder`` matching ``patterns``, sorted, each :func:`confined_file`."""
    folder = Path(folder)
    root = confinement_root(folder)
    names = sorted({path.name for pattern in patterns for path in folder.glob(pattern)})
    return [confined_file(folder, name, root) for name in names]


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
        if index.is_file():
            weight_map = read_json_object(confined_file(folder, index.name), "weight index mergekit can read").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: its weight_map is not a mapping of tensor names to files")
            root = confinement_root(folder)
            return [confined_file(folder, shard, root) for shard in sorted(set(map(str, weight_map.values())))]
        if (folder / name).is_file():
            return [confined_file(folder, name)]
    return []


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hashed_weight_files(folder: Path) -> List[Path]:
    """Every weight file of a folder a card records a hash for (``WEIGHT_PATTERNS``), sorted."""
    return confined_glob(folder, *WEIGHT_PATTERNS)


def weight_file_hashes(folder: Path) -> Dict[str, str]:
    """{weight file name: sha256} of a folder's weight files (hashing the bytes, through any
    symlink, as in a Hub cache snapshot)."""
    return {f.name: sha256_file(f) for f in hashed_weight_files(folder)}


def weight_files(folder: Path) -> list:
    """A folder's weight files: its ``*.safetensors``, else its PyTorch ``*.bin`` files."""
    return confined_glob(folder, "*.safetensors") or confined_glob(folder, "*.bin")


def load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a folder's weight files (small models: tests, demo, checks); ``.bin``
    files are read with ``torch.load(weights_only=True)``, which runs no pickled code."""
    from safetensors.torch import load_file

    weights: Dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            try:
                weights.update(load_file(file))
            except (SafetensorError, OSError, ValueError) as error:
                raise UserError(f"{file}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
            continue
        weights.update(load_plain_tensors(file))
    return weights


def load_plain_tensors(file: Path, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` file's tensors through ``torch.load(weights_only=True)``, which runs no
    pickled code; with ``mmap`` no tensor data is read (zip-format files; older ones are read
    whole). A file it refuses (pickled code, truncated, not a checkpoint) is one line naming it."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's note on unusual pickle protocols: the refusal below says enough
            warnings.simplefilter("ignore", UserWarning)
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap" not in str(error):
                    raise
                loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{file}: refused: it holds pickled objects other than tensors, which torch.load(weights_only=True) does not "
            "load (nothing in it was run); convert the checkpoint to safetensors where it was made"
        ) from None
    except Exception as error:  # the unpickler raises many types; all mean "refused"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{file}: refused (only plain tensors load with weights_only=True): {reason}; convert it to safetensors") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{file}: holds a {type(loaded).__name__}, not a mapping of tensor names to tensors")
    return loaded


def safetensors_index(files) -> Dict[str, tuple]:
    """{tensor name: (file, shape)} from the headers of safetensors ``files`` (no tensor data);
    a corrupt or truncated file (the header must cover the whole file) is one line."""
    index: Dict[str, tuple] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    index[name] = (Path(file), tuple(reader.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({str(error).splitlines()[0]})") from None
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
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    dtype = reader.get_slice(name).get_dtype()
                    kinds[name] = "float" if dtype.startswith(("F", "BF")) else "integer"
    return kinds


def safetensors_shapes(folder: Path) -> Dict[str, tuple]:
    """{tensor name: shape} from the headers of a folder's safetensors files (no tensor data)."""
    return {name: shape for name, (_, shape) in safetensors_index(confined_glob(folder, "*.safetensors")).items()}

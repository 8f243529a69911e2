"""The one reader: every file read on a user's behalf is opened here.

Recipes, cards, grids, JSONL data, lm-eval results and samples, config, tokenizer and index
JSON, and weight files (safetensors, PyTorch ``.bin``) all come through these functions, which
apply three rules before a byte is read:

1. **Inside its folder.** A file that belongs to a folder (a model's weights and configs, an
   lm-eval run's files) is resolved with every symlink followed and refused unless it lies
   inside that folder (:func:`confinement_root`: a Hub cache snapshot's links into its
   repository's ``blobs/`` are inside). A file the user names directly (a recipe, a card, a
   data file) may be a link: the user chose it.
2. **A regular file.** A device (``/dev/zero``), a FIFO, a socket or a folder is refused before
   it is opened, and again on the open descriptor (opened with ``O_NONBLOCK``, so a FIFO put in
   its place meanwhile never blocks).
3. **A size bound** for text: the file's size is checked before reading, and no more than the
   bound is read (``/proc`` files and files that grow are bounded too).

Parsing is :mod:`mergekit_seed.untrusted`'s. ``tests/test_chokepoints.py`` fails on any
``open``, ``read_text``, ``json.load``, ``yaml.*load``, ``safe_open``, ``torch.load`` or
``load_file`` elsewhere in the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, Iterator, List, Optional, Union

from safetensors import SafetensorError, safe_open

from mergekit_seed.errors import UserError
from mergekit_seed.untrusted import parse_json, parse_yaml


if TYPE_CHECKING:  # torch is imported where tensors are loaded: headers and hashes need none of it
    import torch

PathLike = Union[str, os.PathLike]

JSON_MAX_BYTES = 64 << 20  # configs, indexes, results files, manifests: kilobytes
TEXT_MAX_BYTES = 16 << 20  # cards and grids: kilobytes
DATA_MAX_BYTES = 1 << 30  # JSONL data and lm-eval samples files: megabytes, occasionally hundreds
NOT_REGULAR = "not a regular file (a folder, device, pipe or socket)"


def confinement_root(folder: PathLike) -> Path:
    """The folder a model folder's files must lie in, symlinks followed: the folder itself, or
    for a Hugging Face cache snapshot (``models--org--name/snapshots/REV``) its repository
    folder, whose ``blobs/`` the snapshot's links point into."""
    resolved = _resolved(Path(folder))
    return resolved.parent.parent if resolved.parent.name == "snapshots" else resolved


def _resolved(path: Path) -> Path:
    try:
        return path.absolute().resolve()
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path}: cannot resolve the path ({error}); fix the link") from None


def regular_file(
    path: PathLike,
    within: Optional[PathLike] = None,
    missing_ok: bool = False,
    fix: str = "give a file",
    kind: str = "folder",
) -> Path:
    """``path`` as given, once it is known to be a regular file (rule 2), inside ``within``
    when given (rule 1; ``kind`` names that folder in the refusal). A missing file is one line,
    or returned as it is with ``missing_ok`` (for the caller to name); ``fix`` ends the
    not-a-regular-file line."""
    path = Path(path)
    target = _resolved(path)
    if within is not None:
        root = confinement_root(within)
        if not target.is_relative_to(root):
            raise UserError(
                f"{path}: leads outside the {kind} {within} (to {target}); its files are read only from inside it: "
                "copy the file in instead of linking or indexing it"
            )
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        if missing_ok:
            return path
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: {NOT_REGULAR}; {fix}")
    return path


@contextlib.contextmanager
def open_file(path: PathLike, within: Optional[PathLike] = None, fix: str = "give a file") -> Iterator[BinaryIO]:
    """``path`` opened for reading in binary, under rules 1 and 2."""
    path = regular_file(path, within, fix=fix)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    handle = os.fdopen(descriptor, "rb")
    with handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # swapped for something else since the check
            raise UserError(f"{path}: {NOT_REGULAR}; {fix}")
        os.set_blocking(descriptor, True)
        yield handle


def read_bytes(path: PathLike, what: str, max_bytes: int, within: Optional[PathLike] = None) -> bytes:
    """At most ``max_bytes`` of ``path`` (a larger file is one line naming ``what`` it should be)."""
    with open_file(path, within) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:
            raise UserError(
                f"{path}: {max(size, len(data)):,} bytes or more is too large for a {what} (at most {max_bytes:,})"
            )
    return data


def read_text(path: PathLike, what: str, max_bytes: int = TEXT_MAX_BYTES, within: Optional[PathLike] = None) -> str:
    """``path`` as UTF-8 text (rules 1-3); not UTF-8 is one line naming ``what`` it should be."""
    try:
        return read_bytes(path, what, max_bytes, within).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a {what} is UTF-8 text") from None


def read_lines(
    path: PathLike, what: str, max_bytes: int = DATA_MAX_BYTES, within: Optional[PathLike] = None
) -> List[str]:
    """The lines of a text file such as JSONL data (:func:`read_text`, a larger bound)."""
    return read_text(path, what, max_bytes, within).splitlines()


def read_json(
    path: PathLike, what: str = "JSON file", max_bytes: int = JSON_MAX_BYTES, within: Optional[PathLike] = None
) -> Any:
    """The parsed JSON of ``path``: unreadable, past ``max_bytes``, not UTF-8, not JSON or
    nested past Python's recursion limit is one line naming it and ``what`` it should be."""
    return parse_json(read_text(path, what, max_bytes, within), str(path), what)


def read_json_object(path: PathLike, what: str, within: Optional[PathLike] = None) -> dict:
    """:func:`read_json`, which must give a JSON object (one line naming the file if not)."""
    data = read_json(path, what, within=within)
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object (a {what}), not a {type(data).__name__}")
    return data


def read_yaml(path: PathLike, what: str, max_bytes: int = TEXT_MAX_BYTES) -> Any:
    """``path`` parsed with YAML's safe loader, aliases bounded (:func:`untrusted.parse_yaml`)."""
    return parse_yaml(read_text(path, what, max_bytes), str(path))


def sha256(path: PathLike, within: Optional[PathLike] = None) -> str:
    """The sha256 of ``path``'s bytes (rules 1 and 2; any size, read in chunks)."""
    with open_file(path, within) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _safetensors_problem(path: PathLike, error: Exception) -> UserError:
    return UserError(
        f"{path}: corrupt or truncated safetensors file ({(str(error).splitlines() or [type(error).__name__])[0]})"
    )


@contextlib.contextmanager
def safetensors_file(path: PathLike, within: Optional[PathLike] = None) -> Iterator[Any]:
    """safetensors' ``safe_open`` reader of ``path`` (rules 1 and 2; headers and single tensors
    without reading the rest); a corrupt or truncated file is one line naming it."""
    path = regular_file(path, within, fix="remove it from the model folder")
    try:
        reader_context = safe_open(path, framework="pt")
        reader = reader_context.__enter__()
    except (SafetensorError, OSError, ValueError) as error:
        raise _safetensors_problem(path, error) from None
    try:
        yield reader
    except SafetensorError as error:
        raise _safetensors_problem(path, error) from None
    finally:
        reader_context.__exit__(None, None, None)


def load_safetensors(path: PathLike, within: Optional[PathLike] = None) -> Dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file (small models: tests, the demo, checks)."""
    from safetensors.torch import load_file

    path = regular_file(path, within, fix="remove it from the model folder")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise _safetensors_problem(path, error) from None


def load_pickled_tensors(
    path: PathLike, within: Optional[PathLike] = None, mmap: bool = False
) -> Dict[str, "torch.Tensor"]:
    """A PyTorch ``.bin`` file's tensors through ``torch.load(weights_only=True)``, which runs no
    pickled code; with ``mmap`` no tensor data is read (zip-format files; older ones are read
    whole). A file it refuses (pickled code, truncated, not a checkpoint) is one line naming it."""
    import torch

    path = regular_file(path, within, fix="remove it from the model folder")
    try:
        with warnings.catch_warnings():  # torch's note on unusual pickle protocols: the refusal below says enough
            warnings.simplefilter("ignore", UserWarning)
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not mmap or "mmap" not in str(error):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: refused: it holds pickled objects other than tensors, which torch.load(weights_only=True) does "
            "not "
            "load (nothing in it was run); convert the checkpoint to safetensors where it was made"
        ) from None
    except Exception as error:  # the unpickler raises many types; all mean "refused"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"{path}: refused (only plain tensors load with weights_only=True): {reason}; convert it to safetensors"
        ) from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not a mapping of tensor names to tensors")
    return loaded

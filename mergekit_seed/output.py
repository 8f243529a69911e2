"""The one output protocol: every command that writes a folder (``run``, ``reproduce``,
``merge()``, ``compare --out``, ``analyze --out``, the demo's merges) writes it through
:class:`OutputFolder`.

1. OUT is resolved (symlinks followed) and refused if it equals, contains or lies inside an
   input of the command, or overlaps the Hugging Face cache.
2. An exclusive lock (``flock`` on ``.OUT.lock`` beside OUT) is held for the whole run: a second
   run into the same OUT is refused in one line naming the first.
3. Everything is written into a staging sibling ``.OUT.partial-PID``, which gets a manifest
   (``.mergekit-seed``: every file written) and is then renamed into place.
4. A file we did not write is never deleted. ``overwrite`` replaces only the files the manifest
   of our earlier output lists; any other file in OUT (one that appeared during the run
   included) refuses the publish, leaving OUT untouched and the new output in its staging
   folder, named in the error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from huggingface_hub import constants

from mergekit_seed.errors import UserError
from mergekit_seed.untrusted import read_json
from mergekit_seed.version import __version__

try:
    import fcntl
except ImportError:  # Windows: no flock; runs into one OUT are not locked there (docs/errors.md)
    fcntl = None

MANIFEST_NAME = ".mergekit-seed"


def resolve_path(path: Union[str, os.PathLike], fix: str) -> Path:
    """``path`` absolute with every symlink followed; a path that cannot be resolved (a symlink
    loop) is one line ending in ``fix``."""
    try:
        return Path(path).absolute().resolve()
    except (OSError, RuntimeError) as error:
        raise UserError(f"{path}: cannot resolve the path ({error}); {fix}") from None


def check_location(out_path: Path, inputs: Iterable[Union[str, os.PathLike]]) -> None:
    """Refuse an ``out_path`` (resolved) that equals, contains or lies inside one of ``inputs``,
    or overlaps the Hugging Face cache: writing there would destroy what the command reads."""
    for path in inputs:
        resolved = resolve_path(path, "it is an input of this command: fix the link")
        if resolved == out_path:
            how = "is"
        elif resolved.is_relative_to(out_path):
            how = "contains"
        elif out_path.is_relative_to(resolved):
            how = "lies inside"
        else:
            continue
        raise UserError(
            f"{out_path}: the output folder {how} the input {path}; a merge never writes over its inputs: "
            "choose an output folder outside every input"
        )
    cache = resolve_path(constants.HF_HUB_CACHE, "fix HF_HUB_CACHE (or HF_HOME)")
    if out_path == cache or out_path.is_relative_to(cache) or cache.is_relative_to(out_path):
        raise UserError(f"{out_path}: the output folder overlaps the Hugging Face cache ({cache}); choose an output folder outside it")


def _entries(folder: Path) -> List[str]:
    """Every file, link and folder under ``folder``, relative, '/'-separated (links not followed)."""
    found = []
    for root, folders, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        found += [(relative / name).as_posix() for name in folders + files]
    return sorted(found)


def written_files(folder: Path) -> Optional[List[str]]:
    """The files the manifest of an earlier output of ours in ``folder`` lists; None when the
    folder holds no readable manifest with a file list."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_json(folder / MANIFEST_NAME, "mergekit-seed manifest")
    except UserError:
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return files


def foreign_entries(folder: Path) -> List[str]:
    """The entries of ``folder`` that no manifest of ours lists (every entry, when it has none)."""
    listed = set(written_files(folder) or ())
    ancestors = {parent.as_posix() for name in listed for parent in Path(name).parents}
    return [entry for entry in _entries(folder) if entry != MANIFEST_NAME and entry not in listed and entry not in ancestors]


def _listing(entries: Sequence[str]) -> str:
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


class OutputFolder:
    """One output folder, written under the protocol above. Use as a context manager::

        with OutputFolder(out, inputs, overwrite=False) as output:
            write into output.staging
            output.publish()

    Leaving the block without :meth:`publish` (an error) removes the staging folder, unless
    the publish itself was refused to keep a file we did not write (then the error names it).
    ``inputs`` are every local path the command reads.
    """

    def __init__(self, out: Union[str, os.PathLike], inputs: Iterable[Union[str, os.PathLike]] = (), overwrite: bool = False):
        self.path = resolve_path(out, "choose another output folder")
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        self._lock_path = self.path.parent / f".{self.path.name}.lock"
        self._lock_fd: Optional[int] = None
        self._keep_staging = False
        self._replaces_earlier = False  # OUT held an earlier output of ours when the run began

    def __enter__(self) -> "OutputFolder":
        check_location(self.path, self.inputs)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a folder; choose another output path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})") from None
        self._lock()
        try:
            self._check_existing()
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as error:
            self._unlock()
            raise UserError(f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})") from None
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if not self._keep_staging:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._unlock()

    # --- the lock

    def _lock(self) -> None:
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise UserError(f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"{self.path}: another run is writing this output folder ({holder}); wait for it to finish "
                    "or choose another output folder"
                ) from None
            try:  # the holder before us may have removed the file between our open and flock
                current = os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:2]) or "python"
        os.ftruncate(fd, 0)
        os.write(fd, f"{command}, pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self._lock_path)
        except OSError:
            pass
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    # --- what is there already

    def _check_existing(self) -> None:
        if not self.path.is_dir():
            return
        try:
            contents = os.listdir(self.path)
        except OSError as error:
            raise UserError(f"{self.path}: cannot list the output folder ({error.strerror})") from None
        if not contents:
            return
        if not self.overwrite:
            raise UserError(f"{self.path}: output folder is not empty; pass --overwrite (overwrite=True from Python) to replace it")
        if written_files(self.path) is None:
            raise UserError(
                f"{self.path}: --overwrite replaces only a previous mergekit-seed merge or report, and this folder holds "
                f"something else ({_listing(sorted(contents))}); remove it yourself or choose another output folder"
            )
        foreign = foreign_entries(self.path)
        if foreign:
            raise UserError(
                f"{self.path}: --overwrite replaces only the files of the earlier output, and {_listing(foreign)} "
                "was not written by it; move that out of the folder first, or choose another output folder"
            )
        self._replaces_earlier = True

    # --- publishing

    def publish(self) -> Path:
        """Write the manifest and move the staged output into place; returns OUT."""
        files = [entry for entry in _entries(self.staging) if not (self.staging / entry).is_dir()]
        manifest = {"mergekit_seed": __version__, "files": files}
        (self.staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if self.path.is_dir() and os.listdir(self.path):
            if not self._replaces_earlier:  # absent or empty when the run began: all of it appeared since
                self._refuse_foreign(_entries(self.path))
            self._replace_previous()
        else:
            self._rename_into_place()
        return self.path

    def _refuse_foreign(self, foreign: Sequence[str]) -> None:
        self._keep_staging = True
        raise UserError(
            f"{self.path}: {_listing(foreign)} appeared in the output folder during the run, and a file we did not write "
            f"is never deleted; the folder was left as it was, and the new output is in {self.staging}: move those files "
            f"out and rename it to {self.path.name}, or run again"
        )

    def _rename_into_place(self) -> None:
        """Rename staging to an absent or empty OUT (POSIX replaces an empty folder atomically,
        and refuses one that a file was put into meanwhile)."""
        try:
            os.rename(self.staging, self.path)
        except OSError:
            if self.path.is_dir() and os.listdir(self.path):
                self._refuse_foreign(_entries(self.path))
            raise

    def _replace_previous(self) -> None:
        foreign = foreign_entries(self.path)
        if foreign:
            self._refuse_foreign(foreign)
        replaced = self.path.parent / f".{self.path.name}.replaced-{os.getpid()}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(self.path, replaced)
        foreign = foreign_entries(replaced)  # a file may have appeared since the check above
        if foreign:
            os.rename(replaced, self.path)
            self._refuse_foreign(foreign)
        try:
            os.rename(self.staging, self.path)
        except OSError:
            os.rename(replaced, self.path)
            raise
        shutil.rmtree(replaced, ignore_errors=True)


def local_paths(names: Iterable[Optional[Union[str, os.PathLike]]]) -> List[Path]:
    """The names among ``names`` that are local files or folders (not Hub ids, not None): the
    inputs a report (``compare``, ``analyze``) reads from disk."""
    return [Path(name) for name in names if name is not None and Path(name).exists()]

"""The one writer: every file we write, rename or delete in a folder the user named goes
through :class:`OutputFolder` and the staging-bound helpers below (``run``, ``reproduce``,
``merge()``, ``select``, ``compare --out``, ``analyze --out``, the demo's ``--out`` and its
base cache, adapters saved by the demo).

1. OUT is resolved (symlinks followed) and refused if it equals, contains or lies inside an
   input of the command, or overlaps the Hugging Face cache.
2. An exclusive lock (``flock`` on ``.OUT.lock`` beside OUT, opened without following links
   and refused when it has other links) is held for the whole run: a second run into the same
   OUT is refused in one line naming the first. The lock file is also the run's journal: it
   names the staging folder (and, during an ``--overwrite`` publish, the earlier output), so a
   run that finds the lock free and a journal in it knows what a killed owner left behind and
   cleans exactly that, in one line saying so.
3. Everything is written into a staging sibling with an unpredictable name
   (``.OUT.partial-RANDOM``), which gets a manifest (``.mergekit-seed``: the command that wrote
   it and every file written) and is then renamed into place. From the moment OUT is taken
   until it is published, SIGTERM, SIGHUP and Ctrl-C remove the staging folder. Before the
   rename, every text file written is passed through the provenance gate
   (:func:`mergekit_seed.public.public_text`).
4. A file we did not write is never deleted. A merge is replaced only by ``--overwrite`` of a
   merge, and only the files its manifest lists; a report only by a report of the same command.
   Any other file in OUT (one that appeared during the run included) refuses the publish,
   leaving OUT untouched and the new output in its staging folder, named in the error. An
   ``--overwrite`` publish swaps the two folders in one step (``renameat2`` with
   ``RENAME_EXCHANGE`` on Linux), so OUT is present at every instant; where the system cannot,
   two renames are journaled and a killed swap is undone by the next run.

5. Work a command finished for OUT and may need again if it is interrupted (``select``'s
   scorings) is kept beside OUT in ``.OUT.resume`` (:class:`ResumeJournal`): one entry per
   piece of work, written whole or not at all, kept through a crash, a SIGKILL or Ctrl-C, and
   removed once OUT is published.

Every write helper (:func:`write_text`, :func:`write_tensors`, :func:`copy_file`, ...) refuses a
path outside the staging folder of an :class:`OutputFolder` open in this process: a programming
error, raised as ``RuntimeError``. Libraries that write files themselves (mergekit's
``run_merge``, transformers' ``save_pretrained``, matplotlib's ``savefig``) are handed
:func:`staged_path`. ``tests/test_chokepoints.py`` fails on a write anywhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Union

from huggingface_hub import constants

from mergekit_seed.errors import UserError
from mergekit_seed.public import TEXT_SUFFIXES, Labels, public_text
from mergekit_seed.reader import open_file, read_bytes, read_json
from mergekit_seed.version import __version__


try:
    import fcntl
except ImportError:  # Windows: no flock; runs into one OUT are not locked there (docs/errors.md)
    fcntl = None

MANIFEST_NAME = ".mergekit-seed"
STAGED_TEXT_MAX_BYTES = 1 << 30  # a tokenizer.json is megabytes
MERGE, REPORT = "merge", "report"
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

PathLike = Union[str, os.PathLike]


def resolve_path(path: PathLike, fix: str) -> Path:
    """``path`` absolute with every symlink followed; a path that cannot be resolved (a symlink
    loop, a NUL byte) is one line ending in ``fix``."""
    try:
        return Path(path).absolute().resolve()
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"{path!s}: cannot resolve the path ({error}); {fix}") from None


def check_location(out_path: Path, inputs: Iterable[PathLike]) -> None:
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
        raise UserError(
            f"{out_path}: the output folder overlaps the Hugging Face cache ({cache}); choose an output folder "
            "outside it"
        )


def _entries(folder: Path) -> List[str]:
    """Every file, link and folder under ``folder``, relative, '/'-separated (links not followed)."""
    found = []
    for root, folders, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        found += [(relative / name).as_posix() for name in folders + files]
    return sorted(found)


@dataclass(frozen=True)
class Manifest:
    """What an earlier output of ours says about itself: which command wrote it, whether it is
    a merge or a report, and every file written."""

    command: str
    kind: str
    files: List[str]

    def describe(self) -> str:
        return (
            f"a merge written by `mergekit-seed {self.command}`"
            if self.kind == MERGE
            else f"a `mergekit-seed {self.command}` report"
        )


# what a manifest written before commands were recorded held, by a file only that command writes
_LEGACY_REPORTS = {"compare.json": "compare", "analysis.json": "analyze", "results.json": "demo"}


def read_manifest(folder: Path) -> Optional[Manifest]:
    """The manifest of an earlier output of ours in ``folder``; None when it holds no readable
    manifest with a file list."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_json(folder / MANIFEST_NAME, "mergekit-seed manifest", within=folder)
    except UserError:
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    command, kind = manifest.get("command"), manifest.get("kind")
    if isinstance(command, str) and kind in (MERGE, REPORT):
        return Manifest(command, kind, files)
    legacy = next((command for name, command in _LEGACY_REPORTS.items() if name in files), None)
    return Manifest(legacy, REPORT, files) if legacy else Manifest("run", MERGE, files)


def written_files(folder: Path) -> Optional[List[str]]:
    """The files the manifest of an earlier output of ours in ``folder`` lists; None when it has none."""
    manifest = read_manifest(folder)
    return None if manifest is None else manifest.files


def foreign_entries(folder: Path) -> List[str]:
    """The entries of ``folder`` that no manifest of ours lists (every entry, when it has none)."""
    listed = set(written_files(folder) or ())
    ancestors = {parent.as_posix() for name in listed for parent in Path(name).parents}
    return [
        entry
        for entry in _entries(folder)
        if entry != MANIFEST_NAME and entry not in listed and entry not in ancestors
    ]


def _listing(entries: Sequence[str]) -> str:
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def _step(name: str) -> None:
    """A point between two file-system steps of the protocol; the fault-injection test kills
    the process here (``tests/test_output.py``). Does nothing."""


# ------------------------------------------------------------------ the swap


def _exchange_function() -> Optional[Callable[[bytes, bytes], int]]:
    """glibc's ``renameat2`` (Linux 3.15+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return lambda a, b: function(at_fdcwd, a, at_fdcwd, b, rename_exchange)


_EXCHANGE = _exchange_function()


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step; False where the system or file system cannot (the caller
    then falls back to two journaled renames)."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this kernel or file system
        return False
    raise OSError(error, os.strerror(error), str(a))


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP back while a step that must finish runs (a publish, a
    clean-up); they are delivered when it has."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------ the folder


_LIVE_STAGING: Set[Path] = set()  # resolved staging folders of the OutputFolders open in this process


class OutputFolder:
    """One output folder, written under the protocol above. Use as a context manager::

        with OutputFolder(out, inputs, command="run") as output:
            write into output.staging (write_text, write_tensors, staged_path, ...)
            output.publish()

    Leaving the block without :meth:`publish` (an error, a signal) removes the staging folder,
    unless the publish itself was refused to keep a file we did not write (then the error names
    it). ``inputs`` are every local path the command reads; ``labels`` name some of them in
    what is published (:func:`mergekit_seed.public.public_text`; the others by their file or
    folder name). ``report``: OUT is a report, which replaces an earlier report of the same
    ``command`` without ``overwrite``; otherwise a merge, which replaces only an earlier merge,
    and only with ``overwrite``. ``wait``: wait for another run holding OUT instead of refusing
    (a cache). ``warn`` gets the line saying what a killed run's leftovers became.
    """

    def __init__(
        self,
        out: PathLike,
        inputs: Iterable[PathLike] = (),
        overwrite: bool = False,
        *,
        command: str = "merge",
        report: bool = False,
        labels: Optional[Dict[str, str]] = None,
        wait: bool = False,
        warn: Optional[Callable[[str], None]] = None,
    ):
        self.path = resolve_path(out, "choose another output folder")
        self.inputs = list(inputs)
        self.overwrite = overwrite or report
        self.command, self.kind = command, REPORT if report else MERGE
        self.labels = Labels.for_inputs(self.inputs, labels or {})
        self.wait = wait
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.staging = self.path.parent / f".{self.path.name}.partial-{secrets.token_hex(8)}"
        self._lock_path = self.path.parent / f".{self.path.name}.lock"
        self._lock_fd: Optional[int] = None
        self._keep_staging = False
        self._published = False
        self._replaces_earlier = False  # OUT held an earlier output of ours when the run began
        self._handlers: Dict[int, Any] = {}
        self._staging_root: Optional[Path] = None

    def __enter__(self) -> "OutputFolder":
        check_location(self.path, self.inputs)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a folder; choose another output path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})"
            ) from None
        self._lock()
        try:
            self._check_existing()
            self._journal(staging=self.staging.name)
            _step("journal")
            self._catch_signals()
            self.staging.mkdir()
            self._staging_root = self.staging.resolve()
            _LIVE_STAGING.add(self._staging_root)
            _step("staged")
        except OSError as error:
            self.__exit__()
            raise UserError(
                f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})"
            ) from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        with _signals_blocked():
            try:
                _LIVE_STAGING.discard(self._staging_root)
                if not self._keep_staging and not self._published:
                    shutil.rmtree(self.staging, ignore_errors=True)
            finally:
                self._release_signals()
                self._unlock()

    # --- signals

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP end the run through ``SystemExit`` (Ctrl-C through
        ``KeyboardInterrupt``, as always), so that leaving the block removes the staging folder."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.SIG_DFL and current is not signal.default_int_handler:
                continue  # a program that handles Ctrl-C itself keeps doing so
            if current is signal.SIG_IGN:
                continue
            self._handlers[signum] = signal.signal(
                signum, _terminate if signum != signal.SIGINT else signal.default_int_handler
            )

    def _release_signals(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()

    # --- the lock and its journal

    def _open_lock(self) -> int:
        try:
            fd = os.open(
                self._lock_path,
                os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                0o644,
            )
        except OSError as error:
            if os.path.islink(self._lock_path):
                raise UserError(
                    f"{self._lock_path}: the lock file is a symbolic link, which is never written through; remove it"
                ) from None
            raise UserError(
                f"{self.path}: cannot create the output folder here ({error.strerror}: {error.filename})"
            ) from None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            os.close(fd)
            raise UserError(
                f"{self._lock_path}: the lock file is not a plain file of its own (it has other hard links or is a "
                "device); "
                "it is never written through: remove it"
            )
        return fd

    def _lock(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except OSError:
                holder = _holder(os.read(fd, 4096))
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
        self._lock_fd = fd
        self._recover(os.read(fd, 1 << 16))

    def _journal(self, **entries: Optional[str]) -> None:
        """Record this run and the folders it may leave behind in the lock file."""
        if self._lock_fd is None:
            return
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:2]) or "python"
        record = {"holder": f"{command}, pid {os.getpid()}, since {time.strftime('%H:%M:%S')}", **entries}
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, json.dumps(record).encode(), 0)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if os.stat(self._lock_path).st_ino == os.fstat(self._lock_fd).st_ino:
                os.unlink(self._lock_path)
        except OSError:
            pass
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    # --- a killed run's leftovers

    def _ours(self, name: Optional[str], kind: str) -> Optional[Path]:
        """The sibling ``name`` a journal records, if it is one of our staging or replaced folders."""
        if not isinstance(name, str) or "/" in name or not name.startswith(f".{self.path.name}.{kind}-"):
            return None
        path = self.path.parent / name
        return path if path.is_dir() and not path.is_symlink() else None

    def _recover(self, journal: bytes) -> None:
        """Clean what a killed owner of OUT left (the lock was free, so it is dead): restore OUT
        from a swap it did not finish, remove its staging folder; one line for each."""
        entries = _journal_entries(journal)
        if "pid" in entries:  # older versions named their folders by process id
            entries = {
                "staging": f".{self.path.name}.partial-{entries['pid']}",
                "replaced": f".{self.path.name}.replaced-{entries['pid']}",
            }
        if not entries:
            return
        with _signals_blocked():
            replaced = self._ours(entries.get("replaced"), "replaced")
            if replaced is not None and not os.path.lexists(self.path):
                os.rename(replaced, self.path)
                self.warn(
                    f"{self.path}: restored the earlier output from {replaced.name}, which a killed run left while "
                    "replacing it"
                )
            elif replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
                self.warn(
                    f"{self.path}: removed {replaced.name}, the earlier output a killed run had already replaced"
                )
            staging = self._ours(entries.get("staging"), "partial")
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
                self.warn(f"{self.path}: removed {staging.name}, the staging folder of a run that was killed")

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
            raise UserError(
                f"{self.path}: output folder is not empty; pass --overwrite (overwrite=True from Python) to replace it"
            )
        earlier = read_manifest(self.path)
        if earlier is None:
            raise UserError(
                f"{self.path}: --overwrite replaces only a previous mergekit-seed merge or report, and this folder "
                "holds "
                f"something else ({_listing(sorted(contents))}); remove it yourself or choose another output folder"
            )
        if (earlier.kind, earlier.command if earlier.kind == REPORT else MERGE) != (
            self.kind,
            self.command if self.kind == REPORT else MERGE,
        ):
            what = f"a `mergekit-seed {self.command}` report" if self.kind == REPORT else "a merge"
            raise UserError(
                f"{self.path}: holds {earlier.describe()}, which {what} never replaces; choose another output folder"
                + (" (or remove that one yourself)" if self.kind == REPORT else "")
            )
        foreign = foreign_entries(self.path)
        if foreign:
            raise UserError(
                f"{self.path}: --overwrite replaces only the files of the earlier output, and {_listing(foreign)} "
                "was not written by it; move that out of the folder first, or choose another output folder"
            )
        self._replaces_earlier = True

    # --- publishing

    def public(self, text: str) -> str:
        """``text`` as published here: through the provenance gate, with this folder's labels."""
        return public_text(text, self.labels)

    def resume_journal(self) -> "ResumeJournal":
        """This command's :class:`ResumeJournal` for OUT, opened under OUT's lock."""
        return ResumeJournal(self.path, self.command).open()

    def publish(self) -> Path:
        """Write the manifest, pass the text files through the provenance gate and move the
        staged output into place; returns OUT."""
        with _signals_blocked():
            self._write_manifest()
            _step("manifest")
            if self.path.is_dir() and os.listdir(self.path):
                if not self._replaces_earlier:  # absent or empty when the run began: all of it appeared since
                    self._refuse_foreign(_entries(self.path))
                self._replace_previous()
            else:
                self._rename_into_place()
            self._published = True
            _LIVE_STAGING.discard(self._staging_root)
        return self.path

    def _write_manifest(self) -> None:
        files = [entry for entry in _entries(self.staging) if not (self.staging / entry).is_dir()]
        for name in files:
            path = self.staging / name
            if path.suffix in TEXT_SUFFIXES and path.is_file() and not path.is_symlink():
                text = read_bytes(path, "text file", STAGED_TEXT_MAX_BYTES, within=self.staging).decode(
                    "utf-8", "surrogateescape"
                )
                public = public_text(text, self.labels)
                if public != text:
                    path.write_bytes(public.encode("utf-8", "surrogateescape"))
        manifest = {"mergekit_seed": __version__, "command": self.command, "kind": self.kind, "files": files}
        (self.staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    def _refuse_foreign(self, foreign: Sequence[str]) -> None:
        self._keep_staging = True
        raise UserError(
            f"{self.path}: {_listing(foreign)} appeared in the output folder during the run, and a file we did not "
            "write "
            f"is never deleted; the folder was left as it was, and the new output is in {self.staging}: move those "
            "files "
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
        _step("renamed")

    def _replace_previous(self) -> None:
        foreign = foreign_entries(self.path)
        if foreign:
            self._refuse_foreign(foreign)
        if exchange(self.staging, self.path):  # OUT is the new output, staging the earlier one
            _step("exchanged")
            foreign = foreign_entries(self.staging)  # a file may have appeared since the check above
            if foreign:
                exchange(self.staging, self.path)
                self._refuse_foreign(foreign)
            shutil.rmtree(self.staging, ignore_errors=True)
            _step("cleaned")
            return
        self._replace_by_renames()

    def _replace_by_renames(self) -> None:
        """The swap in two renames, journaled: a run killed between them leaves no OUT, and the
        next run restores the earlier output from the journal."""
        replaced = self.path.parent / f".{self.path.name}.replaced-{secrets.token_hex(8)}"
        self._journal(staging=self.staging.name, replaced=replaced.name)
        os.rename(self.path, replaced)
        _step("moved-aside")
        foreign = foreign_entries(replaced)  # a file may have appeared since the check above
        if foreign:
            os.rename(replaced, self.path)
            self._refuse_foreign(foreign)
        try:
            os.rename(self.staging, self.path)
        except OSError:
            os.rename(replaced, self.path)
            raise
        _step("renamed")
        shutil.rmtree(replaced, ignore_errors=True)
        _step("cleaned")


RESUME_MARKER = "resume.json"
_RESUME_ENTRY = re.compile(r"[0-9a-f]{64}\.json")
_RESUME_PARTIAL = re.compile(r"\.(?:[0-9a-f]{64}\.json|resume\.json)\.[0-9a-f]{8}\.tmp")


class ResumeJournal:
    """Work ``command`` finished for OUT, kept beside it in ``.OUT.resume`` until OUT is
    published, so that the same command run again after a crash, a SIGKILL or Ctrl-C does none
    of it again. One JSON object per piece of work, named by a key the caller derives from
    everything the work depends on (a sha256), written to a temporary file and renamed into
    place (an entry is whole or absent), read back through the one reader. The folder counts as
    ours only with our marker for ``command`` in it and nothing but entries beside it; anything
    else is refused in one line and never deleted. :meth:`discard` removes it once OUT is
    published. ``reused`` counts the entries read back."""

    def __init__(self, out: Path, command: str):
        self.path = out.parent / f".{out.name}.resume"
        self.command = command
        self.reused = 0

    def open(self) -> "ResumeJournal":
        if not os.path.lexists(self.path):
            self.path.mkdir()
            self._write(RESUME_MARKER, {"mergekit_seed": __version__, "command": self.command})
            return self
        if self.path.is_symlink() or not self.path.is_dir():
            raise UserError(f"{self.path}: not a folder of ours (a link or a file); move it away and run again")
        names = os.listdir(self.path)
        strays = [n for n in names if n != RESUME_MARKER and not _RESUME_ENTRY.fullmatch(n)]
        partial = [n for n in strays if _RESUME_PARTIAL.fullmatch(n)]  # an entry a killed run was writing
        strays = [n for n in strays if n not in partial]
        for name in partial:
            os.unlink(self.path / name)
        if not strays and RESUME_MARKER not in names:  # killed before its marker was written: empty
            self._write(RESUME_MARKER, {"mergekit_seed": __version__, "command": self.command})
            return self
        try:
            marker = read_json(self.path / RESUME_MARKER, "resume marker", within=self.path)
        except UserError:
            marker = None
        if strays or not isinstance(marker, dict) or marker.get("command") != self.command:
            found = _listing(strays) if strays else f"no {self.command} marker"
            raise UserError(f"{self.path}: not {self.command}'s finished work ({found}); move it away and run again")
        return self

    def get(self, key: str) -> Optional[dict]:
        """The entry ``key`` (a sha256), or None when there is none (or it cannot be read: the
        work is then done again)."""
        entry = self.path / f"{key}.json"
        if not _RESUME_ENTRY.fullmatch(entry.name) or not os.path.lexists(entry):
            return None
        try:
            data = read_json(entry, "resume entry", within=self.path)
        except UserError:
            return None
        if not isinstance(data, dict):
            return None
        self.reused += 1
        return data

    def put(self, key: str, data: dict) -> None:
        """Record ``data`` (JSON, finite numbers) as the entry ``key``."""
        if not _RESUME_ENTRY.fullmatch(f"{key}.json"):
            raise ValueError(f"{key!r}: a resume entry's key is a sha256 in hexadecimal")
        self._write(f"{key}.json", data)

    def _write(self, name: str, data: dict) -> None:
        temporary = self.path / f".{name}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(temporary, flags, 0o644), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, allow_nan=False))
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, self.path / name)

    def discard(self) -> None:
        """Remove the journal (once OUT is published: its work is in OUT's record)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """At the end of a run that did not publish: keep the journal if it holds work, remove it
        if it holds none (a run stopped before its first entry leaves nothing behind)."""
        if self.path.is_dir() and not self.path.is_symlink():
            if not [name for name in os.listdir(self.path) if _RESUME_ENTRY.fullmatch(name)]:
                self.discard()


def _holder(journal: bytes) -> str:
    """Who holds a lock, from its journal (or the plain line older versions wrote)."""
    text = journal.decode("utf-8", "replace").strip()
    try:
        record = json.loads(text)
    except ValueError:
        return text or "another process"
    return str(record.get("holder", "another process")) if isinstance(record, dict) else "another process"


def _journal_entries(journal: bytes) -> Dict[str, str]:
    """{"staging": name, "replaced": name} from a dead run's lock file; older versions wrote
    ``COMMAND, pid PID, since HH:MM:SS`` and named their folders ``.OUT.partial-PID``."""
    text = journal.decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        pid = text.partition(", pid ")[2].partition(",")[0]
        return {"pid": pid} if pid.isdigit() else {}
    return (
        {key: value for key, value in record.items() if key in ("staging", "replaced") and isinstance(value, str)}
        if isinstance(record, dict)
        else {}
    )


def local_paths(names: Iterable[Optional[PathLike]]) -> List[Path]:
    """The names among ``names`` that are local files or folders (not Hub ids, not None): the
    inputs a report (``compare``, ``analyze``) reads from disk."""
    return [Path(name) for name in names if name is not None and Path(name).exists()]


# ------------------------------------------------------------------ writing inside staging


def staged_path(path: PathLike) -> Path:
    """``path``, which must lie inside the staging folder of an :class:`OutputFolder` open in
    this process: the only paths anything of ours writes to (``RuntimeError`` otherwise, a bug)."""
    resolved = Path(path).absolute().resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in _LIVE_STAGING):
        raise RuntimeError(
            f"{path}: not inside an open output folder's staging; every write goes through output.OutputFolder"
        )
    return Path(path)


def make_folder(path: PathLike) -> Path:
    """``path`` (and its parents) created inside staging."""
    path = staged_path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path: PathLike, text: str) -> Path:
    """``text`` written as UTF-8 to ``path`` inside staging (parents created)."""
    path = make_folder(Path(path).parent) / Path(path).name
    path.write_text(text, encoding="utf-8")
    return path


def write_tensors(path: PathLike, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> Path:
    """A safetensors file at ``path`` inside staging."""
    from safetensors.torch import save_file

    path = make_folder(Path(path).parent) / Path(path).name
    save_file(tensors, path, metadata=metadata)
    return path


def copy_file(source: PathLike, path: PathLike, within: Optional[PathLike] = None) -> Path:
    """A copy of ``source`` (read through the one reader: a regular file, inside ``within``) at
    ``path`` inside staging."""
    path = make_folder(Path(path).parent) / Path(path).name
    with open_file(source, within) as reader, open(path, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
    shutil.copystat(source, path)
    return path


def move(source: PathLike, path: PathLike) -> Path:
    """Rename ``source`` to ``path``, both inside staging."""
    os.rename(staged_path(source), make_folder(Path(path).parent) / Path(path).name)
    return Path(path)


def remove(path: PathLike) -> None:
    """Remove a file or folder inside staging (nothing when it is not there)."""
    path = staged_path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def scratch_folder(prefix: str = "mergekit-seed-") -> Iterator[Path]:
    """A temporary folder in the system's temp folder that the write helpers accept (for files
    a library writes and we read back, such as lm-eval's), removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    root = folder.resolve()
    _LIVE_STAGING.add(root)
    try:
        yield folder
    finally:
        _LIVE_STAGING.discard(root)
        shutil.rmtree(folder, ignore_errors=True)


def copy_tree(source: PathLike, path: PathLike) -> Path:
    """A copy of the folder ``source`` (an earlier output of ours, files read through the one
    reader) at ``path`` inside staging."""
    source = Path(source)
    for entry in _entries(source):
        if (source / entry).is_dir():
            make_folder(Path(path) / entry)
        else:
            copy_file(source / entry, Path(path) / entry, within=source)
    return Path(path)

"""Hugging Face Hub inputs: resolved through huggingface_hub's cache-aware calls, pinned to commits.

A recipe may name any input by Hub id (``org/name`` or ``org/name@revision``). Before a merge
every such id is resolved with ``snapshot_download``, which honours ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``/``HF_HOME`` and ``HF_TOKEN`` and, offline, serves the cached snapshot; the
merge then reads the snapshot folders (stock mergekit asks the Hub for a file list first,
which fails offline). The commit each id resolved to and the sha256 of its weight files are
recorded in the model card, so that a reproduction reads the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mergekit_seed.errors import UserError
from mergekit_seed.references.weights import weight_file_hashes


# what a merge reads from a model or adapter repository (no code: remote code stays off)
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class HubInput:
    """A Hub id as the recipe names it, the commit it resolved to, and its snapshot folder."""

    reference: str
    repo_id: str
    commit: str
    folder: Path


def has_hub_id_form(path: str) -> bool:
    """Whether ``path`` is written as a Hub repository id (``org/name``, no revision): one
    slash, not starting with ``/``, ``.`` or ``~``. Decided from the text alone; a local path
    may have this form too (:func:`is_hub_id`)."""
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and "\0" not in path and "\n" not in path


def is_hub_id(path: str) -> bool:
    """A Hugging Face Hub repository id (``org/name``) rather than a local path; decided offline."""
    return has_hub_id_form(path) and not Path(path).exists()


def split_revision(reference: str) -> Tuple[str, Optional[str]]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@``: revision None (``main``)."""
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or None


def _one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resolve(reference: str, revision: Optional[str] = None) -> HubInput:
    """Download (or, offline, find in the cache) ``reference`` at ``revision`` (default: the
    one the reference names, else ``main``); a missing repo, revision or cache entry is one line."""
    repo_id, named = split_revision(reference)
    wanted = revision or named
    where = f"{repo_id}@{wanted}" if wanted else repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=wanted, allow_patterns=PATTERNS))
        if not any(folder.glob("*.safetensors")):  # PyTorch checkpoints only: take the .bin files
            folder = Path(snapshot_download(repo_id, revision=wanted, allow_patterns=PATTERNS + ["*.bin"]))
    except RevisionNotFoundError:
        raise UserError(f"{where}: the Hub repository has no revision {wanted}") from None
    except GatedRepoError:
        raise UserError(f"{where}: a gated repository; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no such Hub repository (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        offline = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        raise UserError(f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}){offline}") from None
    except Exception as error:  # network and filesystem errors of many types
        raise UserError(f"{where}: cannot be fetched from the Hub ({_one_line(error)})") from None
    return HubInput(reference=reference, repo_id=repo_id, commit=folder.name, folder=folder)


class HubNotChecked(Exception):
    """The Hub could not be asked about a reference (no network, a timeout); the message says why."""


HUB_CHECK_TIMEOUT_S = 10


def hub_problem(reference: str) -> Optional[str]:
    """Why a Hub id cannot be used, checked without downloading weights: offline, whether its
    config is in the cache; online, whether the repository exists at the revision. None when
    fine; raises :class:`HubNotChecked` when the Hub cannot be asked."""
    repo_id, revision = split_revision(reference)
    where = f"{repo_id}@{revision}" if revision else repo_id
    cached = any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
        for name in ("config.json", "adapter_config.json")
    )
    if cached:
        return None
    if constants.HF_HUB_OFFLINE:
        return f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_CHECK_TIMEOUT_S)
    except RevisionNotFoundError:
        return f"{where}: the Hub repository has no revision {revision}"
    except RepositoryNotFoundError:
        return f"{where}: no such Hub repository (or it is private: set HF_TOKEN)"
    except Exception as error:  # no network, a timeout, a server error
        raise HubNotChecked(f"{where}: the Hub could not be asked ({_one_line(error)[:160]})") from None
    return None


def local_folder(reference: str) -> Path:
    """An existing local path as it is, or a Hub id's snapshot folder (:func:`resolve`); a
    reference that is neither is one line."""
    if Path(reference).exists():
        return Path(reference)
    if is_hub_id(split_revision(reference)[0]):
        return resolve(reference).folder
    raise UserError(f"{reference}: no such folder (nor a Hub id)")


def download_file(repo_id: str, filename: str, revision: Optional[str] = None) -> Path:
    """One file of a Hub repository (a model card), through the cache; one line if missing."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as error:
        raise UserError(f"{where}: cannot read {filename} ({_one_line(error)})") from None


def hub_provenance(inputs: List[HubInput]) -> Dict[str, Dict[str, Any]]:
    """{repo id: {"revision": commit, "files": {weight file: sha256}}} for the model card."""
    return {entry.repo_id: {"revision": entry.commit, "files": weight_file_hashes(entry.folder)} for entry in inputs}


def verify_hub_inputs(recorded: Dict[str, Dict[str, Any]], named: Optional[List[str]] = None) -> List[str]:
    """One line per recorded Hub input that cannot be had at its commit or whose files differ.
    With ``named`` (the repo ids the card's recipe names), a recorded repository outside it is
    refused before anything is downloaded: a card is untrusted input."""
    problems = []
    for repo_id, entry in recorded.items():
        if named is not None and repo_id not in named:
            problems.append(f"{repo_id}: the card records this Hub input, but its recipe does not name it; refused")
            continue
        if not isinstance(entry, dict) or not entry.get("revision"):
            problems.append(f"{repo_id}: the card records no revision for this Hub input")
            continue
        try:
            folder = resolve(repo_id, str(entry["revision"])).folder
        except UserError as error:
            problems.append(str(error))
            continue
        actual = weight_file_hashes(folder)
        for name, digest in (entry.get("files") or {}).items():
            if name not in actual:
                problems.append(f"{repo_id}@{entry['revision']}: {name} is missing")
            elif actual[name] != digest:
                problems.append(f"{repo_id}@{entry['revision']}: {name} has changed (sha256 differs from the card)")
    return problems

"""The provenance gate: what a published text file may say about the machine that wrote it.

Every text file an output folder publishes (cards, ``select.json``/``.md``, reports,
``mergekit_config.yml``, the ``config.json`` and tokenizer files mergekit copies from an input)
passes through :func:`public_text` when :class:`~mergekit_seed.output.OutputFolder` publishes
it, so nothing we write, and nothing a library writes for us, goes out with:

- a local input's path: it becomes the input's label (``input0``, a seed's folder name), and
  any other absolute path of a file or folder on this machine its last component;
- a path into the Hugging Face cache: it becomes the repository id;
- a local path under ``name_or_path``, ``_name_or_path`` or ``base_model_name_or_path`` in a
  JSON file (transformers and PEFT record where a model was loaded from): its label, else its
  last component;
- the home folder: it becomes ``~``;
- a URL's user name, password, token, query string or fragment (:func:`public_url`);
- the value of an environment variable whose name says it is a secret (``HF_TOKEN``, ``*_KEY``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from huggingface_hub import constants


TEXT_SUFFIXES = frozenset({".md", ".json", ".jsonl", ".yml", ".yaml", ".txt", ".jinja", ".csv"})
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.IGNORECASE)
REDACTED = "<redacted>"
NAME_CHARACTERS = r"\w.\-"  # what continues a path component: a match must end where a component does
URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s\"'<>()\[\]`]+")
CACHE_SNAPSHOT = re.compile(r"models--([^/\s\"'`]+?)--([^/\s\"'`]+)/snapshots/[0-9a-f]{6,64}(?:/[^\s\"'`]*)?")
PATH_KEYS = re.compile(r'"(_?name_or_path|base_model_name_or_path)"(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def public_url(url: str) -> str:
    """``url`` without what must never be published: credentials (``user:token@``; a token
    may stand alone where the user name goes), the query string and the fragment
    (``https://u:t@host/x.git?tok=1`` -> ``https://host/x.git``). An ssh remote keeps its user
    name (``git``), which is no secret and which ssh needs; an scp-like remote
    (``git@host:org/x``) is written as the ``ssh://`` URL pip reads."""
    if "://" not in url and ":" in url:  # scp-like syntax: [user@]host:path
        host, _, path = url.partition(":")
        url = f"ssh://{host}/{path.lstrip('/')}"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.scheme.endswith("ssh") and parts.username and parts.password is None:
        netloc = f"{parts.username}@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _path_forms(path: Union[str, os.PathLike]) -> List[str]:
    """The spellings of a local path a file may hold: absolute as given, and with links followed."""
    forms = {os.path.abspath(path)}
    try:
        forms.add(str(Path(path).resolve()))
    except (OSError, RuntimeError, ValueError):
        pass
    return [form.rstrip("/") for form in forms if len(form.rstrip("/")) > 1]


@dataclass(frozen=True)
class Labels:
    """(absolute path, label) pairs, longest path first, so that a folder inside another input
    gets its own label."""

    pairs: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def for_inputs(cls, inputs: Iterable[Union[str, os.PathLike]], labels: Dict[str, str]) -> "Labels":
        """``labels`` ({path: label}) for the paths they name; every other input by its file or
        folder name (``inputN`` where two share a name)."""
        chosen = {form: label for path, label in labels.items() for form in _path_forms(path)}
        others = [path for path in inputs if not set(_path_forms(path)) & set(chosen)]
        names = [Path(os.path.abspath(path)).name for path in others]
        for index, (path, name) in enumerate(zip(others, names)):
            label = name if name and names.count(name) == 1 else f"input{len(labels) + index}"
            chosen.update({form: label for form in _path_forms(path) if form not in chosen})
        return cls(tuple(sorted(chosen.items(), key=lambda pair: -len(pair[0]))))

    def label_of(self, path: str) -> str:
        """The label of a local ``path``: an input's (with the rest of the path), else its last component."""
        for form, label in self.pairs:
            if path == form or path.startswith(form + "/"):
                return label + path[len(form) :]
        return Path(path.rstrip("/")).name or path


# where a path ends: not before a name character, nor before a full stop that a name character follows
PATH_END = r"(?![\w\-]|\.[\w\-])"
ABSOLUTE_PATH = re.compile(r"(?<![\w.\-~/:@])/[\w.\-~+@]+(?:/[\w.\-~+@]+)*" + PATH_END)


def _replace_prefix(text: str, prefix: str, label: str) -> str:
    pattern = rf"(?<![{NAME_CHARACTERS}/~]){re.escape(prefix)}{PATH_END}"
    return re.sub(pattern, lambda _match: label, text)


def _existing_path(match: "re.Match[str]", labels: Labels) -> str:
    path = match.group(0)
    try:
        exists = os.path.exists(path)
    except (OSError, ValueError):
        exists = False
    return labels.label_of(path) if exists and path.count("/") > 1 else path


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or (os.sep in value and os.path.exists(value))


def _path_key(match: "re.Match[str]", labels: Labels) -> str:
    key, colon, raw = match.groups()
    try:
        value = json.loads(f'"{raw}"')
    except ValueError:
        return match.group(0)
    if not isinstance(value, str) or not _looks_local(value):
        return match.group(0)
    path = os.path.abspath(os.path.expanduser(value))
    snapshot = _cache_snapshot().match(path)
    public = f"{snapshot.group(1)}/{snapshot.group(2)}" if snapshot else labels.label_of(path)
    return f'"{key}"{colon}{json.dumps(public)}'


def _cache_snapshot() -> "re.Pattern[str]":
    return re.compile(re.escape(os.path.abspath(constants.HF_HUB_CACHE)) + "/" + CACHE_SNAPSHOT.pattern)


def _public_url_match(match: "re.Match[str]") -> str:
    url = match.group(0)
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" not in netloc and "?" not in url and "#" not in url:
        return url
    return public_url(url)


def secrets_in_environment() -> List[str]:
    """Values of environment variables whose names say they are secrets (8 characters or more)."""
    return sorted(
        {value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 8},
        key=len,
        reverse=True,
    )


def public_text(text: str, labels: Labels = Labels()) -> str:
    """``text`` with local paths, cache paths, credentials and secrets replaced (module docstring)."""
    text = PATH_KEYS.sub(lambda match: _path_key(match, labels), text)
    for form, label in labels.pairs:
        if form in text:
            text = _replace_prefix(text, form, label)
    if "snapshots/" in text:
        text = _cache_snapshot().sub(lambda match: f"{match.group(1)}/{match.group(2)}", text)
    if "://" in text:
        text = URL.sub(_public_url_match, text)
    text = ABSOLUTE_PATH.sub(lambda match: _existing_path(match, labels), text)
    for secret in secrets_in_environment():
        text = text.replace(secret, REDACTED)
    home = os.path.expanduser("~").rstrip("/")
    if len(home) > 1 and home in text:
        text = _replace_prefix(text, home, "~")
    return text

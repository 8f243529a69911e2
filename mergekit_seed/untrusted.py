"""Bounded parsing of untrusted text: the one place where files other tools (or other people)
wrote are parsed.

- JSON files are read with a size bound, and nesting too deep for Python's parser is one line.
- A model card's front matter and its Configuration block are found by scanning lines, never
  by a regular expression that can backtrack over the whole card.
- Regular expressions a user supplies (PEFT's ``rank_pattern`` and ``alpha_pattern`` keys) are
  compiled with a one-line error and matched under a time bound, with PEFT's own semantics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, List, Optional

import regex

from mergekit_seed.errors import UserError

JSON_MAX_BYTES = 64 << 20  # config, index and results files are kilobytes; lm-eval samples files are read by line
PATTERN_SECONDS = 1.0  # a PEFT pattern matches a module name in microseconds; a second means it backtracks


def read_json(path: Path, what: str = "JSON file", max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The parsed JSON of ``path``; a file past ``max_bytes``, unreadable, not UTF-8, not JSON or
    nested past Python's recursion limit is one line naming it and ``what`` it should be."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{path}: {size:,} bytes is too large for a {what} (at most {max_bytes:,})")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; not a {what}") from None
    return parse_json(text, f"{path}", what)


def parse_json(text: str, origin: str, what: str = "JSON") -> Any:
    """``text`` parsed as JSON; malformed or too deeply nested JSON is one line naming ``origin``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{origin}: JSON nested too deeply for a {what}") from None
    except ValueError as error:
        raise UserError(f"{origin}: not valid JSON ({str(error).splitlines()[0]}); not a {what}") from None


def read_json_object(path: Path, what: str) -> dict:
    """:func:`read_json`, which must give a JSON object (one line naming the file if not)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object (a {what}), not a {type(data).__name__}")
    return data


def front_matter(text: str) -> Optional[str]:
    """The YAML between a card's opening ``---`` line and the next ``---`` line; None if the
    card does not start with one, or never closes it."""
    lines = text.split("\n")
    if not lines or lines[0].rstrip("\r") != "---":
        return None
    for index, line in enumerate(lines[1:], start=1):
        if line.rstrip("\r") == "---":
            return "\n".join(lines[1:index])
    return None


def fenced_block(text: str, heading: str, language: str) -> Optional[str]:
    """The first fenced ``language`` code block after the first line starting with ``heading``
    (a card's ``### Configuration``), without its fences; None if there is none."""
    lines: Iterable[str] = iter(text.split("\n"))
    for line in lines:
        if line.startswith(heading):
            break
    else:
        return None
    for line in lines:
        if line.rstrip("\r") == f"```{language}":
            break
    else:
        return None
    block: List[str] = []
    for line in lines:
        if line.startswith("```"):
            return "".join(part + "\n" for part in block)
        block.append(line)
    return None


def names_module(name: str, entry: str) -> bool:
    """PEFT's rule for a plain (not regular-expression) entry of a module list
    (``target_modules``, ``modules_to_save``, ``target_parameters``, the keys of
    ``trainable_token_indices``): ``name`` is the entry itself or ends with ``.entry``."""
    return name == entry or name.endswith("." + entry)


def pattern_key(patterns: Iterable[str], module: str, where: str) -> Optional[str]:
    """The first key of ``patterns`` that PEFT's ``get_pattern_key`` would pick for ``module``
    (``re.match(rf"(.*\\.)?({key})$", module)``), or None. A key that is not a regular
    expression, or takes more than ``PATTERN_SECONDS`` to match, is one line naming ``where``."""
    for key in patterns:
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_SECONDS):
                return key
        except regex.error as error:
            raise UserError(f"{where}: key {key!r} is not a valid regular expression ({error}); fix or remove it") from None
        except TimeoutError:
            raise UserError(
                f"{where}: key {key!r} takes more than {PATTERN_SECONDS:g} s to match {module} (a regular expression "
                "that backtracks without end); write it without nested repetition"
            ) from None
    return None

"""Bounded parsing of untrusted text: the one place where files other tools (or other people)
wrote are parsed (:mod:`mergekit_seed.reader` reads them, with a size bound).

- Nesting too deep for Python's JSON parser is one line.
- YAML is parsed with the safe loader, and aliases that expand past a bound are refused.
- A model card's front matter and its Configuration block are found by scanning lines, never
  by a regular expression that can backtrack over the whole card.
- Regular expressions a user supplies (PEFT's ``rank_pattern`` and ``alpha_pattern`` keys) are
  compiled with a one-line error and matched under a time bound, with PEFT's own semantics.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional

import regex
import yaml

from mergekit_seed.errors import UserError


PATTERN_SECONDS = 1.0  # a PEFT pattern matches a module name in microseconds; a second means it backtracks


def parse_json(text: str, origin: str, what: str = "JSON") -> Any:
    """``text`` parsed as JSON; malformed or too deeply nested JSON is one line naming ``origin``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{origin}: JSON nested too deeply for a {what}") from None
    except ValueError as error:
        raise UserError(f"{origin}: not valid JSON ({str(error).splitlines()[0]}); not a {what}") from None


# Bounds on what a recipe (or any YAML we parse) may be: a real one is a few kilobytes. YAML
# aliases can make a few hundred bytes expand into billions of values (an "alias bomb").
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many YAML nodes ``node`` stands for once every alias is expanded (stops past ``limit``)."""
    sizes: Dict[int, int] = {}

    def size(current: yaml.Node) -> int:
        if id(current) in sizes:
            return sizes[id(current)]
        total = 1
        if isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = current.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(current)] = total
        return total

    return size(node)


def bounded_safe_load(source: str, origin: str) -> Any:
    """``yaml.safe_load`` (the C loader when installed), refusing alias expansion past
    :data:`MAX_YAML_VALUES` values."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise UserError(
                f"{origin}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; write the recipe out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(source: str, origin: str) -> Any:
    """:func:`bounded_safe_load` of ``source``, a syntax error as one line naming ``origin`` and the line."""
    try:
        return bounded_safe_load(source, origin)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{origin}:{where} YAML syntax error: {problem}") from None


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
            raise UserError(
                f"{where}: key {key!r} is not a valid regular expression ({error}); fix or remove it"
            ) from None
        except TimeoutError:
            raise UserError(
                f"{where}: key {key!r} takes more than {PATTERN_SECONDS:g} s to match {module} (a regular expression "
                "that backtracks without end); write it without nested repetition"
            ) from None
    return None

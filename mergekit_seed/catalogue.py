"""The shipped recipes (``recipes/``: the papers' settings and the demo's), listed and shown."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Dict, Optional

import yaml

from mergekit_seed.errors import UserError
from mergekit_seed.reader import read_text
from mergekit_seed.untrusted import bounded_safe_load


DEMO_PLACEHOLDER = "${DEMO_MODELS}"


def shipped_recipes_dir() -> Path:
    """``recipes/`` as package data (wheel), or the checkout's top-level folder (editable)."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "recipes"


def shipped_recipes() -> Dict[str, Path]:
    return {path.stem: path for path in sorted(shipped_recipes_dir().glob("*.yml"))}


def shipped_recipe_text(name: str, models: Optional[str] = None) -> str:
    """A shipped recipe's text, with ``${DEMO_MODELS}`` replaced by ``models`` when given."""
    recipes = shipped_recipes()
    if name not in recipes:
        suggestion = difflib.get_close_matches(name, list(recipes), n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        raise UserError(f"no shipped recipe named '{name}'{hint}; `mergekit-seed recipes` lists them")
    text = read_text(recipes[name], "recipe")
    if models is not None:
        folder = str(Path(models).absolute())
        text = re.sub(re.escape(DEMO_PLACEHOLDER) + r"(\S*)", lambda match: yaml_scalar(folder + match.group(1)), text)
    return text


def yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as exactly ``value``: plain when it does, else
    double-quoted (a ``#``, a newline or a leading ``*`` stays part of the path, never YAML)."""
    try:
        if "\n" not in value and bounded_safe_load(f"key: {value}", "a folder name") == {"key": value}:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def recipe_summary(path: Path) -> str:
    """The first line of a shipped recipe's comment block (its one-line summary)."""
    first = read_text(path, "recipe").splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""

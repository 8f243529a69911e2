"""Recipe loading and up-front validation for our methods.

A recipe is a mergekit YAML file. :func:`load_recipe` parses it safely and checks it
against mergekit's schema; :func:`check_recipe` checks what mergekit only finds out
mid-merge (method, base model, seed count, every parameter's type and range) and
returns every problem as one line.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

import yaml
from pydantic import ValidationError


class RecipeError(Exception):
    """A user error in a recipe; the message is one line naming the file or parameter."""


def load_recipe(path: str) -> Tuple[Any, str]:
    """Parse ``path`` as a mergekit recipe; returns (MergeConfiguration, YAML text)."""
    from mergekit.config import MergeConfiguration

    try:
        source = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"{path}: cannot read recipe ({error.strerror})") from None
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}:{where} YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with merge_method and models")
    try:
        config = MergeConfiguration.model_validate(data)
    except ValidationError as error:
        raise RecipeError(f"{path}: {format_validation_error(error)}") from None
    return config, source


def format_validation_error(error: ValidationError) -> str:
    """One line for the first problem pydantic found."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", str(error))
    return f"{location}: {message}" if location else message


def _scalar_leaves(setting: Any) -> Iterable[Any]:
    """The scalar values of a mergekit parameter setting (scalar, gradient or filters)."""
    if isinstance(setting, list):
        for item in setting:
            yield from _scalar_leaves(item)
    elif hasattr(setting, "value") and hasattr(setting, "filter"):
        yield from _scalar_leaves(setting.value)
    else:
        yield setting


def _check_parameters(method: Any, settings: Optional[dict], where: str) -> List[str]:
    problems: List[str] = []
    specs = {p.name: p for p in method.spec.parameters}
    for name, setting in (settings or {}).items():
        spec = specs.get(name)
        if spec is None:
            suggestion = difflib.get_close_matches(name, list(specs), n=1)
            hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
            known = ", ".join(sorted(specs)) or "none"
            problems.append(
                f"{where}: unknown parameter '{name}' for {method.spec.name}{hint}; known: {known}"
            )
            continue
        for value in _scalar_leaves(setting):
            if value is None:
                continue
            try:
                spec.validate(value)
            except ValidationError as error:
                message = error.errors()[0].get("msg", "invalid value")
                problems.append(f"{where}: parameter '{name}' = {value!r}: {message}")
    return problems


def check_recipe(config: Any, path: str = "recipe") -> List[str]:
    """Every problem with a parsed recipe, one line each; empty when it can run."""
    from mergekit import merge_methods

    import mergekit_seed

    mergekit_seed.register()
    try:
        method = merge_methods.get(config.merge_method)
    except RuntimeError:
        names = [m.spec.name for m in merge_methods.registered_methods()]
        suggestion = difflib.get_close_matches(config.merge_method, names, n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        return [f"{path}: unknown merge_method '{config.merge_method}'{hint}"]

    problems = _check_parameters(method, config.parameters, f"{path}: parameters")
    for index, model in enumerate(config.models or []):
        problems += _check_parameters(
            method, model.parameters, f"{path}: models[{index}] ({model.model}) parameters"
        )

    contract = method.spec.contract
    from mergekit.merge_methods.base import BasePolicy

    if config.models:
        base = config.base_model
        seeds = [m for m in config.models if base is None or m.model != base]
        if contract.base == BasePolicy.REQUIRED and base is None:
            problems.append(
                f"{path}: {config.merge_method} needs base_model (the checkpoint the seeds were fine-tuned from)"
            )
        minimum = contract.min_non_base if contract.min_non_base is not None else contract.min_inputs
        if len(seeds) < minimum:
            problems.append(
                f"{path}: {config.merge_method} needs at least {minimum} seed models under models:, got {len(seeds)}"
            )
        check = getattr(method, "parameter_problems", None)
        if check is not None:
            scalars = {
                name: value
                for name, value in (config.parameters or {}).items()
                if isinstance(value, (int, float, str, bool))
            }
            problems += [f"{path}: {line}" for line in check(scalars, len(seeds))]
    return problems

"""``select``'s candidates: which methods, which grid of their parameters, and each
candidate's recipe (our methods' grids come from their specs, :data:`mergekit_seed.methods.METHODS`)."""

from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from mergekit_seed.errors import RecipeProblems, UserError
from mergekit_seed.methods import our_method_names, our_methods
from mergekit_seed.recipe import parse_mapping, parse_recipe, read_recipe_text
from mergekit_seed.references.adapter_files import is_adapter_folder, peft_type, read_adapter_config
from mergekit_seed.references.hub import is_hub_id, local_folder
from mergekit_seed.references.sera_layer import PEFT_TYPE as SERA_TYPE
from mergekit_seed.validation import check_recipe


# mergekit's own methods select can try (ours come from methods.METHODS), the ones it tries by
# default, and their default grid
MERGEKIT_METHODS = ("linear", "ties", "dare_ties")


MERGEKIT_DEFAULTS = ("linear", "ties")


MERGEKIT_GRID: Dict[str, Dict[str, List[Any]]] = {"ties": {"density": [0.5]}, "dare_ties": {"density": [0.5]}}


def our_method(name: str) -> Optional[Any]:
    """Our method called ``name`` (its spec object, :mod:`mergekit_seed.methods`), or None."""
    return next((method for method in our_methods() if method.spec.name == name), None)


def default_methods() -> Tuple[str, ...]:
    return our_method_names() + MERGEKIT_DEFAULTS


def default_grid() -> Dict[str, Dict[str, List[Any]]]:
    """Each method's default values to try: ours from their specs' ``select_grid``, mergekit's
    from :data:`MERGEKIT_GRID`."""
    ours = {method.spec.name: {k: list(v) for k, v in method.select_grid.items()} for method in our_methods()}
    return {**{name: grid for name, grid in ours.items() if grid}, **MERGEKIT_GRID}


@dataclass(frozen=True)
class Candidate:
    """One merge to try: a method and the recipe-level parameters of one grid point."""

    method: str
    parameters: Tuple[Tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        settings = " ".join(f"{key}={value}" for key, value in self.parameters)
        return f"{self.method} {settings}".strip()


def read_grid(path: Path) -> Dict[str, Dict[str, List[Any]]]:
    """``--grid``: ``{method: {parameter: [values]}}`` (a single value counts as a list of one);
    every entry that is not is one line, all at once."""
    data = parse_mapping(read_recipe_text(str(path)), str(path))
    grid: Dict[str, Dict[str, List[Any]]] = {}
    problems = []
    for method, settings in data.items():
        if not isinstance(settings, dict):
            problems.append(f"{path}: {method}: give a mapping of parameter: [values]")
            continue
        grid[str(method)] = {}
        for parameter, values in settings.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                problems.append(f"{path}: {method}.{parameter}: an empty list; give at least one value")
            grid[str(method)][str(parameter)] = values
    if problems:
        raise RecipeProblems(problems)
    return grid


def candidates(methods: Sequence[str], grid: Mapping[str, Mapping[str, Sequence[Any]]]) -> List[Candidate]:
    """Every method once per point of its grid (the product of its parameters' values), in the
    order of ``methods``; a method the grid does not name is tried once with its defaults."""
    found = []
    for method in methods:
        settings = grid.get(method, {})
        for values in itertools.product(*settings.values()):
            found.append(Candidate(method, tuple(zip(settings, values))))
    if not found:
        raise UserError("no candidates: give at least one method")
    return found


def checked_reference(reference: str, option: str) -> Path:
    """The local folder of a seed or the base (a Hub id through the cache). A name written as a
    Hub id whose first part is a folder here is a typo of a local path, never looked up on the
    Hub: one line naming ``option`` and the folder's closest entry."""
    parent, _, name = reference.partition("/")
    if not os.path.lexists(reference) and name and os.path.isdir(parent) and is_hub_id(reference.partition("@")[0]):
        entries = sorted(os.listdir(parent))
        hint = difflib.get_close_matches(name, entries, n=1)
        suggestion = f"; did you mean {parent}/{hint[0]}?" if hint else f" ({parent}/ holds {', '.join(entries[:5])})"
        raise UserError(f"{option} {reference}: no such folder{suggestion}")
    try:
        return local_folder(reference)
    except UserError as error:
        raise UserError(f"{option} {error}") from None


def seed_kind(seeds: Sequence[str]) -> str:
    """``full``, ``lora`` or ``sera``: what the seeds are (all of one kind)."""
    kinds = {}
    for seed in seeds:
        folder = checked_reference(seed, "seed")
        if is_adapter_folder(folder):
            kind = peft_type(read_adapter_config(folder))
            if kind not in ("LORA", SERA_TYPE):
                raise UserError(f"{seed}: peft_type {kind!r} is not supported (LORA or SERA)")
            kinds[seed] = kind.lower()
        else:
            kinds[seed] = "full"
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{seed} ({kind})" for seed, kind in kinds.items())
        raise UserError(f"the seeds must be of one kind (full models, LoRA or SeRA adapters): {listing}")
    return next(iter(kinds.values()))


def check_methods(methods: Sequence[str], kind: str) -> None:
    """Refuse a method that cannot merge seeds of ``kind``."""
    known = our_method_names() + MERGEKIT_METHODS
    for method in methods:
        if method not in known:
            hint = difflib.get_close_matches(method, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise UserError(f"--methods {method}: not a method select tries{suggestion}; it tries {', '.join(known)}")
        if kind == "sera" and method in MERGEKIT_METHODS:
            raise UserError(
                f"--methods {method}: mergekit's methods cannot read SeRA adapters (PEFT does not know them); "
                f"use {', '.join(our_method_names())}, or merge the seeds into full models first"
            )


def recipe_text(
    candidate: Candidate, base: str, seeds: Sequence[str], kind: str, output_rank: Optional[Union[int, str]] = None
) -> str:
    """The recipe of ``candidate``: our methods merge adapter seeds into an adapter (its
    ``output.rank`` ``output_rank``, when given); mergekit's merge LoRA seeds as
    ``BASE+ADAPTER`` into a full model. Model Soup (linear) averages the seeds alone, and a
    method that needs no base (LoRE) gets none for full seeds (adapters' deltas are relative to
    it)."""
    ours = our_method(candidate.method)
    recipe: Dict[str, Any] = {"merge_method": candidate.method}
    if candidate.method != "linear" and (kind != "full" or not ours or ours.needs_base):
        recipe["base_model"] = base
    models = []
    for seed in seeds:
        entry: Dict[str, Any] = {"model": f"{base}+{seed}" if kind == "lora" and not ours else seed}
        if not ours:
            # mergekit's methods require a per-model weight: 1 each for linear (Model Soup) and TIES;
            # dare_ties sums the weighted deltas (its `normalize` defaults to false), so 1/N averages them
            entry["parameters"] = {"weight": round(1 / len(seeds), 6) if candidate.method == "dare_ties" else 1.0}
        models.append(entry)
    recipe["models"] = models
    if candidate.parameters:
        recipe["parameters"] = dict(candidate.parameters)
    if kind != "full" and ours:
        recipe["output"] = {"format": "lora", **({"rank": output_rank} if output_rank is not None else {})}
    return yaml.safe_dump(recipe, sort_keys=False)


def adapter_output_rank(method: str, output_rank: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
    """The ``output.rank`` of a candidate merging adapters: ``output_rank`` when given (``exact``:
    none); else exact (None) for a method exact on low-rank factors, and ``auto`` for the
    others, whose merged deltas are dense: an exact LoRA of a dense delta holds more numbers
    than the dense weights."""
    if output_rank is not None:
        return None if output_rank == "exact" else output_rank
    ours = our_method(method)
    return None if ours is None or ours.factored_kernel is not None else "auto"


def parsed_candidates(
    found: Sequence[Candidate],
    base: str,
    seeds: Sequence[str],
    kind: str,
    output_rank: Optional[Union[int, str]] = None,
) -> Dict[Candidate, Any]:
    """Each candidate's parsed recipe, every one checked before anything is merged: the problems
    of every candidate at once (a bad grid value names its candidate), not a failure after the
    sweep has started."""
    recipes, problems = {}, []
    for candidate in found:
        rank = adapter_output_rank(candidate.method, output_rank) if kind != "full" else None
        recipe = parse_recipe(recipe_text(candidate, base, seeds, kind, rank), f"candidate {candidate.name}")
        problems += check_recipe(recipe, recipe.origin)
        recipes[candidate] = recipe
    if problems:
        raise RecipeProblems(list(dict.fromkeys(problems)))
    return recipes

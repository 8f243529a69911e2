"""Our methods as a mergekit plugin: registration, and the planner check on every route.

Importing this module registers the methods in :data:`mergekit_seed.methods.METHODS` with
mergekit's registry (idempotent) and arranges that mergekit's ``MergePlanner`` refuses a
misspelt parameter of ours once ``mergekit.plan`` is imported. The interpreter-start hook
(``startup.py``) imports it when mergekit's registry is first imported.
"""

from __future__ import annotations

import difflib
import functools
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit.merge_methods import registry

from mergekit_seed.after_import import after_import
from mergekit_seed.errors import MergeRefused, UserError
from mergekit_seed.methods import METHODS, is_ours
from mergekit_seed.references.adapter_files import is_adapter_folder
from mergekit_seed.references.weights import full_model_files
from mergekit_seed.version import SUPPORTED_MERGEKIT, __version__


_warned: set = set()


def parameter_sections(config: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, settings) for every ``parameters:`` mapping of a mergekit ``MergeConfiguration``:
    global, per model, per output slice and input slice, per module."""

    def slices(pieces: Any, prefix: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        for index, piece in enumerate(pieces or []):
            yield f"{prefix}slices[{index}] parameters", piece.parameters
            for source_index, source in enumerate(piece.sources):
                yield f"{prefix}slices[{index}].sources[{source_index}] ({source.model}) parameters", source.parameters

    def models(entries: Any, prefix: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        for index, model in enumerate(entries or []):
            yield f"{prefix}models[{index}] ({model.model}) parameters", model.parameters

    sections = [("parameters", config.parameters)]
    sections += models(config.models, "")
    sections += slices(getattr(config, "slices", None), "")
    for name, module in (getattr(config, "modules", None) or {}).items():
        sections.append((f"modules.{name} parameters", module.parameters))
        sections += models(module.models, f"modules.{name}.")
        sections += slices(module.slices, f"modules.{name}.")
    return ((where, settings) for where, settings in sections if settings)


def unknown_parameter_problem(method: Any, name: str, where: str) -> Optional[str]:
    """The line for a parameter ``name`` that ``method`` does not declare; None if it does."""
    known = [p.name for p in method.spec.parameters]
    if name in known:
        return None
    suggestion = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
    return (
        f"{where}: unknown parameter '{name}' for {method.spec.name}{hint}; known: "
        f"{', '.join(sorted(known)) or 'none'}"
    )


class RecipeParameterError(MergeRefused):
    """A recipe parameter our method does not declare, caught when mergekit plans the merge."""


def _check_planned_parameters(config: Any) -> None:
    """mergekit resolves only the parameters a method declares and ignores the rest, so a
    misspelt one (``rnak``) would merge with the default; for our methods, refuse it. Every
    local model's weight files must lie inside its folder (mergekit follows an index entry such
    as ``../x.safetensors`` wherever it points). An unknown method name (a typo of ours, say)
    and adapter folders given to our methods are one line too, not mergekit's traceback."""
    try:
        method = registry.get(config.merge_method)
    except RuntimeError:  # mergekit's own report is a traceback
        names = [known.spec.name for known in registry.registered_methods()]
        hint = difflib.get_close_matches(str(config.merge_method), names, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise MergeRefused(
            f"unknown merge_method '{config.merge_method}'{suggestion}; `mergekit-seed methods` lists ours"
        ) from None
    if not is_ours(method):
        return  # mergekit's methods keep mergekit's behaviour
    for reference in config.referenced_models():
        folder = Path(str(reference.model.path))
        if reference.lora is None and is_adapter_folder(folder):
            raise MergeRefused(
                f"{folder} is an adapter folder, and stock mergekit-yaml merges full models: run "
                "`mergekit-seed run RECIPE OUT`, which merges adapter folders natively (or list each seed as "
                "model: BASE+ADAPTER)"
            )
    for where, settings in parameter_sections(config):
        for name in settings:
            problem = unknown_parameter_problem(method, name, where)
            if problem:
                raise RecipeParameterError(problem)
    for reference in config.referenced_models():  # mergekit reads index entries as given: confine them first
        folder = Path(str(reference.model.path))
        if folder.is_dir():
            try:
                full_model_files(folder)
            except UserError as error:
                raise MergeRefused(str(error)) from None


def install_planner_check() -> None:
    """Wrap mergekit's ``MergePlanner.__init__`` once so that every route (stock
    ``mergekit-yaml``, ``mergekit.merge.run_merge``, ours) checks our methods' parameter names
    before any tensor is read; other methods pass through unchanged. Called when
    ``mergekit.plan`` or ``mergekit.merge`` has been imported (they pull in transformers, which
    an adapter merge never needs)."""
    module = sys.modules.get("mergekit.plan")
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        # mergekit.plan imports the registry before it defines MergePlanner, and the registry
        # registers us: too early; mergekit.merge, which run_merge and mergekit-yaml import once
        # mergekit.plan is complete, installs the check
        return
    try:
        from mergekit import plan

        original = plan.MergePlanner.__init__
    except (ImportError, AttributeError) as error:  # another mergekit release: the methods still register
        _warn_once(
            f"mergekit-seed cannot check parameter names under this mergekit ({error}); validate recipes with "
            "`mergekit-seed validate`"
        )
        return
    if getattr(original, "_mergekit_seed_check", False):
        _check_before_run_merge_reads()
        return

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        _check_planned_parameters(config)
        original(self, config, *args, **kwargs)

    __init__._mergekit_seed_check = True
    plan.MergePlanner.__init__ = __init__
    _check_before_run_merge_reads()


def _check_before_run_merge_reads() -> None:
    """``run_merge`` opens every model's weight files (its loader cache's warm-up) before it
    builds a planner: the same check runs first, at its first step (``get_architecture_info``,
    looked up in ``mergekit.merge`` at each call), so a FIFO or a file outside a model's folder
    is refused before mergekit opens it."""
    merge = sys.modules.get("mergekit.merge")  # its name is bound once mergekit.merge has imported it
    original = getattr(merge, "get_architecture_info", None)
    if original is None or getattr(original, "_mergekit_seed_check", False):
        return

    @functools.wraps(original)
    def get_architecture_info(config, *args, **kwargs):
        _check_planned_parameters(config)
        return original(config, *args, **kwargs)

    get_architecture_info._mergekit_seed_check = True
    merge.get_architecture_info = get_architecture_info


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def register() -> List[str]:
    """Add every mergekit-seed method to ``mergekit.merge_methods``; safe to call twice.

    A name that another package already registered keeps that package's method (ours is not
    registered under it) and is reported. Returns those reports, each also printed once as a
    warning line, with one about a mergekit release other than :data:`SUPPORTED_MERGEKIT`.
    Raises whatever registration raises (the import hook catches it).
    """
    installed = version("mergekit")
    if installed != SUPPORTED_MERGEKIT:
        _warn_once(
            f"mergekit-seed {__version__} is built for mergekit {SUPPORTED_MERGEKIT} but mergekit {installed} "
            f"is installed; its methods are registered anyway (install mergekit=={SUPPORTED_MERGEKIT} if a merge "
            "fails)"
        )
    problems = _register_methods()
    for problem in problems:
        _warn_once(problem)
    return problems


def _register_methods() -> List[str]:
    """Register every method with mergekit; idempotent.

    A name already registered by someone else is never shadowed: theirs is kept, ours is not
    registered, and the returned list says so (one line per name).
    """
    present = {method.spec.name: method for method in registry.registered_methods()}
    problems = []
    for method in METHODS:
        other = present.get(method.spec.name)
        if other is None:
            registry.register(method)
        elif other is not method:
            owner = type(other).__module__.split(".")[0]
            problems.append(
                f"merge_method '{method.spec.name}' is already registered by {owner}; mergekit-seed keeps that one "
                f"and does not register its own, so recipes naming '{method.spec.name}' run {owner}'s method"
            )
    return problems


# Importing this module registers the methods; _register_methods() is idempotent.
_register_methods()
after_import("mergekit.plan", install_planner_check)
after_import("mergekit.merge", install_planner_check)

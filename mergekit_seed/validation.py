"""Up-front validation of a parsed recipe: what mergekit only finds out mid-merge.

:func:`check_recipe` checks the method, the base model, the seed count and every parameter's
type and range against the registered methods' specs; :func:`check_files` checks the inputs on
disk from their headers (paths, shapes, dtypes, architectures, adapters against their base);
:func:`recipe_warnings` says what is allowed but worth saying. Every problem is one line.
This module imports the methods (and torch) at its top: the cheap part of a recipe is
:mod:`mergekit_seed.recipe`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from mergekit import merge_methods
from mergekit.merge_methods.base import BasePolicy, ParameterScope
from pydantic import ValidationError
from typing_extensions import get_args

from mergekit_seed.errors import UserError
from mergekit_seed.hub_recipes import hub_references
from mergekit_seed.methods import MIN_SEEDS, SeedMergeMethod, is_ours
from mergekit_seed.plugin import parameter_sections, register, unknown_parameter_problem
from mergekit_seed.reader import load_pickled_tensors, read_json_object
from mergekit_seed.recipe import (
    TOKENIZER_KEYWORDS,
    DtypeName,
    Recipe,
    is_adapter_reference,
    model_paths_in_order,
    parse_mapping,
    reference_paths,
    reference_strings,
    setting_form_problem,
)
from mergekit_seed.references.adapter_files import (
    folder_modified_base_problem,
    holds_model_and_adapter,
    read_adapter,
    why_base_is_read,
)
from mergekit_seed.references.hub import HubNotChecked, hub_problem, is_hub_id, split_revision
from mergekit_seed.references.weights import (
    full_model_dtype_kinds,
    full_model_files,
    full_model_shapes,
    safetensors_shapes,
)


def _scalar_leaves(setting: Any) -> Iterable[Any]:
    """The scalar values of a mergekit parameter setting (scalar, gradient or filters)."""
    if isinstance(setting, list):
        for item in setting:
            yield from _scalar_leaves(item)
    elif isinstance(setting, dict):
        yield from _scalar_leaves(setting.get("value"))
    elif hasattr(setting, "value") and hasattr(setting, "filter"):
        yield from _scalar_leaves(setting.value)
    else:
        yield setting


# pydantic's error types that say a value is of the wrong type, not out of range
_TYPE_ERRORS = {"literal_error", "float_parsing", "int_parsing", "float_type", "int_type", "int_from_float"}
_TYPE_ERRORS |= {"bool_type", "bool_parsing", "string_type", "none_required"}


def _value_problem(error: ValidationError, value: Any, method: Any = None, name: str = "") -> str:
    """The message of ``error`` that speaks to ``value``: for a number against a type such as
    ``'auto' | float``, the number's range, not the word it is not; for a value of the wrong type
    altogether, every type the parameter takes (our methods say which)."""
    errors = error.errors()
    out_of_range = [e for e in errors if e.get("type", "").startswith(("greater_than", "less_than"))]
    if out_of_range:
        return out_of_range[0].get("msg", "out of range")
    label = next((p.type_label for p in getattr(method, "parameters", ()) if p.name == name), None)
    if label and {e.get("type", "") for e in errors} <= _TYPE_ERRORS:
        return f"takes {label}"
    if not isinstance(value, str):
        errors = [e for e in errors if e.get("type") != "literal_error"] or errors
    return errors[0].get("msg", "invalid value")


def _check_parameters(method: Any, settings: Optional[dict], where: str, adapter: bool) -> List[str]:

    problems: List[str] = []
    specs = {p.name: p for p in method.spec.parameters}
    for name, setting in (settings or {}).items():
        spec = specs.get(name)
        form_problem = setting_form_problem(setting) if adapter else None
        if form_problem:
            problems.append(f"{where}: parameter '{name}': {form_problem}")
            continue
        if spec is None:
            if is_ours(method):  # mergekit's own methods ignore it: recipe_warnings says so
                problems.append(unknown_parameter_problem(method, name, where))
            continue
        for value in _scalar_leaves(setting):
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{where}: parameter '{name}' = {value!r}: must be a finite number")
                continue
            try:
                spec.validate(value)
            except ValidationError as error:
                problems.append(
                    f"{where}: parameter '{name}' = {value!r}: {_value_problem(error, value, method, name)}"
                )
    return problems


def _registered_method(recipe: Recipe, path: str) -> Tuple[Any, List[str]]:
    """(the recipe's method from mergekit's registry, []) or (None, the one line why not: an
    unknown name, or one of mergekit's methods named in an adapter recipe)."""

    register()
    name = recipe.config.merge_method
    try:
        method = merge_methods.get(name)
    except RuntimeError:
        names = [m.spec.name for m in merge_methods.registered_methods()]
        suggestion = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        return None, [f"{path}: unknown merge_method '{name}'{hint}"]
    if recipe.is_adapter_recipe and not is_ours(method):
        ours = ", ".join(m.spec.name for m in merge_methods.registered_methods() if is_ours(m))
        return None, [
            f"{path}: merge_method {name} is mergekit's; the adapter engine (models: adapter folders) runs {ours}. "
            f"For {name}, list each seed as model: BASE+ADAPTER and mergekit merges the materialised models"
        ]
    return method, []


def _model_list_problems(recipe: Recipe, seeds: List[Any], path: str) -> List[str]:
    """The base listed among an adapter merge's models, a base that is an adapter, adapters
    mixed with full models (or an adapter without its config)."""
    config, base, adapters = recipe.config, recipe.config.base_model, recipe.adapter_paths
    problems = []
    if recipe.is_adapter_recipe and base is not None and len(seeds) < len(config.models):
        problems.append(
            f"{path}: base_model {base} is also listed under models:; in an adapter merge models: are the adapters "
            "only, "
            "remove it there"
        )
    if base is not None and is_adapter_reference(str(base)):  # what else would be said follows from this
        return problems + [
            f"{path}: base_model {base} is an adapter folder; give the model the adapters were trained on"
        ]
    if adapters and len(adapters) != len(seeds):
        configless = [m.model for m in seeds if m.model not in adapters and _has_adapter_weights(Path(m.model))]
        problems += [
            f"{path}: {folder} holds adapter weights but no adapter_config.json; add the config the adapter was saved "
            "with"
            for folder in configless
        ] or [
            f"{path}: mix of adapter folders and full models under models:; list only adapters "
            f"(or use model: BASE+ADAPTER for every seed)"
        ]
    return problems


def _seed_problems(method: Any, recipe: Recipe, seeds: List[Any], path: str) -> List[str]:
    """A missing base, too few seeds, missing required parameters, and the method's own
    cross-parameter rules (``min_agree`` <= N, ``mu`` xor ``mu_relative``)."""

    config = recipe.config
    problems = []
    if method.spec.contract.base == BasePolicy.REQUIRED and not recipe.adapter_paths and config.base_model is None:
        problems.append(
            f"{path}: {config.merge_method} needs base_model (the checkpoint the seeds were fine-tuned from)"
        )
    if isinstance(method, SeedMergeMethod) and len(seeds) < MIN_SEEDS:  # mergekit's methods: their own contracts
        problems.append(
            f"{path}: {config.merge_method} needs at least {MIN_SEEDS} seed models under models:, got {len(seeds)}"
        )
    problems += _missing_required(method, config, path)
    check = getattr(method, "parameter_problems", None)
    if check is not None:
        scalars = _scalar_settings(config.parameters)
        per_seed = [
            {
                parameter.name: {**scalars, **_scalar_settings(seed.parameters)}.get(parameter.name, parameter.default)
                for parameter in getattr(method, "parameters", ())
                if parameter.scope.value != "shared"
            }
            for seed in seeds
        ]
        problems += [f"{path}: {line}" for line in check(scalars, len(seeds), per_seed)]
    return problems


def check_recipe(recipe: Recipe, path: str = "recipe") -> List[str]:
    """Every problem with a parsed recipe, one line each; empty when it can run."""

    method, problems = _registered_method(recipe, path)
    if method is None:
        return problems
    config = recipe.config
    for where, settings in parameter_sections(config):
        problems += _check_parameters(method, settings, f"{path}: {where}", recipe.is_adapter_recipe)
    for field_name in ("dtype", "out_dtype"):
        value = getattr(config, field_name, None)
        if value is not None and value not in get_args(DtypeName):
            problems.append(
                f"{path}: {field_name}: '{value}' is not a dtype mergekit knows; use bfloat16, float16, float32 or "
                "float64"
            )
    problems += _check_output_section(recipe, path)
    if not config.models:
        return problems
    seeds = [m for m in config.models if config.base_model is None or m.model != config.base_model]
    model_problems = _model_list_problems(recipe, seeds, path)
    if config.base_model is not None and is_adapter_reference(str(config.base_model)):
        return problems + model_problems
    return problems + model_problems + _seed_problems(method, recipe, seeds, path)


def _scalar_settings(settings: Optional[dict]) -> Dict[str, Any]:
    """The parameter settings that are plain values (not gradients or filters)."""
    return {name: value for name, value in (settings or {}).items() if isinstance(value, (int, float, str, bool))}


def _missing_required(method: Any, config: Any, path: str) -> List[str]:
    """Required parameters (mergekit's ``weight`` for ``linear``/``ties``, for example) that
    neither the global ``parameters`` nor a model's own give."""

    problems = []
    given = set(config.parameters or {})
    for parameter in method.spec.parameters:
        if not parameter.required or parameter.name in given:
            continue
        for index, model in enumerate(config.models or []):
            if parameter.scope == ParameterScope.NON_BASE and model.model == config.base_model:
                continue
            if parameter.name not in (model.parameters or {}):
                problems.append(
                    f"{path}: models[{index}] ({model.model}): {config.merge_method} needs parameter "
                    f"'{parameter.name}' (set it there or under parameters:)"
                )
        if parameter.scope == ParameterScope.INPUT and config.base_model is not None:
            listed = any(m.model == config.base_model for m in config.models or [])
            if not listed:
                problems.append(
                    f"{path}: base_model is an input of {config.merge_method} and needs parameter "
                    f"'{parameter.name}'; set it under parameters:"
                )
    return problems


def _check_output_section(recipe: Recipe, path: str) -> List[str]:
    if recipe.is_adapter_recipe and recipe.config.output.format == "full" and recipe.config.base_model is None:
        return [f"{path}: output.format: full needs base_model (the model the adapters were trained on)"]
    return []


def _has_adapter_weights(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").is_file()


PLACEHOLDERS = ("REPLACE", "${")  # shipped recipes' REPLACE/... and ${DEMO_MODELS}


def _is_placeholder(reference: str) -> bool:
    return any(placeholder in reference for placeholder in PLACEHOLDERS)


def _path_problem(folder: str, path: str, what: str = "model path") -> Optional[str]:
    """Why a model path cannot be used as written (a placeholder, ``~``, missing, a file or a
    device instead of a folder), or None. A path that does not exist is never taken for a Hub id
    unless it is written as one (``org/name``)."""
    if _is_placeholder(folder):
        return f"{path}: {what} {folder} is a placeholder; replace it with your model's folder or Hub id"
    if is_hub_id(split_revision(folder)[0]):
        return None
    if os.path.lexists(folder) and not Path(folder).is_dir():
        return (
            f"{path}: {what} {folder} is not a folder (a model or an adapter is a folder with its config and weights)"
        )
    if Path(folder).is_dir():
        return None
    if folder.startswith("~"):
        return f"{path}: {what} {folder} does not exist (~ is not expanded in recipes; write the full path)"
    return f"{path}: {what} {folder} does not exist"


def _architecture_problem(folders: List[Path], path: str) -> Optional[str]:
    """Different ``architectures`` in the local models' config.json (mergekit refuses to mix them)."""
    found: Dict[str, str] = {}
    for folder in folders:
        if not (folder / "config.json").is_file():
            continue
        try:
            architectures = read_json_object(folder / "config.json", "model config", within=folder).get(
                "architectures"
            )
        except UserError as error:
            return str(error)
        if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
        ):
            return (
                f"{folder / 'config.json'}: architectures must be a list of class names, not "
                f"{json.dumps(architectures)[:40]}"
            )
        if architectures:
            found.setdefault(str(folder), architectures[0])
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{architecture} ({folder})" for folder, architecture in found.items())
        return (
            f"{path}: the models have different architectures: {listing}; mergekit mixes them only with --allow-crimes"
        )
    return None


def _reference_problems(recipe: Recipe, path: str, not_checked: Optional[List[str]]) -> List[str]:
    """Placeholder or missing local paths, Hub ids that are not there, and the adapter of a
    ``BASE+ADAPTER`` saved relative to a base PEFT modified."""

    references = recipe.config.referenced_models()
    models = model_paths_in_order(recipe)
    problems = [problem for folder in models if (problem := _path_problem(folder, path))]
    others = dict.fromkeys(reference_strings(parse_mapping(recipe.source, recipe.origin)))
    problems += [
        problem
        for other in others
        if other not in models
        and other not in TOKENIZER_KEYWORDS
        and (problem := _path_problem(other, path, "tokenizer path"))
    ]
    for reference in hub_references(recipe):
        if _is_placeholder(reference):
            continue  # said once above, as a placeholder
        try:
            problem = hub_problem(reference)
        except HubNotChecked as reason:
            if not_checked is not None:
                not_checked.append(f"{path}: {reason}")
            continue
        if problem:
            problems.append(f"{path}: {problem}")
    for reference in references:
        for adapter in reference_paths(reference)[1:]:  # the adapter of BASE+ADAPTER
            problem = folder_modified_base_problem(Path(adapter))
            if problem:
                problems.append(f"{path}: {problem}")
    return problems


def _input_shapes(recipe: Recipe, reference: Any, folder: Path, path: str) -> Optional[Dict[str, tuple]]:
    """{tensor name: shape} of one local input from its headers (an adapter seed's deltas, or
    the weight files mergekit reads), None when it has none to compare; a folder that is not
    a model or adapter raises the one line why."""
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise UserError(f"{path}: {folder} is not a model or adapter folder (no config.json or adapter_config.json)")
    if (
        _has_adapter_weights(folder)
        and not (folder / "adapter_config.json").is_file()
        and not full_model_files(folder)
    ):
        raise UserError(
            f"{path}: {folder} holds adapter weights but no adapter_config.json; add the config the adapter was saved "
            "with"
        )
    if recipe.is_adapter_recipe:
        if reference == recipe.config.base_model:
            return None

        return read_adapter(folder).shapes()
    files = full_model_files(folder)
    if not files:
        raise UserError(
            f"{path}: {folder} has no model weights mergekit reads (model.safetensors or pytorch_model.bin, or their "
            ".index.json)"
        )
    for file in files:
        if file.suffix == ".bin" and file.is_file():  # mergekit reads it; refuse here what it would fail on
            load_pickled_tensors(file, folder, mmap=True)
    return full_model_shapes(folder) or None  # (.bin checkpoints: mergekit reads them itself)


def check_files(
    recipe: Recipe,
    path: str = "recipe",
    allow_crimes: bool = False,
    not_checked: Optional[List[str]] = None,
    truncate_embeddings: bool = False,
) -> List[str]:
    """Problems with the inputs on disk: placeholder or missing local paths, unreadable files,
    mixed architectures (unless ``allow_crimes``), and tensors whose shapes differ between
    inputs or are missing in some (headers only). What could not be checked (a Hub id the Hub
    could not be asked about) is appended to ``not_checked`` when given."""
    config = recipe.config
    problems = _reference_problems(recipe, path, not_checked)
    if problems:
        return problems
    seeds = [entry.model for entry in config.models or [] if entry.model != config.base_model]
    if recipe.is_adapter_recipe and len(recipe.adapter_paths) != len(seeds):
        return []  # adapters mixed with full models: check_recipe says so in one line, which covers these
    if not recipe.is_adapter_recipe and not allow_crimes:
        local = [
            Path(reference_paths(r)[0]) for r in config.referenced_models() if Path(reference_paths(r)[0]).is_dir()
        ]
        problem = _architecture_problem(local, path)
        if problem:
            return [problem]
    shapes_by_input: Dict[str, Dict[str, tuple]] = {}
    for reference in config.referenced_models():
        folder = Path(reference_paths(reference)[0])
        if folder.is_dir():
            try:
                shapes = _input_shapes(recipe, reference, folder, path)
            except UserError as error:
                problems.append(str(error))
                continue
            if shapes is not None:
                shapes_by_input[str(folder)] = shapes
    if recipe.is_adapter_recipe and config.base_model and Path(config.base_model).is_dir() and not problems:
        problems += _adapter_base_problems(shapes_by_input, Path(config.base_model), path)
    if not recipe.is_adapter_recipe and not problems:
        problems += _missing_required_tensors(shapes_by_input, path)
    if len(shapes_by_input) > 1:
        # with a tokenizer setting mergekit aligns the vocabularies, and --unsafe-truncate-embeddings
        # cuts them to the output's: embedding rows may differ
        rows_may_differ = truncate_embeddings or bool(
            getattr(config, "tokenizer_source", None) or getattr(config, "tokenizer", None)
        )
        problems += _compare_shapes(shapes_by_input, path, rows_may_differ)
    if len(shapes_by_input) > 1 and not recipe.is_adapter_recipe and not problems:
        problems += _compare_dtype_kinds(
            {folder: full_model_dtype_kinds(Path(folder)) for folder in shapes_by_input}, path
        )
    return problems


def _compare_dtype_kinds(kinds_by_input: Dict[str, Dict[str, str]], path: str) -> List[str]:
    """A tensor that is floating point in one input and integer in another: a header that lies
    about the dtype (same width, so the sizes agree) would merge raw bits as numbers."""
    problems = []
    for name in sorted(set().union(*kinds_by_input.values())):
        present = {folder: kinds[name] for folder, kinds in kinds_by_input.items() if name in kinds}
        if len(set(present.values())) > 1:
            listing = ", ".join(f"{kind} in {folder}" for folder, kind in present.items())
            problems.append(
                f"{path}: tensor {name} is {listing}; one checkpoint's header gives the wrong dtype: re-export it"
            )
    return problems


def _missing_required_tensors(shapes_by_input: Dict[str, Dict[str, tuple]], path: str) -> List[str]:
    """Tensors an input lacks that its architecture needs, by mergekit's own rules: a weight
    that is not optional must be there under its name, an alias or a tied name (so tied and
    untied embeddings, stray buffers and models of different depths are all fine), or be one
    that mergekit's loader builds from the checkpoint's keys with transformers' conversion
    mapping (a Mixtral saved as ``block_sparse_moe.experts.N.w1`` read as ``mlp.experts.gate_up_proj``)."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.conversion import can_convert_checkpoint_keys
    from transformers import AutoConfig

    problems = []
    for folder, shapes in shapes_by_input.items():
        try:
            model_config = AutoConfig.from_pretrained(folder)
            architecture = arch_info_for_config(model_config)
            weights = architecture.all_weights(model_config) if architecture is not None else []
        except Exception:  # an architecture mergekit does not know: it says so when it plans
            continue
        keys = set(shapes)
        for weight in weights:
            names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
            if weight.optional or any(name in keys for name in names):
                continue
            if not any(
                can_convert_checkpoint_keys(model_config.model_type, keys, name)
                for name in [weight.name, *(weight.aliases or ())]
            ):
                problems.append(
                    f"{path}: tensor {weight.name} is missing in {folder} (mergekit's definition of "
                    f"{model_config.model_type} "
                    "needs it, so stock mergekit-yaml fails on it too); seeds that are adapters merge on the adapter "
                    "route "
                    "(docs/adapters.md)"
                )
    return problems


def _adapter_base_problems(shapes_by_seed: Dict[str, Dict[str, tuple]], base: Path, path: str) -> List[str]:
    """Tensors an adapter changes whose shape is not the base's (a seed trained on a resized
    vocabulary, say); Conv1D weights, stored transposed in the base, may match either way."""
    try:
        base_shapes = safetensors_shapes(base)
    except UserError as error:
        return [str(error)]
    problems = []
    for seed, shapes in shapes_by_seed.items():
        for name, shape in sorted(shapes.items()):
            expected = base_shapes.get(name)
            if expected is not None and shape != expected and shape != tuple(reversed(expected)):
                problems.append(
                    f"{path}: tensor {name} is {shape} in {seed} but {expected} in base_model {base}; "
                    "give the base the seeds were trained from"
                )
    return problems


def _compare_shapes(
    shapes_by_input: Dict[str, Dict[str, tuple]], path: str, rows_may_differ: bool = False
) -> List[str]:
    """A tensor the inputs share must have one shape in all of them (a tensor only some have is
    fine here: which ones an input needs is :func:`_missing_required_tensors`'s question)."""
    problems = []
    all_names = sorted(set().union(*shapes_by_input.values()))
    for name in all_names:
        present = {folder: shapes[name] for folder, shapes in shapes_by_input.items() if name in shapes}
        distinct = set(present.values())
        if rows_may_differ and all(len(shape) == 2 for shape in distinct) and len({s[1] for s in distinct}) == 1:
            continue  # vocabulary rows (embeddings, heads) that the tokenizer merge aligns
        if len(distinct) > 1:
            listing = ", ".join(f"{folder} {shape}" for folder, shape in present.items())
            problems.append(f"{path}: tensor {name} has different shapes: {listing}")
    return problems


# mergekit's own parameters that are fractions; mergekit runs any value, where ours refuse one out of range
MERGEKIT_FRACTIONS = ("density", "epsilon", "gamma", "select_topk")


def _fraction_warnings(settings: dict, where: str) -> List[str]:
    return [
        f"{where}: parameter '{name}' = {value!r} is outside [0, 1]; mergekit runs it anyway, as stock mergekit-yaml "
        "does, "
        "and the result is rarely what was meant"
        for name in MERGEKIT_FRACTIONS
        for value in _scalar_leaves(settings.get(name))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= 1
    ]


def recipe_warnings(recipe: Recipe) -> List[str]:
    """Things that are allowed but worth saying (for example a base that is not an input)."""
    warnings = []
    config = recipe.config

    try:
        method = merge_methods.get(config.merge_method)
    except RuntimeError:
        method = None
    if method is not None and not is_ours(method):
        for where, settings in parameter_sections(config):
            for name in settings:
                problem = unknown_parameter_problem(method, name, where)
                if problem:
                    warnings.append(f"{problem}; mergekit ignores it, as stock mergekit-yaml does")
            warnings += _fraction_warnings(settings, where)
    if not recipe.is_adapter_recipe:
        for reference in config.referenced_models():
            folder = reference_paths(reference)[0]
            if holds_model_and_adapter(folder):
                warnings.append(
                    f"{folder} holds a full model and an adapter (adapter_config.json); it is merged as the full "
                    "model, as mergekit reads it (to merge the adapter, give a folder that holds only the adapter)"
                )
    if is_ours(method) and not method.needs_base and config.base_model is not None and not recipe.is_adapter_recipe:
        warnings.append(
            f"base_model {config.base_model} is not an input of {config.merge_method} (it needs no base); "
            "mergekit still uses it for the output's configuration and tokenizer"
        )
    return warnings


def merge_inputs(recipe, method) -> List[Any]:
    """The model references whose files the merge of ``recipe`` by ``method`` reads: every
    referenced model, except the base model of an adapter merge that writes a LoRA adapter and
    needs no base weights (:func:`~mergekit_seed.references.adapter_files.why_base_is_read`, the
    answer the engine acts on)."""

    config = recipe.config
    if recipe.is_adapter_recipe and config.output.format == "lora":
        adapters = [entry.model for entry in config.models]
        needs_base = getattr(method, "needs_base", True)
        base_read = config.base_model and why_base_is_read(adapters, needs_base, "lora", config.base_model) is not None
        return ([config.base_model] if base_read else []) + adapters
    return config.referenced_models()

"""Recipes: the schema, bounded parsing, and the references a recipe names (cheap: no torch).

A recipe is a mergekit YAML file. :func:`load_recipe` parses it safely (the one reader, YAML's
safe loader with aliases bounded) and checks it against mergekit's schema; validation of what
mergekit only finds out mid-merge is :mod:`mergekit_seed.validation`.

Recipes whose models are adapter folders are checked against :class:`AdapterMergeConfig`,
the part of mergekit's schema an adapter merge uses, instead of mergekit's
``MergeConfiguration``: importing that pulls in ``mergekit.common``, which imports peft and
transformers (seconds of start-up, ``benchmarks/startup.json``), for a merge that uses neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Annotated, Literal

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.reader import read_text
from mergekit_seed.references.hub import is_hub_id
from mergekit_seed.untrusted import parse_yaml


class OutputSection(BaseModel):
    """The recipe's ``output:`` section (adapter recipes only).

    ``rank``: null writes each module exactly (its numerical rank); an int caps every module
    at that rank; ``auto`` keeps, per module, the smallest rank holding ``energy`` of the
    merged delta's squared Frobenius norm, at most the break-even rank m n / (m + n) (where
    the factors would outgrow the dense matrix).
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["lora", "full"] = "lora"
    rank: Optional[Union[Annotated[int, Field(ge=1)], Literal["auto"]]] = None
    energy: float = Field(0.99, gt=0, le=1)


# the dtype names mergekit.common.dtype_from_name accepts (that module imports peft and
# transformers, which an adapter merge otherwise never needs)
DtypeName = Literal[
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "int64",
    "torch.bfloat16",
    "torch.float16",
    "torch.float32",
    "torch.float64",
    "torch.int64",
]


# A counterpart of mergekit.common.dtype_from_name, kept because importing mergekit.common,
# .config and .options is most of an adapter merge's start-up (benchmarks/startup.json);
# tests/test_counterparts.py holds it to mergekit's
def torch_dtype(name: Optional[str]):
    """The torch dtype a recipe's ``dtype``/``out_dtype`` names (None for None)."""
    if not name:
        return None
    import torch

    return getattr(torch, name.removeprefix("torch."))


# mergekit.config's grammar of a parameter setting (ScalarParameter, ConditionalParameter,
# ParameterSetting), to check an adapter recipe's settings exactly as MergeConfiguration does;
# the settings themselves are kept as the plain values the recipe wrote (evaluate_setting reads them)
Scalar = Union[bool, int, float, str]


class _Condition(BaseModel):
    value: Union[Scalar, List[Scalar]]
    filter: Optional[str] = None


_SETTINGS = TypeAdapter(Optional[Dict[str, Union[_Condition, List[_Condition], Scalar, List[Scalar]]]])


def _mergekit_settings(settings: Any) -> Any:
    """``settings`` unchanged, once mergekit's grammar accepts them (one line naming the first
    parameter it refuses otherwise)."""
    try:
        _SETTINGS.validate_python(settings)
    except ValidationError as error:
        name = first_validation_problem(error)[0].split(".")[0]
        raise ValueError(
            f"parameter '{name}': mergekit reads a value (a number, a string, true or false), a list of values "
            "(a gradient) or {value, filter} conditions, not this"
        ) from None
    return settings


Settings = Annotated[Optional[Dict[str, Any]], BeforeValidator(_mergekit_settings)]


class AdapterInput(BaseModel):
    """One ``models:`` entry of an adapter recipe: an adapter folder or Hub id, and its parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: Settings = None


# A counterpart of mergekit.config.MergeConfiguration for adapter recipes, kept for the same
# start-up (benchmarks/startup.json); tests/test_counterparts.py holds it to mergekit's
class AdapterMergeConfig(BaseModel):
    """The fields of mergekit's ``MergeConfiguration`` that an adapter merge uses, same names.

    Model references are plain strings (a folder or a Hub id); parameter settings keep
    mergekit's grammar (a value, or ``{filter, value}`` conditions, see
    :func:`evaluate_setting`). Anything else mergekit accepts (``slices``, ``tokenizer``, ...)
    shapes a full model and is refused here.
    """

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: List[AdapterInput] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Settings = None
    dtype: Optional[DtypeName] = None
    out_dtype: Optional[DtypeName] = None
    output: OutputSection = Field(default_factory=OutputSection)

    def referenced_models(self) -> List[str]:
        return ([self.base_model] if self.base_model else []) + [entry.model for entry in self.models]


# mergekit.config.evaluate_setting's rule for adapter recipes (no gradients: adapters have no
# layer index), kept for the same start-up; tests/test_properties.py holds the two equal
def evaluate_setting(setting: Any, tensor_name: str) -> Any:
    """A parameter setting's value for one tensor, with mergekit's filter rules: a plain value
    applies everywhere; in a list of ``{filter, value}`` conditions the first whose filter is
    absent, ``*`` or a substring of ``tensor_name`` wins; ``None`` when none matches."""
    if not isinstance(setting, (dict, list)):
        return setting
    for condition in [setting] if isinstance(setting, dict) else setting:
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            return condition.get("value")
    return None


def setting_form_problem(setting: Any) -> Optional[str]:
    """Why an adapter recipe's setting is not a value or a list of ``{filter, value}`` conditions."""
    conditions = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []
    for condition in conditions:
        if not isinstance(condition, dict):
            return (
                "a list of values is a gradient over layer ranges, which adapter recipes do not have; "
                "give one value or a list of {filter, value} conditions"
            )
        if "value" not in condition or set(condition) - {"filter", "value"}:
            return "a condition takes the keys value and (optionally) filter"
        if isinstance(condition["value"], (dict, list)):
            return "a condition's value must be a single value"
    return None


@dataclass
class Recipe:
    """A parsed recipe: its configuration, the YAML text, and where it came from (``origin``,
    the path or card named in messages).

    ``config`` is mergekit's ``MergeConfiguration``, or an :class:`AdapterMergeConfig` when
    the models are adapter folders (on disk, or on the Hub when an ``output:`` section says so).
    """

    config: Any
    source: str
    origin: str = "recipe"

    @property
    def is_adapter_recipe(self) -> bool:
        return isinstance(self.config, AdapterMergeConfig)

    @property
    def adapter_paths(self) -> List[str]:
        """Model paths that are adapter folders (PEFT LoRA or SeRA; local, or cached Hub ids)."""
        if not self.is_adapter_recipe:
            return []
        return [entry.model for entry in self.config.models if is_adapter_reference(entry.model)]


def is_adapter_reference(reference: str) -> bool:
    """A local adapter folder, or a Hub id whose cached snapshot has an ``adapter_config.json``."""
    from mergekit_seed.references.adapter_files import (
        is_adapter_folder,  # here: adapter reading imports torch, which parsing a recipe need not
    )

    if is_adapter_folder(reference):
        return True
    if "+" in reference or not is_hub_id(reference.partition("@")[0]):
        return False
    try:
        repo_id, _, revision = reference.partition("@")
        return isinstance(try_to_load_from_cache(repo_id, "adapter_config.json", revision=revision or None), str)
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
        return False


def is_adapter_recipe_mapping(data: Dict[str, Any]) -> bool:
    """Whether a parsed recipe mapping is an adapter recipe: it has an ``output:`` section or
    its models are adapter folders (local, or Hub ids cached as adapters)."""
    if "output" in data:
        return True
    models = data.get("models")
    return isinstance(models, list) and any(
        isinstance(entry, dict) and isinstance(entry.get("model"), str) and is_adapter_reference(entry["model"])
        for entry in models
    )


def read_recipe_text(path: str) -> str:
    """A recipe file's text, through the one reader (a regular file, at most :data:`MAX_RECIPE_BYTES`)."""
    return read_text(path, "recipe", MAX_RECIPE_BYTES)


# A real recipe is a few kilobytes.
MAX_RECIPE_BYTES = 1 << 20


def parse_mapping(source: str, origin: str) -> Dict[str, Any]:
    """The recipe text's YAML mapping (safe loader); a :class:`UserError` otherwise."""
    if len(source) > MAX_RECIPE_BYTES:
        raise UserError(
            f"{origin}: {len(source):,} characters is too long for a recipe (at most {MAX_RECIPE_BYTES:,})"
        )
    data = parse_yaml(source, origin)
    if not isinstance(data, dict):
        raise UserError(f"{origin}: a recipe must be a YAML mapping with merge_method and models")
    return data


def _read_mapping(path: str) -> Tuple[str, Dict[str, Any]]:
    source = read_recipe_text(path)
    return source, parse_mapping(source, path)


def is_adapter_recipe_file(path: str) -> bool:
    """Whether ``path`` reads as an adapter recipe; False for anything unreadable."""
    try:
        return is_adapter_recipe_mapping(_read_mapping(path)[1])
    except UserError:
        return False


def parse_recipe(source: str, origin: str = "recipe") -> Recipe:
    """Parse recipe text (safe YAML; mergekit's schema, or the adapter subset); ``origin``
    names it in messages (its path, or the model card it came from)."""
    data = parse_mapping(source, origin)
    try:
        if is_adapter_recipe_mapping(data):
            config = AdapterMergeConfig.model_validate(data)
        else:
            from mergekit.config import MergeConfiguration

            config = MergeConfiguration.model_validate(data)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        if message == "Extra inputs are not permitted":
            top_level = "." not in location  # slices, tokenizer, ...: mergekit's full-model fields
            message = (
                "not used by adapter merges (they change only the adapters' modules)" if top_level else "unknown field"
            )
        raise UserError(f"{origin}: {location}: {message}" if location else f"{origin}: {message}") from None
    except (RuntimeError, ValueError) as error:  # mergekit's validators raise RuntimeError
        raise UserError(f"{origin}: {str(error).splitlines()[0]}") from None
    return Recipe(config=config, source=source, origin=origin)


def load_recipe(path: str) -> Recipe:
    """Parse the recipe file ``path`` (see :func:`parse_recipe`)."""
    return parse_recipe(read_recipe_text(path), path)


def reference_paths(reference) -> List[str]:
    """The paths a model reference names: an adapter recipe's string; or a mergekit
    ModelReference's model, and the LoRA of ``BASE+ADAPTER``."""
    if isinstance(reference, str):
        return [reference]
    paths = [str(reference.model.path)]
    if reference.lora is not None:
        paths.append(str(reference.lora.path))
    return paths


def model_paths_in_order(recipe: Recipe) -> List[str]:
    """Every path the recipe's model references name (both parts of ``BASE+ADAPTER``), once
    each, in the order the recipe writes them; a path mergekit spells differently from the
    recipe comes last, sorted (mergekit returns the references as a set)."""
    named = {path for reference in recipe.config.referenced_models() for path in reference_paths(reference)}
    written = dict.fromkeys(reference_strings(parse_mapping(recipe.source, recipe.origin)))
    return [path for path in written if path in named] + sorted(named - set(written))


def local_inputs(recipe: Recipe) -> List[Path]:
    """Every local file and folder a merge of ``recipe`` reads, as the recipe names them: the
    recipe file, and each existing local path among its references (base, models, slices'
    sources, both parts of ``BASE+ADAPTER``, ``tokenizer_source`` and a tokenizer's sources).
    Hub ids are read from the Hugging Face cache, which no output may overlap either."""
    named = set(model_paths_in_order(recipe))
    named.update(reference_strings(parse_mapping(recipe.source, recipe.origin)))
    files = [Path(recipe.origin)] if Path(recipe.origin).is_file() else []
    return files + [Path(path) for path in sorted(named) if Path(path).exists()]


def substitute_references(value: Any, replacements: Dict[str, str]) -> Any:
    """A parsed recipe (mappings, lists, strings) with every model reference string, or part of
    a ``BASE+ADAPTER`` reference, found in ``replacements`` replaced (paths compared normalised)."""
    normalised = {os.path.normpath(key): new for key, new in replacements.items()}

    def replace(part: str) -> str:
        if not part:
            return part
        return replacements.get(part) or normalised.get(os.path.normpath(part), part)

    if isinstance(value, dict):
        return {key: substitute_references(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute_references(item, replacements) for item in value]
    if isinstance(value, str):
        parts = value.split("+")
        if any(replace(part) != part for part in parts):
            return "+".join(replace(part) for part in parts)
    return value


def rewrite_references(source: str, replacements: Dict[str, str], origin: str) -> str:
    """Recipe text with its model references replaced (:func:`substitute_references`), written
    out again from the parsed YAML (comments are not kept); ``origin`` names it in errors."""
    return yaml.safe_dump(substitute_references(parse_mapping(source, origin), replacements), sort_keys=False)


REFERENCE_KEYS = ("base_model", "model", "tokenizer_source", "source")


# what tokenizer_source (and a tokenizer's source) may say instead of naming a model
TOKENIZER_KEYWORDS = ("base", "union")


def reference_strings(value: Any) -> List[str]:
    """Every model reference a parsed recipe writes (``BASE+ADAPTER`` split in two), in document
    order, with repeats: the strings under ``base_model``, ``model``, ``tokenizer_source`` and
    a tokenizer's ``source``."""
    found: List[str] = []

    def visit(node: Any, under_reference: bool) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                visit(item, under_reference or key in REFERENCE_KEYS)
        elif isinstance(node, list):
            for item in node:
                visit(item, under_reference)
        elif isinstance(node, str) and under_reference:
            found.extend(part for part in node.split("+") if part)

    visit(value, False)
    return found

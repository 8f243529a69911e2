"""Model cards that let anyone reproduce a merge, and reading them back.

The card follows mergekit's Hub layout (YAML front matter with ``base_model``, ``tags``,
``library_name``; merge details; the recipe under "Configuration") and adds what
reproduction needs: the method's paper, both versions, the resolved parameters with
defaults filled in, a sha256 of every input weight file, the merge options, and a
"Reproduce" section. :func:`read_card` extracts all of it again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import Annotated

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.installed import install_command, package_version
from mergekit_seed.methods import is_ours
from mergekit_seed.reader import read_text
from mergekit_seed.recipe import (
    model_paths_in_order,
    parse_mapping,
    reference_paths,
    reference_strings,
    rewrite_references,
)
from mergekit_seed.references.hub import is_hub_id
from mergekit_seed.references.weights import weight_file_hashes
from mergekit_seed.untrusted import bounded_safe_load, fenced_block, front_matter
from mergekit_seed.validation import merge_inputs


CARD_NAME = "README.md"
PROVENANCE_KEY = "mergekit_seed"
# Options that only choose hardware or verbosity; everything else is recorded for reproduction.
HARDWARE_OPTIONS = {
    "cuda",
    "device",
    "multi_gpu",
    "read_to_gpu",
    "low_cpu_memory",
    "quiet",
    "verbosity",
    "num_threads",
    "lora_merge_cache",
    "transformers_cache",
}


def option_flags(options: Dict[str, Any]) -> List[str]:
    """The mergekit command-line flags that set ``options`` (booleans as ``--x``/``--no-x``)."""
    flags = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag} {value}")
    return flags


def local_folders(recipe) -> List[str]:
    """The local folders the recipe names, in the order it names them (the index of a folder
    here is its label ``inputN`` in the card, so seed42 listed first is ``input1`` after the
    base): first the model references (:func:`model_paths_in_order`), then any other local
    folder (``tokenizer_source``, a tokenizer's sources)."""
    models = model_paths_in_order(recipe)
    others = [
        path
        for path in dict.fromkeys(reference_strings(parse_mapping(recipe.source, recipe.origin)))
        if path not in models
    ]
    return [path for path in models + others if Path(path).is_dir()]


def input_labels(recipe) -> Dict[str, str]:
    """{local folder as the recipe names it: ``inputN``}: what a card writes instead of the
    merging machine's paths (Hub ids stay as they are)."""
    return {folder: f"input{index}" for index, folder in enumerate(local_folders(recipe))}


LABEL = re.compile(r"input\d+")


def public_recipe_text(recipe) -> str:
    """The recipe as a card (and mergekit's ``mergekit_config.yml``) records it: every local
    folder replaced by its label ``inputN``. Rewritten from the parsed YAML, so comments,
    which may name paths too, are dropped; a recipe without local folders is kept as written."""
    labels = input_labels(recipe)
    if not labels:
        return recipe.source
    return rewrite_references(recipe.source, labels, recipe.origin)


def hash_inputs(recipe, references) -> Dict[str, Dict[str, Any]]:
    """{``inputN``: {"folder": base name, "files": {weight file: sha256}}} for every local folder
    ``references`` name, labelled as in :func:`input_labels`."""
    wanted = {path for reference in references for path in reference_paths(reference)}
    return {
        label: {"folder": Path(folder).name, "files": weight_file_hashes(Path(folder))}
        for folder, label in input_labels(recipe).items()
        if folder in wanted
    }


def resolved_parameters(method, config) -> Dict[str, Any]:
    """The recipe's global ``parameters:`` (per-model ones set there included), with every
    global default filled in, from the method's mergekit spec (ours and mergekit's alike)."""
    given = config.parameters or {}
    shown_defaults = {
        p.name: p.shown_default for p in getattr(method, "parameters", ()) if p.shown_default is not None
    }
    resolved = {}
    for parameter in method.spec.parameters:
        if parameter.name in given:  # a per-model parameter set here is every model's default
            resolved[parameter.name] = given[parameter.name]
        elif parameter.scope.value == "shared" and not parameter.required:
            resolved[parameter.name] = shown_defaults.get(parameter.name, parameter.default)
    return resolved


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    return value


def _hub_link(path: str) -> str:
    return f"[{path}](https://huggingface.co/{path})" if is_hub_id(path) else path


def reference_md(reference, labels: Optional[Dict[str, str]] = None) -> str:
    """A model reference in markdown, Hub ids linked (``BASE+ADAPTER`` as ``base + adapter``),
    local folders by their ``labels``."""
    labels = labels or {}
    return " + ".join(
        f"`{labels[path]}`" if path in labels else _hub_link(path) for path in reference_paths(reference)
    )


def card_provenance(
    recipe, method, merge_options: Optional[Dict[str, Any]], hub_inputs: Optional[Dict[str, Dict[str, Any]]] = None
) -> Dict[str, Any]:
    """The ``mergekit_seed`` block of a card's front matter: both versions, the install line, the
    method with every parameter resolved, the options that change the result, and the hashes of
    the local inputs (``hub_inputs``: their commits and hashes, from ``hub_provenance``)."""
    return {
        "version": package_version("mergekit-seed"),
        "mergekit_version": package_version("mergekit"),
        "install": install_command(),
        "merge_method": recipe.config.merge_method,
        "parameters": {k: _jsonable(v) for k, v in resolved_parameters(method, recipe.config).items()},
        "options": {k: v for k, v in (merge_options or {}).items() if k not in HARDWARE_OPTIONS},
        "inputs": hash_inputs(recipe, merge_inputs(recipe, method)),
        "hub_inputs": hub_inputs or {},
    }


def card_metadata(recipe, provenance: Dict[str, Any], output_kind: str) -> Dict[str, Any]:
    """The card's YAML front matter, in the Hub's layout (``base_model`` lists Hub ids only)."""
    references = recipe.config.referenced_models()
    hub_ids = sorted(
        {path.partition("@")[0] for ref in references for path in reference_paths(ref) if is_hub_id(path)}
    )
    return {
        "base_model": hub_ids,
        "base_model_relation": "merge",
        "tags": ["mergekit", "merge", "mergekit-seed"],
        "library_name": "peft" if output_kind == "lora" else "transformers",
        PROVENANCE_KEY: provenance,
    }


def _method_line(method, config, labels: Dict[str, str]) -> str:
    """ "This model was merged using ..." and the paper, in markdown."""
    paper = getattr(method, "paper", None)
    if method.spec.reference_url:
        paper = f"[{paper or method.spec.reference_url}]({method.spec.reference_url})"
    base_text = f" using {reference_md(config.base_model, labels)} as a base" if config.base_model else ""
    if config.base_model and not getattr(method, "needs_base", True):
        base_text = (
            f" (base model {reference_md(config.base_model, labels)} listed but not an input: the method needs none)"
        )
    return (
        f"This model was merged using the **{method.spec.pretty_name or method.spec.name}** merge "
        f"method{base_text}.\nPaper: *{paper}*."
    )


def _parameter_tables(config, provenance: Dict[str, Any], labels: Dict[str, str]) -> str:
    """The resolved parameters (from the recipe or the default), then the per-model ones."""
    rows = "\n".join(
        f"| `{name}` | `{json.dumps(value)}` | {'recipe' if name in (config.parameters or {}) else 'default'} |"
        for name, value in provenance["parameters"].items()
    )
    per_model = [
        f"* {reference_md(m.model, labels)}: `{json.dumps(_jsonable(m.parameters))}`"
        for m in config.models or []
        if m.parameters
    ]
    per_model_text = ("Per-model parameters:\n\n" + "\n".join(per_model)) if per_model else ""
    return f"| parameter | value | from |\n|---|---|---|\n{rows}\n\n{per_model_text}"


def _unread_note(labels: List[str]) -> str:
    """The reproduce section's word on inputs the merge did not read (no hash above): the
    recipe still names them, so reproduce asks for a folder, and nothing about it is checked."""
    if not labels:
        return ""
    listed = ", ".join(labels)
    return (
        f"\n# {listed}: not read by this merge (no hash above; a LoRA output of factor-only adapters needs no "
        "base weights), so its files are not checked: give the folder of that model you have"
    )


def _input_rows(inputs: Dict[str, Dict[str, Any]]) -> str:
    rows = [
        f"| `{label}` ({entry['folder']}) | `{name}` | `{digest}` |"
        for label, entry in inputs.items()
        for name, digest in entry["files"].items()
    ]
    return "\n".join(rows) or "| (no local weight files) | | |"


CARD_TEMPLATE = """---
{metadata}
---
# {title}

This is {kind} merged from {merged_from} with
[mergekit-seed](https://pypi.org/project/mergekit-seed/) {version} on
[mergekit](https://github.com/arcee-ai/mergekit) {mergekit_version}.

## Merge Details

### Merge Method

{method_line}

### Models Merged

{models}

### Parameters

{parameters}

### Inputs

| input | weight file | sha256 |
|---|---|---|
{input_rows}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{recipe}
```

## Reproduce

```sh
pip install torch "mergekit=={mergekit_version}" {install}
# straight from this card (or from its Hub repository: mergekit-seed reproduce ORG/NAME OUT ...), Hub
# inputs at their recorded revisions, local inputs (inputN) from your folders, checking every tensor:{unread_note}
mergekit-seed reproduce README.md OUT{input_flags} --check .
# or save the Configuration above as recipe.yml, put your folders in place of inputN, and:
mergekit-seed run recipe.yml OUT{option_flags}
```
"""


def render_card(
    recipe,
    method,
    merge_options: Optional[Dict[str, Any]],
    output_kind: str,
    hub_inputs: Optional[Dict[str, Dict[str, Any]]] = None,
    title: str = "Merged model",
) -> str:
    """The README.md text for a finished merge (:data:`CARD_TEMPLATE`); ``hub_inputs`` is
    :func:`mergekit_seed.references.hub.hub_provenance` of the Hub ids the merge resolved (commits and
    file hashes), ``title`` the model's name."""
    config = recipe.config
    provenance = card_provenance(recipe, method, merge_options, hub_inputs)
    labels = input_labels(recipe)
    seeds = [m.model for m in config.models or [] if m.model != config.base_model]
    return CARD_TEMPLATE.format(
        metadata=yaml.safe_dump(card_metadata(recipe, provenance, output_kind), sort_keys=False).strip(),
        title=title,
        kind={"lora": "a LoRA adapter", "full": "a full model"}.get(output_kind, "a merged model"),
        merged_from=f"{len(seeds)} seed runs" if is_ours(method) else f"{len(seeds)} models",
        version=provenance["version"],
        mergekit_version=provenance["mergekit_version"],
        method_line=_method_line(method, config, labels),
        models="\n".join("* " + reference_md(m, labels) for m in seeds),
        parameters=_parameter_tables(config, provenance, labels),
        input_rows=_input_rows(provenance["inputs"]),
        recipe=public_recipe_text(recipe).strip(),
        install=provenance["install"],
        input_flags="".join(f" --input {label}=PATH" for label in labels.values()),
        unread_note=_unread_note([label for label in labels.values() if label not in provenance["inputs"]]),
        option_flags="".join(f" {flag}" for flag in option_flags(provenance["options"])),
    )


class InputRecord(BaseModel):
    """A local input in a card: its folder's base name and {weight file: sha256}."""

    model_config = ConfigDict(extra="forbid")

    folder: Optional[str] = None
    files: Dict[str, str] = Field(default_factory=dict)


class HubInputRecord(BaseModel):
    """A Hub input in a card: the commit it resolved to and {weight file: sha256}."""

    model_config = ConfigDict(extra="forbid")

    revision: Optional[str] = None
    files: Dict[str, str] = Field(default_factory=dict)


def _not_a_record(files: Dict[str, str]) -> Dict[str, str]:
    if {"folder", "files"} & set(files):
        raise ValueError("a labelled input is {folder, files: {weight file: sha256}}")
    return files


# the inputs of cards written before labels: {weight file: sha256}, never a labelled record
OldInputFiles = Annotated[Dict[str, str], AfterValidator(_not_a_record)]


class Provenance(BaseModel):
    """The ``mergekit_seed`` block of a card's front matter (every field checked: a card is
    untrusted input). Cards written before inputs were labelled key them by folder path, with
    {weight file: sha256} as the value."""

    model_config = ConfigDict(extra="allow")

    version: Optional[str] = None
    mergekit_version: Optional[str] = None
    install: Optional[str] = None
    merge_method: Optional[str] = None
    parameters: Dict[str, Any] = Field(default_factory=dict)
    options: Dict[str, Any] = Field(default_factory=dict)
    inputs: Dict[str, Union[InputRecord, OldInputFiles]] = Field(default_factory=dict)
    hub_inputs: Dict[str, HubInputRecord] = Field(default_factory=dict)


def _front_matter(text: str, path: Path) -> Dict[str, Any]:
    front = front_matter(text)
    if front is None:
        return {}
    try:
        data = bounded_safe_load(front, str(path))
    except yaml.YAMLError:
        raise UserError(f"{path}: the YAML front matter is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the YAML front matter is not a mapping (key: value lines)")
    return data


def read_card(source: Path) -> Dict[str, Any]:
    """{"recipe": YAML text, "provenance": {...} or {}} from a card or an output folder; every
    part of the provenance is checked (one line naming the field when it is malformed)."""
    path = source / CARD_NAME if source.is_dir() else source
    text = read_text(path, "model card", within=source if source.is_dir() else None)
    recipe = fenced_block(text, "### Configuration", "yaml")
    if recipe is None:
        raise UserError(f"{path}: no '### Configuration' YAML block; is this a mergekit model card?")
    recorded = _front_matter(text, path).get(PROVENANCE_KEY)
    if recorded is None:
        return {"recipe": recipe, "provenance": {}}
    try:
        provenance = Provenance.model_validate(recorded)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(
            f"{path}: {PROVENANCE_KEY}.{location}: {message}" if location else f"{path}: {PROVENANCE_KEY}: {message}"
        ) from None
    return {"recipe": recipe, "provenance": provenance.model_dump()}

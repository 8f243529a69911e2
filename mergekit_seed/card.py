"""Model cards that let anyone reproduce a merge, and reading them back.

The card follows mergekit's Hub layout (YAML front matter with ``base_model``, ``tags``,
``library_name``; merge details; the recipe under "Configuration") and adds what
reproduction needs: the method's paper, both versions, the resolved parameters with
defaults filled in, a sha256 of every input weight file, the merge options, and a
"Reproduce" section. :func:`read_card` extracts all of it again.
"""

from __future__ import annotations

import json
import math
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import Annotated

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.finite import largest_difference
from mergekit_seed.recipe import (
    bounded_safe_load,
    parse_mapping,
    read_recipe_text,
    reference_paths,
    reference_strings,
    rewrite_references,
    substitute_references,
)
from mergekit_seed.references.hub import is_hub_id
from mergekit_seed.references.weights import hashed_weight_files, load_weights, sha256_file, weight_file_hashes
from mergekit_seed.untrusted import fenced_block, front_matter, read_json

CARD_NAME = "README.md"
PROVENANCE_KEY = "mergekit_seed"
# Options that only choose hardware or verbosity; everything else is recorded for reproduction.
HARDWARE_OPTIONS = {"cuda", "device", "multi_gpu", "read_to_gpu", "low_cpu_memory", "quiet", "verbosity", "num_threads", "lora_merge_cache", "transformers_cache"}


# options that run code shipped with the inputs: never taken from a card
CODE_OPTIONS = {"trust_remote_code"}


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


def card_options(recorded: Any, trust_remote_code: bool, origin: str) -> Tuple[Dict[str, Any], List[str]]:
    """The merge options a card records, checked as untrusted input; returns them and warnings.

    Every key must be a mergekit option with a valid value. Hardware and path options are
    ignored (they come from the command line). An option that runs code shipped with the
    models (``trust_remote_code``) is never taken from a card: a card asking for it is refused
    unless the user passed it (``trust_remote_code``), which then applies whatever the card says.
    """
    from mergekit.options import MergeOptions

    if recorded is None:
        recorded = {}
    if not isinstance(recorded, dict):
        raise UserError(f"{origin}: options: must be a mapping of mergekit options")
    options: Dict[str, Any] = {}
    warnings: List[str] = []
    for key, value in recorded.items():
        if key not in MergeOptions.model_fields:
            raise UserError(f"{origin}: options.{key}: not a mergekit option")
        if key in HARDWARE_OPTIONS:
            warnings.append(f"{origin}: options.{key} ignored: hardware and path options come from the command line")
        elif key in CODE_OPTIONS:
            if value and not trust_remote_code:
                raise UserError(
                    f"{origin}: the card asks for {key}, which runs Python code shipped with the models; reproduce "
                    f"never enables it from a card: pass --{key.replace('_', '-')} if you trust every model the recipe names"
                )
        else:
            options[key] = value
    if trust_remote_code:
        options["trust_remote_code"] = True
    try:
        MergeOptions(**options)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(f"{origin}: options.{location}: {message}") from None
    return options, warnings


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


def install_command() -> str:
    """The pip requirement that installs this mergekit-seed again, from where it came (PEP 610
    ``direct_url.json``): a VCS URL at its commit, a local folder's git remote at its commit,
    else the index version."""
    import subprocess
    from importlib.metadata import distribution

    try:
        direct = json.loads(distribution("mergekit-seed").read_text("direct_url.json") or "null")
    except (PackageNotFoundError, ValueError):
        direct = None
    pinned = f'"mergekit-seed=={package_version("mergekit-seed")}"'
    if not direct:
        return pinned
    url = direct.get("url", "")
    vcs = direct.get("vcs_info")
    if vcs:
        return f'"mergekit-seed @ {vcs.get("vcs", "git")}+{public_url(url)}@{vcs.get("commit_id", "")}"'
    if url.startswith("file://"):
        folder = url[len("file://"):]
        try:
            def git(*args: str) -> str:
                return subprocess.run(
                    ["git", "-C", folder, *args], capture_output=True, text=True, check=True, timeout=5
                ).stdout.strip()

            remote, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
            if remote and commit and not remote.startswith(("/", ".", "file:")):
                return f'"mergekit-seed @ git+{public_url(remote)}@{commit}"'
        except (OSError, subprocess.SubprocessError):
            pass
        return f"{pinned}  # installed from a local folder: install that source instead"
    return pinned


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def merge_inputs(recipe, method) -> List[Any]:
    """The model references whose files the merge of ``recipe`` by ``method`` reads: every
    referenced model, except the base model of an adapter merge that writes a LoRA adapter and
    needs no base weights (:func:`~mergekit_seed.references.adapters.why_base_is_read`, the
    answer the engine acts on)."""
    from mergekit_seed.references.adapters import why_base_is_read  # here: adapter reading imports torch, which cards need not

    config = recipe.config
    if recipe.is_adapter_recipe and config.output.format == "lora":
        adapters = [entry.model for entry in config.models]
        needs_base = getattr(method, "needs_base", True)
        base_read = config.base_model and why_base_is_read(adapters, needs_base, "lora", config.base_model) is not None
        return ([config.base_model] if base_read else []) + adapters
    return config.referenced_models()


def _local_folders(recipe) -> List[str]:
    """The local folders of the recipe's model references, sorted (the index of a folder here
    is its label ``inputN`` in the card; mergekit returns the references as a set), then any
    other local folder the recipe names (``tokenizer_source``, a tokenizer's sources), sorted."""
    folders: List[str] = []
    for reference in sorted(recipe.config.referenced_models(), key=str):
        for path in reference_paths(reference):
            if Path(path).is_dir() and path not in folders:
                folders.append(path)
    others = {path for path in reference_strings(parse_mapping(recipe.source, recipe.origin)) if Path(path).is_dir()}
    return folders + sorted(others - set(folders))


def input_labels(recipe) -> Dict[str, str]:
    """{local folder as the recipe names it: ``inputN``}: what a card writes instead of the
    merging machine's paths (Hub ids stay as they are)."""
    return {folder: f"input{index}" for index, folder in enumerate(_local_folders(recipe))}


LABEL = re.compile(r"input\d+")


def public_recipe_text(recipe) -> str:
    """The recipe as a card (and mergekit's ``mergekit_config.yml``) records it: every local
    folder replaced by its label ``inputN``. Rewritten from the parsed YAML, so comments,
    which may name paths too, are dropped; a recipe without local folders is kept as written."""
    labels = input_labels(recipe)
    if not labels:
        return recipe.source
    return rewrite_references(recipe.source, labels, recipe.origin)


def card_labels(recipe_text: str, origin: str) -> List[str]:
    """The ``inputN`` labels a card's recipe names, each once, by N."""
    data = parse_mapping(recipe_text, origin)
    return sorted({part for part in reference_strings(data) if LABEL.fullmatch(part)}, key=lambda label: int(label[5:]))


def labels_from_recipe(card_recipe: str, card_origin: str, user_recipe: str, origin: str) -> Dict[str, str]:
    """{``inputN``: path}: where the user's own copy of the recipe (``reproduce --recipe``,
    read from ``origin``) has the local folders the card's recipe labels. The two must be the
    same recipe but for those folders (references are paired in document order)."""
    card_data, user_data = parse_mapping(card_recipe, card_origin), parse_mapping(user_recipe, origin)
    card_references, user_references = reference_strings(card_data), reference_strings(user_data)
    mapping: Dict[str, str] = {}
    if len(card_references) == len(user_references):
        for label, path in zip(card_references, user_references):
            if LABEL.fullmatch(label) and mapping.setdefault(label, path) != path:
                break
        else:
            if substitute_references(card_data, mapping) == user_data:
                return mapping
    raise UserError(
        f"{origin}: not the card's recipe with its inputs filled in (method, parameters and the order of the "
        "models must be the same); give the inputs with --input inputN=PATH instead"
    )


def fill_inputs(
    card_recipe: str, card_origin: str, given: List[str], user_recipe: Optional[str] = None
) -> Tuple[str, Optional[Dict[str, str]]]:
    """The card's recipe (named ``card_origin`` in errors) with each ``inputN`` replaced by the
    folder the user gives for it, and {``inputN``: folder} (None for a card whose recipe names
    its folders itself).

    ``given`` holds ``inputN=PATH`` items (``reproduce --input``); ``user_recipe`` is the path of
    the user's own copy of the recipe (``reproduce --recipe``), paired with the card's by
    :func:`labels_from_recipe`. Every label must get a folder.
    """
    labels = card_labels(card_recipe, card_origin)
    if not labels:
        return card_recipe, None
    mapping = {}
    if user_recipe is not None:
        mapping = labels_from_recipe(card_recipe, card_origin, read_recipe_text(user_recipe), user_recipe)
    for item in given:
        label, separator, path = item.partition("=")
        if not separator or not LABEL.fullmatch(label) or not path:
            raise UserError(f"--input {item}: write it as inputN=PATH (the card's recipe names {', '.join(labels)})")
        if label not in labels:
            raise UserError(f"--input {item}: the card's recipe names no {label} (it names {', '.join(labels)})")
        mapping[label] = str(Path(path).absolute())
    missing = [label for label in labels if label not in mapping]
    if missing:
        flags = " ".join(f"--input {label}=PATH" for label in missing)
        raise UserError(
            f"{card_origin}: the card names its local inputs {', '.join(missing)} without their paths; give the folder of each "
            f"({flags}) or your copy of the recipe (--recipe FILE)"
        )
    return rewrite_references(card_recipe, mapping, card_origin), mapping


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
    shown_defaults = {p.name: p.shown_default for p in getattr(method, "parameters", ()) if p.shown_default is not None}
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
    return " + ".join(f"`{labels[path]}`" if path in labels else _hub_link(path) for path in reference_paths(reference))


def render_card(
    recipe,
    method,
    merge_options: Optional[Dict[str, Any]],
    output_kind: str,
    hub_inputs: Optional[Dict[str, Dict[str, Any]]] = None,
    title: str = "Merged model",
) -> str:
    """The README.md text for a finished merge; ``hub_inputs`` is
    :func:`mergekit_seed.references.hub.hub_provenance` of the Hub ids the merge resolved (commits and
    file hashes), ``title`` the model's name."""
    config = recipe.config
    options = {k: v for k, v in (merge_options or {}).items() if k not in HARDWARE_OPTIONS}
    inputs = hash_inputs(recipe, merge_inputs(recipe, method))
    labels = input_labels(recipe)
    hub_ids = [path for reference in config.referenced_models() for path in reference_paths(reference) if is_hub_id(path)]
    hub_ids = sorted({path.partition("@")[0] for path in hub_ids})
    provenance = {
        "version": package_version("mergekit-seed"),
        "mergekit_version": package_version("mergekit"),
        "install": install_command(),
        "merge_method": config.merge_method,
        "parameters": {k: _jsonable(v) for k, v in resolved_parameters(method, config).items()},
        "options": options,
        "inputs": inputs,
        "hub_inputs": hub_inputs or {},
    }
    metadata = {
        "base_model": hub_ids,
        "base_model_relation": "merge",
        "tags": ["mergekit", "merge", "mergekit-seed"],
        "library_name": "peft" if output_kind == "lora" else "transformers",
        PROVENANCE_KEY: provenance,
    }
    pretty = method.spec.pretty_name or method.spec.name
    paper = getattr(method, "paper", None)
    if method.spec.reference_url:
        paper = f"[{paper or method.spec.reference_url}]({method.spec.reference_url})"
    base_text = f" using {reference_md(config.base_model, labels)} as a base" if config.base_model else ""
    if config.base_model and not getattr(method, "needs_base", True):
        base_text = f" (base model {reference_md(config.base_model, labels)} listed but not an input: the method needs none)"
    seeds = [m.model for m in config.models or [] if m.model != config.base_model]
    parameter_rows = "\n".join(
        f"| `{name}` | `{json.dumps(value)}` | "
        f"{'recipe' if name in (config.parameters or {}) else 'default'} |"
        for name, value in provenance["parameters"].items()
    )
    per_model = [
        f"* {reference_md(m.model, labels)}: `{json.dumps(_jsonable(m.parameters))}`"
        for m in config.models or []
        if m.parameters
    ]
    input_rows = "\n".join(
        f"| `{label}` ({entry['folder']}) | `{name}` | `{digest}` |"
        for label, entry in inputs.items()
        for name, digest in entry["files"].items()
    ) or "| (no local weight files) | | |"
    input_flags = "".join(f" --input {label}=PATH" for label in labels.values())
    option_text = "".join(f" {flag}" for flag in option_flags(options))
    kind_text = {"lora": "a LoRA adapter", "full": "a full model"}.get(output_kind, "a merged model")
    from mergekit_seed.methods import is_ours  # here: methods imports torch, which reading a card does not need

    merged_from = f"{len(seeds)} seed runs" if is_ours(method) else f"{len(seeds)} models"
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---
# {title}

This is {kind_text} merged from {merged_from} with
[mergekit-seed](https://pypi.org/project/mergekit-seed/) {provenance['version']} on
[mergekit](https://github.com/arcee-ai/mergekit) {provenance['mergekit_version']}.

## Merge Details

### Merge Method

This model was merged using the **{pretty}** merge method{base_text}.
Paper: *{paper}*.

### Models Merged

{chr(10).join('* ' + reference_md(m, labels) for m in seeds)}

### Parameters

| parameter | value | from |
|---|---|---|
{parameter_rows}

{('Per-model parameters:' + chr(10) + chr(10) + chr(10).join(per_model)) if per_model else ''}

### Inputs

| input | weight file | sha256 |
|---|---|---|
{input_rows}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{public_recipe_text(recipe).strip()}
```

## Reproduce

```sh
pip install torch "mergekit=={provenance['mergekit_version']}" {provenance['install']}
# straight from this card (or from its Hub repository: mergekit-seed reproduce ORG/NAME OUT ...), Hub
# inputs at their recorded revisions, local inputs (inputN) from your folders, checking every tensor:
mergekit-seed reproduce README.md OUT{input_flags} --check .
# or save the Configuration above as recipe.yml, put your folders in place of inputN, and:
mergekit-seed run recipe.yml OUT{option_text}
```
"""




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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read model card ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the model card is not UTF-8 text") from None
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
        raise UserError(f"{path}: {PROVENANCE_KEY}.{location}: {message}" if location else f"{path}: {PROVENANCE_KEY}: {message}") from None
    return {"recipe": recipe, "provenance": provenance.model_dump()}


def recorded_folders(recorded: Dict[str, Any], recipe, labels: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """{key of a card's ``inputs``: the local folder it stands for}. ``labels`` gives the folder
    of each ``inputN`` (the card's recipe names labels); without it the recipe names the folders
    itself (cards written before labels, where ``inputN`` is the N-th local folder of the recipe,
    or keys are folders)."""
    if labels is not None:
        return {key: labels[key] for key in recorded if key in labels}
    folders = _local_folders(recipe)
    found = {}
    for key in recorded:
        if LABEL.fullmatch(key):
            if int(key[5:]) < len(folders):
                found[key] = folders[int(key[5:])]
        elif key in folders:  # a card is untrusted: only a folder its recipe names
            found[key] = key
    return found


def verify_inputs(recorded: Dict[str, Any], folders: Dict[str, str]) -> List[str]:
    """One line per recorded input weight file that is missing or whose sha256 differs;
    ``folders`` maps each recorded input to its folder (:func:`recorded_folders`)."""
    problems = []
    for key, entry in recorded.items():
        if key not in folders:
            name = entry.get("folder") if isinstance(entry, dict) and isinstance(entry.get("folder"), str) else key
            problems.append(f"{key} ({name}): the recipe has no such local input")
            continue
        files = (entry.get("files") or {}) if "files" in entry or "folder" in entry else entry
        # a card is untrusted: it may name only weight files inside the input folders, never a
        # path (absolute, ../) that would make reproduce read and hash any file
        weight_files = {path.name for path in hashed_weight_files(Path(folders[key]))}
        for name, digest in files.items():
            path = Path(folders[key]) / name
            if Path(name).name != name or name in ("", ".", "..") or (name not in weight_files and path.exists()):
                problems.append(f"{key}: the card names {name!r}, which is not a weight file in the input's folder; refused")
                continue
            if not path.is_file():
                problems.append(f"input {path} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"input {path} has changed (sha256 differs from the card)")
    return problems


def compare_weights(result: Path, reference: Path):
    """Compare every tensor of two output folders' weight files (safetensors or ``.bin``).

    Returns (name of the tensor with the largest absolute difference, that difference,
    problems such as tensors present in one folder only or with different shapes).
    """
    theirs = load_weights(reference)
    if not theirs:
        raise UserError(f"{reference}: no weight files (*.safetensors or *.bin) to compare with")
    ours = load_weights(result)
    problems = [f"{name} is only in {reference}" for name in sorted(set(theirs) - set(ours))]
    problems += [f"{name} is only in {result}" for name in sorted(set(ours) - set(theirs))]
    worst_name, worst = "", 0.0
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            problems.append(f"{name} has shape {tuple(a.shape)} here and {tuple(b.shape)} in {reference}")
            continue
        difference = largest_difference(a, b)
        if difference == math.inf:
            problems.append(f"{name} holds NaN or Inf here or in {reference}, which never counts as equal")
        if difference > worst or not worst_name:
            worst_name, worst = name, difference
    return worst_name, worst, problems + compare_configs(result, reference)


# written by whichever transformers saved the file, not part of what the model computes
CONFIG_KEYS_NOT_COMPARED = ("transformers_version",)


def compare_configs(result: Path, reference: Path) -> List[str]:
    """Differences between two folders' ``config.json`` (and ``adapter_config.json``), key by
    key: a different ``tie_word_embeddings`` or ``rope_theta`` changes what the model computes
    as surely as a different tensor."""
    problems = []
    for name in ("config.json", "adapter_config.json"):
        mine, theirs = result / name, reference / name
        if not mine.is_file() and not theirs.is_file():
            continue
        if mine.is_file() != theirs.is_file():
            problems.append(f"{name} is only in {result if mine.is_file() else reference}")
            continue
        try:
            ours, others = (read_json(path, name) for path in (mine, theirs))
        except UserError as error:
            problems.append(str(error))
            continue
        if not isinstance(ours, dict) or not isinstance(others, dict):
            problems.append(f"{name}: not a JSON object in both folders")
            continue
        for key in sorted((set(ours) | set(others)) - set(CONFIG_KEYS_NOT_COMPARED)):
            if ours.get(key, "(absent)") != others.get(key, "(absent)"):
                problems.append(f"{name}: {key} is {ours.get(key, '(absent)')!r} here and {others.get(key, '(absent)')!r} in {reference}")
    return problems

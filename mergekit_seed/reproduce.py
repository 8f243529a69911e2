"""Reproducing a merge from its model card: the card's options and labelled inputs checked as
untrusted input, the recorded input hashes verified, and the result compared with a reference
folder tensor by tensor (``mergekit-seed reproduce``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import ValidationError

from mergekit_seed.card import CARD_NAME, HARDWARE_OPTIONS, LABEL, local_folders, read_card
from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.finite import largest_difference
from mergekit_seed.hub_recipes import hub_references
from mergekit_seed.installed import package_version
from mergekit_seed.reader import read_json, sha256
from mergekit_seed.recipe import (
    TOKENIZER_KEYWORDS,
    Recipe,
    parse_mapping,
    parse_recipe,
    read_recipe_text,
    reference_strings,
    rewrite_references,
    substitute_references,
)
from mergekit_seed.references.hub import (
    download_file,
    has_hub_id_form,
    is_hub_id,
    resolve,
    split_revision,
    verify_hub_inputs,
)
from mergekit_seed.references.weights import hashed_weight_files, load_weights, weight_files


# options that run code shipped with the inputs: never taken from a card
CODE_OPTIONS = {"trust_remote_code"}


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
                    f"never enables it from a card: pass --{key.replace('_', '-')} if you trust every model the "
                    "recipe names"
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


def card_labels(recipe_text: str, origin: str) -> List[str]:
    """The ``inputN`` labels a card's recipe names, each once, by N."""
    data = parse_mapping(recipe_text, origin)
    return sorted(
        {part for part in reference_strings(data) if LABEL.fullmatch(part)}, key=lambda label: int(label[5:])
    )


def card_local_paths(recipe_text: str, origin: str) -> List[str]:
    """The references of a card's recipe that name this machine's files: anything but an
    ``inputN`` label or a Hub id (``org/name[@revision]``) that is not also a local path here.
    A card comes from a stranger: these are never read (cards written before labels named their
    folders so; ``--recipe`` gives the user's own)."""
    found = []
    for reference in dict.fromkeys(reference_strings(parse_mapping(recipe_text, origin))):
        if LABEL.fullmatch(reference) or reference in TOKENIZER_KEYWORDS:
            continue
        if has_hub_id_form(split_revision(reference)[0]) and not os.path.lexists(split_revision(reference)[0]):
            continue
        found.append(reference)
    return found


def labels_from_recipe(
    card_recipe: str, card_origin: str, user_recipe: str, origin: str, replaced: List[str]
) -> Dict[str, str]:
    """{label or local path of the card: path}: where the user's own copy of the recipe
    (``reproduce --recipe``, read from ``origin``) has what the card's recipe labels, or names
    by a local path (``replaced``). The two must be the same recipe but for those (references
    are paired in document order)."""
    card_data, user_data = parse_mapping(card_recipe, card_origin), parse_mapping(user_recipe, origin)
    card_references, user_references = reference_strings(card_data), reference_strings(user_data)
    mapping: Dict[str, str] = {}
    if len(card_references) == len(user_references):
        for reference, path in zip(card_references, user_references):
            if (LABEL.fullmatch(reference) or reference in replaced) and mapping.setdefault(reference, path) != path:
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
) -> Tuple[str, Dict[str, str]]:
    """The card's recipe (named ``card_origin`` in errors) with each ``inputN`` replaced by the
    folder the user gives for it, and {``inputN`` (or a local path an older card names): folder}.

    ``given`` holds ``inputN=PATH`` items (``reproduce --input``); ``user_recipe`` is the path of
    the user's own copy of the recipe (``reproduce --recipe``), paired with the card's by
    :func:`labels_from_recipe`. Every label must get a folder. A card whose recipe names a local
    path (:func:`card_local_paths`) is refused unless ``user_recipe`` replaces it: a card never
    chooses what is read.
    """
    labels = card_labels(card_recipe, card_origin)
    local = card_local_paths(card_recipe, card_origin)
    if local and user_recipe is None:
        raise UserError(
            f"{card_origin}: names {local[0]!r} where a model, adapter or tokenizer goes, which is a path on this "
            "machine, "
            "not an inputN label or a Hub id; a card never chooses which local files are read: give your copy of the "
            "recipe with --recipe FILE"
        )
    mapping: Dict[str, str] = {}
    if user_recipe is not None:
        mapping = labels_from_recipe(card_recipe, card_origin, read_recipe_text(user_recipe), user_recipe, local)
    for item in given:
        label, separator, path = item.partition("=")
        if not separator or not LABEL.fullmatch(label) or not path:
            raise UserError(
                f"--input {item}: write it as inputN=PATH (the card's recipe names {', '.join(labels) or 'no inputN'})"
            )
        if label not in labels:
            raise UserError(
                f"--input {item}: the card's recipe names no {label} (it names {', '.join(labels) or 'none'})"
            )
        mapping[label] = str(Path(path).absolute())
    missing = [label for label in labels if label not in mapping]
    if missing:
        flags = " ".join(f"--input {label}=PATH" for label in missing)
        raise UserError(
            f"{card_origin}: the card names its local inputs {', '.join(missing)} without their paths; give the "
            "folder of each "
            f"({flags}) or your copy of the recipe (--recipe FILE)"
        )
    return (rewrite_references(card_recipe, mapping, card_origin) if mapping else card_recipe), mapping


def recorded_folders(recorded: Dict[str, Any], recipe, mapping: Dict[str, str]) -> Dict[str, str]:
    """{key of a card's ``inputs``: the local folder it stands for}: a label or a local path the
    user's folders replaced (``mapping``, :func:`fill_inputs`); in a card written before labels,
    whose recipe named its folders, ``inputN`` is the N-th local folder of the recipe (the user's,
    filled in)."""
    if any(LABEL.fullmatch(key) for key in mapping):
        return {key: mapping[key] for key in recorded if key in mapping}
    folders = local_folders(recipe)
    found = {}
    for key in recorded:
        if key in mapping:
            found[key] = mapping[key]
        elif LABEL.fullmatch(key) and int(key[5:]) < len(folders):
            found[key] = folders[int(key[5:])]
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
                problems.append(
                    f"{key}: the card names {name!r}, which is not a weight file in the input's folder; refused"
                )
                continue
            if not path.is_file():
                problems.append(f"input {path} is missing")
            elif sha256(path, within=folders[key]) != digest:
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
            ours, others = (read_json(path, name, within=path.parent) for path in (mine, theirs))
        except UserError as error:
            problems.append(str(error))
            continue
        if not isinstance(ours, dict) or not isinstance(others, dict):
            problems.append(f"{name}: not a JSON object in both folders")
            continue
        for key in sorted((set(ours) | set(others)) - set(CONFIG_KEYS_NOT_COMPARED)):
            if ours.get(key, "(absent)") != others.get(key, "(absent)"):
                problems.append(
                    f"{name}: {key} is {ours.get(key, '(absent)')!r} here and {others.get(key, '(absent)')!r} in "
                    f"{reference}"
                )
    return problems


@dataclass
class Reproduction:
    """What a card asks to re-run, checked as untrusted input before anything is read: the card,
    its recipe with the local inputs filled in, the mergekit options it records (hardware ones
    dropped), warnings, input files that differ from the recorded hashes, the Hub revisions to
    pin, and the folder ``--check`` compares with."""

    card_path: Path
    recipe: Recipe
    options: Dict[str, Any]
    warnings: List[str]
    mismatches: List[str]
    revisions: Dict[str, str]
    check_dir: Optional[Path]

    @property
    def protected(self) -> List[Path]:
        """Neither the card nor the folder ``--check`` compares with may be written over."""
        return [self.card_path] + ([self.check_dir] if self.check_dir is not None else [])


def locate_card(source: str) -> Tuple[Path, Optional[Path]]:
    """(the card, the folder of the source's weights) for a card file, an output folder or a Hub
    repository id ``ORG/NAME[@REVISION]`` (its card through the cache; its weights are found
    only when ``--check`` needs them: None)."""
    if Path(source).exists():
        card_path = Path(source) / CARD_NAME if Path(source).is_dir() else Path(source)
        return card_path, card_path.parent
    if is_hub_id(split_revision(source)[0]):
        repo_id, revision = split_revision(source)
        return download_file(repo_id, CARD_NAME, revision), None
    raise UserError(f"{source}: neither a card, an output folder nor a Hub repository id (ORG/NAME[@REVISION])")


def _version_warnings(provenance: Dict[str, Any]) -> List[str]:
    warnings = []
    for package, key in (("mergekit-seed", "version"), ("mergekit", "mergekit_version")):
        recorded, installed = provenance.get(key), package_version(package)
        if recorded and recorded != installed:
            warnings.append(f"the merge was made with {package} {recorded}; {installed} is installed")
    return warnings


def prepare_reproduction(
    source: str,
    given_inputs: List[str],
    user_recipe: Optional[str],
    trust_remote_code: bool,
    check_dir: Optional[str],
    check_source: str,
) -> Reproduction:
    """Read and check the card of ``source`` (:func:`locate_card`) for ``mergekit-seed
    reproduce``: its options (:func:`card_options`), its recipe with ``given_inputs``
    (``inputN=PATH``) or the user's copy of the recipe filled in (:func:`fill_inputs`), and its
    recorded input hashes (:func:`verify_inputs`, ``verify_hub_inputs``). ``check_dir`` equal
    to ``check_source`` means the source's own weights."""
    card_path, source_weights = locate_card(source)
    card = read_card(card_path)
    provenance = card["provenance"]
    if not provenance:
        raise UserError(
            f"{card_path}: the card records no mergekit-seed provenance (versions, inputs, options); it cannot be "
            "reproduced"
        )
    options, warnings = card_options(provenance.get("options"), trust_remote_code, str(card_path))
    recipe_origin = f"{card_path} (recipe)"
    recipe_text, mapping = fill_inputs(card["recipe"], recipe_origin, given_inputs, user_recipe)
    recipe = parse_recipe(recipe_text, origin=recipe_origin)
    if check_dir == check_source:
        check_dir = str(source_weights if source_weights is not None else resolve(*split_revision(source)).folder)
    if check_dir is not None and not weight_files(Path(check_dir)):
        raise UserError(f"{check_dir}: no weight files (*.safetensors or *.bin) to compare with; nothing was merged")
    hub_inputs = provenance.get("hub_inputs") or {}
    named_repos = [split_revision(reference)[0] for reference in hub_references(recipe)]
    recorded = provenance.get("inputs") or {}
    mismatches = verify_inputs(recorded, recorded_folders(recorded, recipe, mapping)) + verify_hub_inputs(
        hub_inputs, named_repos
    )
    revisions = {
        repo: str(entry["revision"])
        for repo, entry in hub_inputs.items()
        if isinstance(entry, dict) and entry.get("revision")
    }
    return Reproduction(
        card_path,
        recipe,
        options,
        warnings + _version_warnings(provenance),
        mismatches,
        revisions,
        Path(check_dir) if check_dir is not None else None,
    )

"""Generated inputs, not only the cases we thought of (hypothesis).

Valid recipes, adapter configs and model cards are mutated one field at a time: the value's
type swapped, made non-finite, zero, negative or huge, the field removed, or an unknown one
added. Whatever comes out, every command ends either with exit 0 and finite weights, or with
exit 1 and ``error:`` lines: never a traceback, never a staging folder left behind, never a
changed input file. Examples are derandomised (the same ones on every run) and bounded to keep
the suite's time.
"""

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, List, Tuple

import pytest
import torch
import yaml
from conftest import run_cli, tree_hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open


FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MUTATIONS = (
    "list",
    "mapping",
    "string",
    "integer",
    "boolean",
    "null",
    "nan",
    "inf",
    "-inf",
    "zero",
    "negative",
    "huge",
    "missing",
    "extra",
)


def field_paths(document: Any, prefix: Tuple = ()) -> List[Tuple]:
    """The path (keys and list indices) of every field of a parsed document, containers included."""
    paths = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            paths += field_paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += field_paths(value, prefix + (index,))
    return paths


def mutated(document: Any, path: Tuple, kind: str) -> Any:
    """``document`` with the field at ``path`` changed by one mutation ``kind``."""
    document = copy.deepcopy(document)
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    old = parent[key]
    number = old if isinstance(old, (int, float)) and not isinstance(old, bool) else 1.0
    if kind == "missing":
        del parent[key]
    elif kind == "extra":
        target = old if isinstance(old, dict) else parent if isinstance(parent, dict) else None
        if target is not None:
            target["unknown_field"] = 1
        else:
            parent.append(copy.deepcopy(old))
    else:
        parent[key] = {
            "list": [old, old],
            "mapping": {"value": old},
            "string": "x",
            "integer": 3,
            "boolean": True,
            "null": None,
            "nan": math.nan,
            "inf": math.inf,
            "-inf": -math.inf,
            "zero": 0,
            "negative": -abs(number) or -1,
            "huge": 1e39 if isinstance(number, float) else 10**12,
        }[kind]
    return document


def mutations(document: Any):
    """A strategy: (path, kind) of one mutation of ``document``."""
    return st.tuples(st.sampled_from(field_paths(document)), st.sampled_from(MUTATIONS))


def assert_contract(
    result, out: Path, inputs_before: dict, roots: List[Path], merged_before_failing: bool = False
) -> None:
    """Exit 0 with finite weights, or exit 1 with error lines; no traceback, no staging, inputs
    unchanged. ``merged_before_failing``: the command may fail after publishing a merge
    (``reproduce --check`` finding a difference), which must be finite all the same."""
    assert result.returncode in (0, 1), (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == 1:
        assert lines and all(line.startswith(("error:", "warning:")) for line in lines), result.stderr
        assert any(line.startswith("error:") for line in lines)
        if not merged_before_failing:
            assert not out.exists() or not list(out.rglob("*.safetensors"))
    if out.exists():
        files = list(out.rglob("*.safetensors"))
        assert files or result.returncode == 1, "exit 0 without weights"
        for file in files:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():
                    tensor = reader.get_tensor(name)
                    assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), f"{file.name}: {name}"
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]
    assert tree_hashes(*roots) == inputs_before, "an input file changed"


def dump(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ recipes


METHOD_PARAMETERS = {
    "seedft": {"lambda": 0.7, "rank": 4, "rtol": 1e-6},
    "seedlora_dm": {"lambda": 1.0, "normalize": True},
    "seedlora_twostage": {"threshold_quantile": 0.5, "energy": 0.99, "fusion": "ties", "density": 0.5, "lambda": 1.0},
    "lore": {"mu_relative": 0.1, "iterations": 3, "tol": 1e-6, "lambda": 1.0},
}


@pytest.fixture(scope="module")
def checkpoints(tiny_family):
    base, seeds = tiny_family
    return base, seeds[:2]


def recipe_document(method: str, base: Path, seeds: List[Path]) -> dict:
    models = [
        {"model": str(seeds[0]), "parameters": {"weight": 1.0}},
        {"model": str(seeds[1]), "parameters": {"weight": 2.0}},
    ]
    if method != "seedlora_dm":
        models = [{"model": str(seed)} for seed in seeds]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": dict(METHOD_PARAMETERS[method]),
        "dtype": "float32",
    }


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
@FUZZ
@given(data=st.data())
def test_mutated_recipes_keep_the_contract(checkpoints, method, data):
    base, seeds = checkpoints
    document = recipe_document(method, base, seeds)
    path, kind = data.draw(mutations(document))
    with tempfile.TemporaryDirectory() as folder:
        recipe = dump(Path(folder) / "r.yml", mutated(document, path, kind))
        out = Path(folder) / "out"
        before = tree_hashes(base, *seeds)
        validated = run_cli("mergekit-seed", "validate", recipe)
        assert_contract(validated, out, before, [base, *seeds])
        result = run_cli("mergekit-seed", "run", recipe, out, "--quiet")
        assert_contract(result, out, before, [base, *seeds])
        # validate is the promise that run will not fail on the recipe itself
        assert validated.returncode == 1 or result.returncode == 0, result.stderr


# ------------------------------------------------------------------ adapter configs


@pytest.mark.parametrize("output", ["lora", "full"])
@FUZZ
@given(data=st.data())
def test_mutated_adapter_configs_keep_the_contract(tiny_loras, output, data):
    base, seeds = tiny_loras
    config = json.loads((seeds[1] / "adapter_config.json").read_text())
    config["rank_pattern"], config["alpha_pattern"] = {"q_proj": 4}, {"q_proj": 8.0}
    method = data.draw(st.sampled_from(["seedft", "seedlora_dm"]))
    path, kind = data.draw(mutations(config))
    whole = data.draw(st.sampled_from([None, [1, 2], "x", 3.5]))  # sometimes the whole config is wrong
    with tempfile.TemporaryDirectory() as folder:
        copies = [shutil.copytree(seed, Path(folder) / seed.name) for seed in seeds]
        broken = mutated(config, path, kind) if whole is None or data.draw(st.booleans()) else whole
        (copies[1] / "adapter_config.json").write_text(
            json.dumps(broken), encoding="utf-8"
        )  # NaN/Infinity as json writes them
        document = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(c)} for c in copies],
            "output": {"format": output},
        }
        recipe = dump(Path(folder) / "r.yml", document)
        out = Path(folder) / "out"
        roots = [base, *copies]
        before = tree_hashes(*roots)
        validated = run_cli("mergekit-seed", "validate", recipe)
        assert_contract(validated, out, before, roots)
        result = run_cli("mergekit-seed", "run", recipe, out, "--quiet")
        assert_contract(result, out, before, roots)
        assert validated.returncode == 1 or result.returncode == 0, result.stderr


# ------------------------------------------------------------------ model cards


@pytest.fixture(scope="module")
def published(checkpoints, tmp_path_factory):
    """A merge's folder and the --input flags that map its card's labels back to the inputs."""
    base, seeds = checkpoints
    root = tmp_path_factory.mktemp("fuzz-card")
    recipe = dump(root / "r.yml", recipe_document("seedlora_dm", base, seeds))
    merged = root / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)
    labels = sorted(str(p) for p in (base, *seeds))
    flags = [arg for index, folder in enumerate(labels) for arg in ("--input", f"input{index}={folder}")]
    return merged, flags


@FUZZ
@given(data=st.data())
def test_mutated_cards_keep_the_contract(checkpoints, published, data):
    base, seeds = checkpoints
    merged, flags = published
    text = (merged / "README.md").read_text(encoding="utf-8")
    _, front_text, body = text.split("---\n", 2)
    front = yaml.safe_load(front_text)
    path, kind = data.draw(mutations({"mergekit_seed": front["mergekit_seed"]}))
    with tempfile.TemporaryDirectory() as folder:
        card = Path(folder) / "README.md"
        changed = {**front, **mutated({"mergekit_seed": front["mergekit_seed"]}, path, kind)}
        card.write_text("---\n" + yaml.safe_dump(changed, sort_keys=False) + "---\n" + body, encoding="utf-8")
        out = Path(folder) / "out"
        roots = [base, *seeds, merged]
        before = tree_hashes(*roots)
        result = run_cli("mergekit-seed", "reproduce", card, out, *flags, "--check", merged)
        assert_contract(result, out, before, roots, merged_before_failing=True)

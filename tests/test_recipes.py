"""Shipped recipes, up-front validation, model cards and reproduction."""

import shutil
from pathlib import Path

import pytest
from conftest import run_cli, save_random_lora, save_random_sera, write_recipe
from tiny import derive_seeds, save_tiny_llama

from mergekit_seed.catalogue import shipped_recipes


REPO = Path(__file__).parent.parent


def test_every_shipped_recipe_validates_offline():
    names = sorted(p.name for p in (REPO / "recipes").glob("*.yml"))
    assert len(names) >= 8 and set(shipped_recipes()) == {n[:-4] for n in names}
    result = run_cli("mergekit-seed", "validate", "--offline", *sorted((REPO / "recipes").glob("*.yml")))
    assert result.returncode == 0, result.stderr
    for path in (REPO / "recipes").glob("*.yml"):
        text = path.read_text()
        assert text.startswith("# ") and "Paper:" in text and "REPLACE" in text, path.name


def test_recipes_list_and_show():
    listing = run_cli("mergekit-seed", "recipes", check=True).stdout
    assert "seedlora-twostage-llama2-7b-metamath" in listing
    shown = run_cli("mergekit-seed", "recipes", "show", "demo-full-seedft", "--models", "/x", check=True).stdout
    assert "base_model: /x/base" in shown and "${DEMO_MODELS}" not in shown
    missing = run_cli("mergekit-seed", "recipes", "show", "demo-full-seedf")
    assert missing.returncode == 1 and "did you mean 'demo-full-seedft'" in missing.stderr


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """The demo's folder layout, filled with tiny generated models."""
    root = tmp_path_factory.mktemp("demo-models")
    base = save_tiny_llama(root / "base")
    (root / "full").mkdir()
    derive_seeds(base, root / "full", 3)
    for index in range(3):
        save_random_lora(base, root / "lora" / f"seed{index}", r=8, seed=10 + index)
        save_random_sera(base, root / "sera" / f"seed{index}", r=4, split=2, seed=20 + index)
    return root


@pytest.mark.parametrize("name", sorted(n for n in shipped_recipes() if n.startswith("demo-")))
def test_demo_recipes_run(demo_models, tmp_path, name):
    text = run_cli("mergekit-seed", "recipes", "show", name, "--models", demo_models, check=True).stdout
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    assert run_cli("mergekit-seed", "validate", recipe).returncode == 0
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Reproduce" in card and "sha256" in card


def validate(tmp_path, text, *flags):
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    result = run_cli("mergekit-seed", "validate", recipe, *flags)
    assert "Traceback" not in result.stderr
    return result


def test_validate_reports_every_problem_at_once(tiny_family, tmp_path):
    base, seeds = tiny_family
    text = f"""merge_method: seedlora_twostage
base_model: {base}
models:
  - model: {seeds[0]}
parameters:
  treshold_quantile: 0.3
  energy: 2
  fusion: 3
"""
    result = validate(tmp_path, text, "--offline")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 4, result.stderr
    assert "did you mean 'threshold_quantile'" in result.stderr
    assert "'energy' = 2" in result.stderr and "'fusion' = 3" in result.stderr
    assert "at least 2 seed models" in result.stderr


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("merge_method: seedft\nmodels: [a, b\n", "YAML syntax error"),
        ("merge_method: seedft\nmodels: 3\n", "models: Input should be a valid list"),
        ("merge_method: seedfit\nmodels:\n  - model: /a\n  - model: /b\n", "did you mean 'seedft'"),
        ("merge_method: seedft\nmodels:\n  - model: /a\n  - model: /b\n", "needs base_model"),
        (
            "merge_method: seedft\nbase_model: /c\nmodels:\n  - model: /a\n  - model: /b\nparameters:\n  rank: two\n",
            "'rank'",
        ),
        (
            "merge_method: lore\nmodels:\n  - model: /a\n  - model: /b\nparameters:\n  mu: 1\n  mu_relative: 0.1\n",
            "exclude each other",
        ),
        (
            "merge_method: seedft\nbase_model: /c\nmodels:\n  - model: /a\n  - model: /b\noutput:\n  format: zip\n",
            "output.format",
        ),
        (
            "merge_method: seedft\nmodels:\n  - model: /a\n  - model: /b\noutput:\n  fromat: lora\n",
            "output.fromat: unknown field",
        ),
    ],
)
def test_broken_recipes_are_refused_by_name(tmp_path, text, fragment):
    result = validate(tmp_path, text, "--offline")
    assert result.returncode == 1 and fragment in result.stderr, result.stderr


def test_validate_checks_paths_and_tensor_shapes(tiny_family, tmp_path):
    base, seeds = tiny_family
    result = validate(
        tmp_path,
        f"merge_method: seedft\nbase_model: {base}\nmodels:\n  - model: {seeds[0]}\n  - model: /nowhere/seed\n",
    )
    assert result.returncode == 1 and "/nowhere/seed does not exist" in result.stderr
    from tiny import TINY_LLAMA

    wider = tmp_path / "wider2"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "intermediate_size": 40})).save_pretrained(wider)
    result = validate(
        tmp_path, f"merge_method: seedft\nbase_model: {base}\nmodels:\n  - model: {seeds[0]}\n  - model: {wider}\n"
    )
    assert result.returncode == 1
    assert "tensor model.layers.0.mlp.down_proj.weight has different shapes" in result.stderr
    assert validate(tmp_path, write_recipe(tmp_path / "ok.yml", "seedft", base, seeds).read_text()).returncode == 0


def test_reproduce_from_the_card_and_detect_tampering(tiny_family, tmp_path):
    base, seeds = tiny_family
    inputs = tmp_path / "inputs"
    shutil.copytree(base, inputs / "base")
    copies = [shutil.copytree(seed, inputs / seed.name) for seed in seeds]
    recipe = write_recipe(
        tmp_path / "r.yml", "seedlora_twostage", inputs / "base", copies, {"fusion": "dare", "seed": 3}
    )
    out = tmp_path / "out"
    assert run_cli("mergekit-seed", "run", recipe, out, "--quiet").returncode == 0
    card = out / "README.md"
    text = card.read_text()
    assert "SeedLoRA (two-stage)" in text and "mergekit_version: 0.1.5" in text
    assert "threshold_quantile" in text  # defaults filled in

    again = run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--check", out, "--recipe", recipe)
    assert again.returncode == 0, again.stderr
    assert "every tensor matches" in again.stdout

    tampered_card = tmp_path / "tampered.md"
    tampered_card.write_text(text.replace("seed: 3", "seed: 4"))
    # the card labels its local inputs: input0 is the base, input1-3 the seeds (sorted paths)
    labels = ["--input", f"input0={inputs / 'base'}"] + [
        arg for i, c in enumerate(copies) for arg in ("--input", f"input{i + 1}={c}")
    ]
    changed = run_cli("mergekit-seed", "reproduce", tampered_card, tmp_path / "changed", "--check", out, *labels)
    assert changed.returncode == 1 and "differs by" in changed.stderr

    weights = copies[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    refused = run_cli("mergekit-seed", "reproduce", out, tmp_path / "refused", "--recipe", recipe)
    assert refused.returncode == 1
    assert f"input {weights} has changed" in refused.stderr and not (tmp_path / "refused").exists()


def test_validate_never_says_valid_for_inputs_it_did_not_check(tiny_family, tmp_path):
    """--offline reads nothing: placeholder paths pass its checks, and the last line says the
    inputs were not checked. Online, a Hub id the Hub cannot be asked about is named, exit 2."""
    import os
    import subprocess

    base, seeds = tiny_family
    placeholder = write_recipe(tmp_path / "p.yml", "seedft", "/REPLACE/base", ["/REPLACE/s0", "/REPLACE/s1"])
    result = run_cli("mergekit-seed", "validate", "--offline", placeholder)
    assert result.returncode == 0 and "valid" not in result.stdout and "not checked: the inputs" in result.stdout
    assert run_cli("mergekit-seed", "validate", placeholder).returncode == 1

    hub = write_recipe(tmp_path / "h.yml", "seedft", base, [seeds[0], "some-org/some-seed"])
    # a closed port on this machine: the Hub cannot be reached, at once
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [str(Path(os.sys.executable).parent / "mergekit-seed"), "validate", str(hub)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "warning: not checked:" in done.stderr and "some-org/some-seed: the Hub could not be asked" in done.stderr
    assert "valid" not in done.stdout and "could not be checked" in done.stdout
    good = write_recipe(tmp_path / "g.yml", "seedft", base, seeds[:2])
    assert run_cli("mergekit-seed", "validate", good, check=True).stdout.strip() == "1 recipe(s) valid"

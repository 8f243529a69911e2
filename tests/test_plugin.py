"""The plugin path: registration, stock mergekit-yaml, and the mergekit-seed CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import recipe_text, refused, run_cli, write_recipe

from mergekit_seed.maths.kernels.seedft import seedft
from mergekit_seed.references.weights import load_weights


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()]
    assert "mergekit_seed.startup" in imported, "the .pth hook is not installed"
    assert not [name for name in imported if name.split(".")[0] in ("torch", "mergekit")]


def test_registry_import_registers_our_methods():
    code = "import mergekit.merge_methods as m; print(m.get('seedft').spec.pretty_name)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "SeedFT", result.stderr


def test_register_is_idempotent():
    from mergekit import merge_methods

    import mergekit_seed

    mergekit_seed.register()
    mergekit_seed.register()
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert names.count("seedft") == 1


def test_stock_mergekit_yaml_runs_seedft_tensor_by_tensor(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "seedft.yml", "seedft", base, seeds)
    run_cli("mergekit-yaml", recipe, tmp_path / "out", check=True, isolated=True)
    merged = load_weights(tmp_path / "out")
    base_weights = load_weights(base)
    seed_weights = [load_weights(seed) for seed in seeds]
    assert set(merged) == set(base_weights)
    for name, base_tensor in base_weights.items():
        tau = [w[name] - base_tensor for w in seed_weights]
        expected = base_tensor + seedft(tau) / 3**0.5
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)


def test_cli_run_writes_the_same_merge_and_a_card(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds, {"lambda": 0.5, "rank": 4})
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    merged = load_weights(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    base_tensor = load_weights(base)[name]
    tau = [load_weights(seed)[name] - base_tensor for seed in seeds]
    torch.testing.assert_close(merged[name], base_tensor + 0.5 * seedft(tau, rank=4), atol=1e-6, rtol=1e-5)
    assert "SeedFT" in (tmp_path / "out" / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_one_seed_is_refused(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds[:1])
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out, isolated=True), "at least 2 seed", out=out)


def test_missing_base_is_refused(tiny_family, tmp_path):
    _, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", None, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "needs base_model", out=out)


def test_bad_parameters_are_refused_by_name(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds, {"rnak": 2, "rtol": -1, "lambda": "big"})
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "did you mean 'rank'", "'rtol'", "'lambda'", out=out)


def test_yaml_syntax_error_names_the_line(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: seedft\nmodels: [\n")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "line 3")


def test_existing_output_is_not_mixed(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused(run_cli("mergekit-seed", "run", recipe, out), "--overwrite")
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a previous merge of ours, never a folder of something else
    refused(
        run_cli("mergekit-seed", "run", recipe, out, "--overwrite"),
        "replaces only a previous mergekit-seed merge",
        "keep.txt",
    )
    assert (out / "keep.txt").read_text() == "x"


def test_methods_json_lists_parameters_and_defaults():
    result = run_cli("mergekit-seed", "methods", "--json", check=True)
    methods = {m["name"]: m for m in json.loads(result.stdout)}
    seedft_entry = methods["seedft"]
    assert seedft_entry["pretty_name"] == "SeedFT"
    assert "Structure-Preserving Fusion" in seedft_entry["paper"]
    defaults = {p["name"]: p["default"] for p in seedft_entry["parameters"]}
    assert defaults == {"lambda": "auto", "rank": None, "rtol": 1e-6}


def test_console_script_keeps_exit_status_and_output():
    """The installed script's statuses and printed output are those of the command."""
    listed = run_cli("mergekit-seed", "methods", "--json", isolated=True)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 4
    helped = run_cli("mergekit-seed", "run", "--help", isolated=True)
    assert helped.returncode == 0 and "--out-shard-size" in helped.stdout  # mergekit's full option set
    missing = run_cli("mergekit-seed", "run", isolated=True)
    assert missing.returncode == 2 and "Missing argument 'RECIPE'" in missing.stderr


@pytest.mark.parametrize("where", ["global", "per-model"])
def test_stock_mergekit_yaml_refuses_a_misspelt_parameter_of_our_methods(tiny_family, tmp_path, where):
    """mergekit resolves only the parameters a method declares; ours check the rest when
    mergekit plans the merge, so `rnak: 3` is one line instead of a merge with the defaults."""
    import yaml

    base, seeds = tiny_family
    recipe = yaml.safe_load(recipe_text("seedft" if where == "global" else "seedlora_dm", base, seeds))
    if where == "global":
        recipe["parameters"] = {"lamda": 0.5}
    else:
        recipe["models"][1]["parameters"] = {"weigth": 2.0}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    misspelt, meant = ("lamda", "lambda") if where == "global" else ("weigth", "weight")
    for isolated in (False, True):
        out = tmp_path / f"out-{isolated}"
        refused(
            run_cli("mergekit-yaml", path, out, isolated=isolated),
            f"unknown parameter '{misspelt}'",
            f"did you mean '{meant}'",
            out=out,
        )
    refused(run_cli("mergekit-seed", "run", path, tmp_path / "o"), f"unknown parameter '{misspelt}'")
    # mergekit's Python API: a ValueError naming it
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with pytest.raises(ValueError, match=misspelt):
        run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "api"), options=MergeOptions())


def test_mergekit_methods_keep_ignoring_unknown_parameters_under_stock_mergekit_yaml(tiny_family, tmp_path):
    import yaml

    base, seeds = tiny_family
    recipe = yaml.safe_load(recipe_text("linear", base, seeds))
    recipe["parameters"] = {"weight": 1.0, "no_such_parameter": 3}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("mergekit-yaml", path, tmp_path / "out", check=True)
    assert list((tmp_path / "out").glob("*.safetensors"))


def test_the_parameter_check_holds_whatever_mergekit_module_is_imported_first(tiny_family, tmp_path):
    """mergekit.plan imports the registry before it defines MergePlanner, so importing it first
    registers us too early to wrap the planner; mergekit.merge installs the check then."""
    import subprocess
    import sys

    import yaml

    base, seeds = tiny_family
    recipe = yaml.safe_load(recipe_text("seedft", base, seeds))
    recipe["parameters"] = {"rnak": 3}
    script = f"""
import mergekit.plan
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
try:
    run_merge(MergeConfiguration.model_validate({recipe!r}), {str(tmp_path / "out")!r}, options=MergeOptions())
except ValueError as error:
    print("refused:", error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "refused: parameters: unknown parameter 'rnak' for seedft" in done.stdout, done.stdout + done.stderr
    assert "cannot check parameter names" not in done.stderr


def test_stock_mergekit_yaml_at_the_edges_is_one_line(tiny_family, tiny_loras, tmp_path):
    """Issue 49: stock mergekit-yaml on adapter folders ended in a 20-line traceback ("Should have a
    model_type key"), and a misspelt method in mergekit's traceback; each is one line now, and
    nothing is written."""
    base, seeds = tiny_family
    lora_base, loras = tiny_loras
    adapters = tmp_path / "adapters.yml"
    adapters.write_text(recipe_text("lore", lora_base, loras))
    refused(
        run_cli("mergekit-yaml", adapters, tmp_path / "a", isolated=True),
        "is an adapter folder",
        "mergekit-seed run",
        out=tmp_path / "a",
    )
    misspelt = tmp_path / "misspelt.yml"
    misspelt.write_text(recipe_text("seedtf", base, seeds))
    refused(
        run_cli("mergekit-yaml", misspelt, tmp_path / "m", isolated=True), "did you mean 'seedft'?", out=tmp_path / "m"
    )


def test_a_recipe_mixing_adapters_and_full_models_is_one_line(tiny_family, tiny_loras, tmp_path):
    """Issue 49: three lines, two of them calling the full models broken adapters."""
    lora_base, loras = tiny_loras
    recipe = tmp_path / "mixed.yml"
    recipe.write_text(recipe_text("lore", lora_base, [loras[0], *tiny_family[1][:2], loras[1]]))
    result = run_cli("mergekit-seed", "validate", recipe)
    refused(result, "mix of adapter folders and full models")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1

"""Every bad input refused clearly, nothing half-written, merges deterministic, inputs safe."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import refused, run_cli, save_random_sera, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_seed.references.weights import load_weights


PACKAGE = Path(__file__).parent.parent / "mergekit_seed"


def copy_family(tiny_family, root: Path):
    base, seeds = tiny_family
    shutil.copytree(base, root / "base")
    return root / "base", [shutil.copytree(s, root / s.name) for s in seeds]


def rewrite(folder: Path, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------ recipes

OUT_OF_RANGE = [
    ("seedft", "rank", 0),
    ("seedft", "rtol", 0),
    ("seedft", "lambda", "big"),
    ("seedlora_dm", "normalize", "maybe"),
    ("seedlora_dm", "lambda", "x"),
    ("seedlora_twostage", "threshold", -1),
    ("seedlora_twostage", "threshold_quantile", 1),
    ("seedlora_twostage", "threshold_quantile", 0),
    ("seedlora_twostage", "min_agree", 0),
    ("seedlora_twostage", "rank", 0),
    ("seedlora_twostage", "energy", 0),
    ("seedlora_twostage", "energy", 1.5),
    ("seedlora_twostage", "fusion", "avg"),
    ("seedlora_twostage", "density", 0),
    ("seedlora_twostage", "density", 2),
    ("seedlora_twostage", "seed", "x"),
    ("seedlora_twostage", "lambda", "x"),
    ("lore", "mu", -1),
    ("lore", "mu_relative", -0.5),
    ("lore", "iterations", 0),
    ("lore", "tol", -1),
    ("lore", "post_merge", "mean"),
    ("lore", "density", 0),
    ("lore", "lambda", "x"),
]


@pytest.mark.parametrize("method,name,value", OUT_OF_RANGE)
def test_every_parameter_range_is_checked(tmp_path, method, name, value):
    recipe = write_recipe(tmp_path / "r.yml", method, "/b", ["/s1", "/s2"], {name: value})
    refused(run_cli("mergekit-seed", "validate", "--offline", recipe), f"'{name}' = {value!r}")


def test_per_model_weight_type_is_checked(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: seedlora_dm\nbase_model: /b\nmodels:\n  - model: /s1\n    parameters:\n      weight: heavy\n  "
        "- model: /s2\n"
    )
    refused(run_cli("mergekit-seed", "validate", "--offline", recipe), "models[0]", "'weight'")


@pytest.mark.parametrize(
    "models, fragment",
    [
        (
            "[]",
            "Exactly one of 'models', 'slices', or 'modules' must be present",
        ),  # mergekit's schema: an empty list is no models
        ("[{model: /s1}]", "seedft needs at least 2 seed models under models:, got 1"),
    ],
)
def test_zero_or_one_seed(tmp_path, models, fragment):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: seedft\nbase_model: /b\nmodels: {models}\n")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), fragment, out=tmp_path / "out")


def test_base_listed_for_lore_is_accepted_and_reported_unused(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "lore", base, seeds)
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "is not an input of lore" in result.stderr


def test_a_refusal_in_a_real_process_prints_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_twostage", "/b", ["/s1", "/s2"], {"energy": 3})
    result = run_cli("mergekit-seed", "validate", "--offline", recipe, isolated=True)
    refused(result, "'energy' = 3")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ weights


def test_nan_or_inf_in_an_input_is_refused_naming_model_and_tensor(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite(seeds[2], lambda t: t[name].__setitem__((0, 0), float("nan")))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out, "--quiet"), str(seeds[2]), name, "NaN or Inf", out=out)


def test_a_tensor_missing_in_one_input_is_refused(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path)
    rewrite(seeds[1], lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "model.layers.0.mlp.up_proj.weight is missing in", out=out)


def test_shape_mismatch_is_refused(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path)
    rewrite(seeds[0], lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    recipe = write_recipe(tmp_path / "r.yml", "lore", None, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "model.norm.weight has different shapes", out=out)


def test_mixed_bf16_and_fp32_inputs_are_merged_in_fp32(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path)
    rewrite(seeds[0], lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: seedlora_dm\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {s}\n" for s in seeds)
    )
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    merged = load_weights(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in merged.values())


@pytest.mark.parametrize("method", ["seedft", "seedlora_dm", "seedlora_twostage", "lore"])
def test_all_zero_deltas_give_the_base(tiny_family, tmp_path, method):
    base, _ = tiny_family
    copies = [shutil.copytree(base, tmp_path / f"copy{i}") for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yml", method, base, copies)
    assert run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet").returncode == 0
    merged, original = load_weights(tmp_path / "out"), load_weights(base)
    # delta methods add an exact zero; lore averages three equal copies (one rounding step)
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ files


def test_truncated_safetensors_is_refused(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path)
    data = (seeds[1] / "model.safetensors").read_bytes()
    (seeds[1] / "model.safetensors").write_bytes(data[: len(data) // 2])
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "corrupt or truncated", str(seeds[1]), out=out)


def adapter_copies(adapters, tmp_path):
    base, seeds = adapters
    return base, [shutil.copytree(s, tmp_path / s.name) for s in seeds]


def adapter_recipe(tmp_path, seeds, method="seedft"):
    return write_recipe(tmp_path / "r.yml", method, None, seeds)


def test_adapter_folder_without_config_is_refused(tiny_loras, tmp_path):
    _, seeds = adapter_copies(tiny_loras, tmp_path)
    (seeds[1] / "adapter_config.json").unlink()
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), out), "no adapter_config.json", out=out)


def test_adapter_config_missing_a_field_is_refused(tiny_loras, tmp_path):
    _, seeds = adapter_copies(tiny_loras, tmp_path)
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), out), "field 'lora_alpha'", out=out)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ("parameters:\n  lambda: [0.5, 1.0]\n", "gradient over layer ranges"),
        ("parameters:\n  lambda: [{filter: q_proj, value: 0.5, weight: 2}]\n", "keys value and (optionally) filter"),
        ("slices:\n  - sources: []\n", "slices: not used by adapter merges"),
    ],
)
def test_adapter_recipes_refuse_what_only_full_models_have(tiny_loras, tmp_path, extra, fragment):
    _, seeds = tiny_loras
    recipe = adapter_recipe(tmp_path, seeds)
    recipe.write_text(recipe.read_text() + extra)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), fragment, out=out)
    refused(run_cli("mergekit-seed", "validate", recipe), fragment)


def test_adapters_for_different_base_models_warn(tiny_loras, tmp_path):
    _, seeds = adapter_copies(tiny_loras, tmp_path)
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "different base models" in result.stderr


def test_adapters_of_different_shapes_are_refused(tiny_loras, tmp_path):
    from tiny import TINY_LLAMA

    base, seeds = adapter_copies(tiny_loras, tmp_path)
    tensors = load_file(seeds[1] / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.randn(TINY_LLAMA["hidden_size"] + 8, tensors[key].shape[1])
    save_file(tensors, seeds[1] / "adapter_model.safetensors")
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), out), "different shapes", out=out)


def test_sera_with_r_not_divisible_by_split_is_refused(tiny_loras, tmp_path):
    base, seeds = adapter_copies(tiny_loras, tmp_path)
    sera = save_random_sera(base, tmp_path / "sera", r=4, split=2, seed=3)
    config = json.loads((sera / "adapter_config.json").read_text())
    config["split"] = 3
    (sera / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(
        run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, [seeds[0], sera]), out),
        "split (3) must divide r (4)",
        out=out,
    )


def test_bin_adapters_load_with_weights_only_and_pickles_are_refused(tiny_loras, tmp_path):
    _, seeds = adapter_copies(tiny_loras, tmp_path)
    tensors = load_file(seeds[1] / "adapter_model.safetensors")
    (seeds[1] / "adapter_model.safetensors").unlink()
    torch.save(tensors, seeds[1] / "adapter_model.bin")
    assert run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), tmp_path / "ok", "--quiet").returncode == 0

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Payload()}, seeds[1] / "adapter_model.bin")
    out = tmp_path / "out"
    result = run_cli("mergekit-seed", "run", adapter_recipe(tmp_path, seeds), out)
    refused(result, "weights_only", out=out)
    assert "pickle code ran" not in result.stdout


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize(
    "method,parameters,options",
    [
        ("seedlora_twostage", {"fusion": "dare", "seed": 5}, []),
        ("dare_ties", None, ["--random-seed", "17"]),
        ("lore", None, []),
        ("seedft", None, []),
    ],
)
def test_the_same_recipe_twice_gives_bitwise_identical_weights(tiny_family, tmp_path, method, parameters, options):
    base, seeds = tiny_family
    text = write_recipe(tmp_path / "r.yml", method, base, seeds, parameters).read_text()
    if method == "dare_ties":
        text = text.replace("models:\n", "parameters:\n  weight: 0.33\n  density: 0.5\nmodels:\n", 1)
    (tmp_path / "r.yml").write_text(text)
    for out in ("one", "two"):
        result = run_cli("mergekit-seed", "run", tmp_path / "r.yml", tmp_path / out, "--quiet", *options)
        assert result.returncode == 0, result.stderr
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)


# ------------------------------------------------------------------ security


def test_no_unsafe_loading_anywhere_in_the_package():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    for path, text in sources.items():
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, path
        assert "pickle.load" not in text and "Unpickler(" not in text, path  # naming pickle's exception is no loading
        assert "trust_remote_code=True" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line}"


def test_remote_code_is_never_enabled_implicitly(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    assert run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet").returncode == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "trust-remote-code" not in card


@pytest.mark.parametrize("method", ["seedft", "seedlora_dm", "seedlora_twostage", "lore"])
@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_nan_anywhere_is_refused_by_every_method(tiny_family, tmp_path, method, name):
    """No decomposition may drop a NaN silently (a NaN singular value fails every rank test)."""
    base, seeds = copy_family(tiny_family, tmp_path)
    rewrite(seeds[1], lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    recipe = write_recipe(tmp_path / "r.yml", method, base, seeds)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out, "--quiet"), str(seeds[1]), name, "NaN or Inf", out=out)

"""Adapter seeds (PEFT LoRA and SeRA) merged natively, checked against independent routes."""

import math

import pytest
import torch
from conftest import recipe_text, run_cli, save_random_lora, save_random_sera
from tiny import save_tiny_llama
from torch import nn

from mergekit_seed.engines.adapter_merge import merge_module
from mergekit_seed.maths.linalg import LowRank
from mergekit_seed.methods import our_method_names
from mergekit_seed.references.adapter_files import read_adapter
from mergekit_seed.references.sera_files import load_sera, save_sera
from mergekit_seed.references.sera_layer import SeraConfig, SeraLinear, apply_sera, merge_sera
from mergekit_seed.references.weights import load_weights


METHODS = list(our_method_names())  # the one list (methods.METHODS)


@pytest.fixture(scope="session")
def adapter_family(tmp_path_factory):
    """A tiny base and four heterogeneous seeds: LoRA r=4, LoRA r=8 rslora, LoRA r=2 on q_proj
    only (v_proj missing), SeRA r=4 split=2."""
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_llama(root / "base")
    seeds = [
        save_random_lora(base, root / "lora4", r=4, seed=1),
        save_random_lora(base, root / "lora8rs", r=8, seed=2, use_rslora=True),
        save_random_lora(base, root / "lora2q", r=2, seed=3, targets=("q_proj",)),
        save_random_sera(base, root / "sera4", r=4, split=2, seed=4),
    ]
    return root, base, seeds


def materialise(base, adapter, out):
    """A full checkpoint base + adapter, via PEFT's merge_and_unload or our SeRA merge."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if (adapter / "adapter_config.json").read_text().find('"SERA"') >= 0:
        merged = merge_sera(load_sera(model, adapter))
    else:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((base / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def materialised(adapter_family):
    root, base, seeds = adapter_family
    return [materialise(base, seed, root / f"full-{seed.name}") for seed in seeds]


def assert_same_deltas(result, expected, base, names, rtol=1e-4):
    for name in names:
        delta = expected[name] - base[name]
        error = (result[name] - expected[name]).norm() / delta.norm().clamp_min(1e-12)
        assert error < rtol, f"{name}: relative error {error:.2e}"


ADAPTED = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.mark.parametrize("method", METHODS)
def test_native_full_output_equals_the_method_on_materialised_seeds(adapter_family, materialised, tmp_path, method):
    _, base, seeds = adapter_family
    parameters = {"energy": 1.0} if method == "seedlora_twostage" else None
    native = tmp_path / "native.yml"
    native.write_text(recipe_text(method, base, seeds, parameters, {"format": "full"}))
    result = run_cli("mergekit-seed", "run", native, tmp_path / "native", "--quiet")
    assert result.returncode == 0, result.stderr
    dense = tmp_path / "dense.yml"
    dense.write_text(recipe_text(method, base, materialised, parameters))
    run_cli("mergekit-yaml", dense, tmp_path / "dense", check=True)
    base_weights = load_weights(base)
    native_weights, dense_weights = load_weights(tmp_path / "native"), load_weights(tmp_path / "dense")
    assert_same_deltas(native_weights, dense_weights, base_weights, ADAPTED)
    for name in base_weights:
        if name not in ADAPTED:
            torch.testing.assert_close(native_weights[name], base_weights[name])


@pytest.mark.parametrize("method", METHODS)
def test_lora_output_loads_in_peft_and_reproduces_the_full_output(adapter_family, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, base, seeds = adapter_family
    for fmt in ("lora", "full"):
        recipe = tmp_path / f"{fmt}.yml"
        recipe.write_text(recipe_text(method, base, seeds, output={"format": fmt}))
        result = run_cli("mergekit-seed", "run", recipe, tmp_path / fmt, "--quiet")
        assert result.returncode == 0, result.stderr
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora")
    merged = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    assert_same_deltas(merged, load_weights(tmp_path / "full"), load_weights(base), ADAPTED)
    import json

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # a local base is never published by its path
    assert sorted(config["target_modules"]) == sorted(n[: -len(".weight")] for n in ADAPTED)


@pytest.mark.parametrize("method", ["seedft", "seedlora_twostage"])
def test_mergekit_base_plus_adapter_route_agrees(adapter_family, tmp_path, method):
    _, base, seeds = adapter_family
    lora_seeds = seeds[:3]
    native = tmp_path / "native.yml"
    native.write_text(
        recipe_text(method, base, lora_seeds, {"energy": 1.0} if method != "seedft" else None, {"format": "full"})
    )
    assert run_cli("mergekit-seed", "run", native, tmp_path / "native", "--quiet").returncode == 0
    routed = tmp_path / "routed.yml"
    routed.write_text(
        recipe_text(method, base, [f"{base}+{s}" for s in lora_seeds], {"energy": 1.0} if method != "seedft" else None)
    )
    run_cli("mergekit-yaml", routed, tmp_path / "routed", "--lora-merge-cache", tmp_path / "cache", check=True)
    assert_same_deltas(
        load_weights(tmp_path / "native"), load_weights(tmp_path / "routed"), load_weights(base), ADAPTED
    )


def test_rank_truncation_reports_kept_energy(adapter_family, tmp_path):
    _, base, seeds = adapter_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text("seedft", None, seeds, output={"rank": 2}))
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "kept energy" in result.stdout
    tensors = load_weights(tmp_path / "out")
    assert all(t.shape[0] <= 2 for k, t in tensors.items() if "lora_A" in k)


def test_reader_handles_rslora_scaling_and_sera_blocks(adapter_family):
    _, base, seeds = adapter_family
    lora = read_adapter(seeds[1])
    from safetensors.torch import load_file

    raw = load_file(seeds[1] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = (16 / math.sqrt(8)) * raw[f"{key}.lora_B.weight"] @ raw[f"{key}.lora_A.weight"]
    torch.testing.assert_close(lora.deltas["model.layers.0.self_attn.q_proj.weight"].dense(), expected)
    sera = read_adapter(seeds[3])
    raw = load_file(seeds[3] / "adapter_model.safetensors")
    A = torch.block_diag(*raw[f"{key}.sera_A"])
    B = torch.block_diag(*raw[f"{key}.sera_B"])
    expected = (8 / 4) * (A @ raw[f"{key}.sera_C"] @ B).T
    torch.testing.assert_close(sera.deltas["model.layers.0.self_attn.q_proj.weight"].dense(), expected)
    assert "model.layers.0.self_attn.v_proj.weight" not in read_adapter(seeds[2]).deltas


class ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numels.append((tensor.numel(), tuple(tensor.shape), str(func)))
        return out


@pytest.mark.parametrize("method_name", ["seedft", "seedlora_dm"])
def test_factored_methods_never_allocate_a_full_size_matrix(method_name):
    from mergekit import merge_methods

    import mergekit_seed

    mergekit_seed.register()
    method = merge_methods.get(method_name)
    m, n = 600, 500
    generator = torch.Generator().manual_seed(0)
    tau = [LowRank(torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)) for k in (4, 8, 2)]
    shared = {p.name: p.default for p in method.spec.parameters if p.scope.value == "shared"}
    per_seed = [{"weight": 1.0}] * 3
    with ShapeRecorder() as recorder:
        merged = merge_module(method, tau, shared, per_seed, "w")
    largest = max(recorder.numels)
    assert largest[0] < m * n // 10, f"allocated {largest}"
    assert not [shape for _, shape, _ in recorder.numels if {m, n} <= set(shape)]
    assert isinstance(merged, LowRank)


# ------------------------------------------------------------------ the SeRA layer


def test_sera_forward_is_the_dense_formula_in_row_vector_form():
    torch.manual_seed(0)
    layer = SeraLinear(nn.Linear(16, 12), r=8, split=4, scaling=0.5)
    nn.init.normal_(layer.sera_B)
    x = torch.randn(3, 5, 16)
    A, B = torch.block_diag(*layer.sera_A), torch.block_diag(*layer.sera_B)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W0.T + b + 0.5 * (x @ A @ layer.sera_C @ B)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x @ layer.delta_weight().T, 0.5 * (x @ A @ layer.sera_C @ B), atol=1e-5, rtol=1e-5)


def test_sera_init_is_identity_and_refuses_bad_split():
    layer = SeraLinear(nn.Linear(8, 8), r=4, split=2, scaling=1.0)
    assert torch.count_nonzero(layer.sera_B) == 0 and torch.count_nonzero(layer.sera_C) > 0
    with pytest.raises(ValueError, match="split"):
        SeraLinear(nn.Linear(8, 8), r=6, split=4, scaling=1.0)
    with pytest.raises(ValueError, match="split"):
        SeraConfig(r=6, split=4)


def test_sera_save_load_round_trip_and_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    adapter = save_random_sera(base, tmp_path / "sera", r=4, split=2, seed=9)
    tokens = torch.randint(0, 64, (2, 7))
    reloaded = load_sera(AutoModelForCausalLM.from_pretrained(base), adapter)
    again = load_sera(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        logits = reloaded(tokens).logits
        torch.testing.assert_close(again(tokens).logits, logits)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base)(tokens).logits, logits)
        merged = merge_sera(reloaded)
        torch.testing.assert_close(merged(tokens).logits, logits, atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, SeraLinear) for m in merged.modules())


def test_a_few_sera_steps_lower_the_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    torch.manual_seed(0)
    model = apply_sera(AutoModelForCausalLM.from_pretrained(base), SeraConfig(r=8, split=4, sera_alpha=16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".sera_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = torch.randint(0, 64, (4, 12))
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_sera(model, tmp_path / "trained", SeraConfig(r=8, split=4, sera_alpha=16))
    assert (tmp_path / "trained" / "adapter_model.safetensors").exists()


def test_adapter_run_imports_neither_peft_nor_transformers(adapter_family, tmp_path):
    """A LoRA-in, LoRA-out merge is parsed by the lean ``run`` and never imports the seconds of
    transformers/peft that mergekit's configuration and options modules pull in."""
    import subprocess
    import sys

    _, base, seeds = adapter_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text("seedft", base, seeds[:3]))
    script = (
        "import sys\n"
        "from mergekit_seed.cli import main\n"
        f"try:\n    main(['run', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--quiet', '-j', '1'])\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = ('peft', 'transformers', 'mergekit.common', 'mergekit.config', 'mergekit.options')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_adapter_run_with_any_mergekit_option_gives_the_same_adapter(adapter_family, tmp_path):
    """An option only mergekit's full ``run`` declares (``--lazy-unpickle``) takes that command;
    the merge is bitwise the same, ``--random-seed`` included (DARE draws from the global RNG)."""
    _, base, seeds = adapter_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text("seedlora_twostage", base, seeds, {"fusion": "dare", "energy": 1.0}))
    run_cli("mergekit-seed", "run", recipe, tmp_path / "lean", "--quiet", "--random-seed", "3", check=True)
    run_cli(
        "mergekit-seed",
        "run",
        recipe,
        tmp_path / "full",
        "--quiet",
        "--random-seed",
        "3",
        "--lazy-unpickle",
        check=True,
    )
    run_cli("mergekit-seed", "run", recipe, tmp_path / "other", "--quiet", "--random-seed", "4", check=True)
    lean, full, other = (load_weights(tmp_path / name) for name in ("lean", "full", "other"))
    assert lean.keys() == full.keys()
    for name in lean:
        assert torch.equal(lean[name], full[name]), name
    assert any(not torch.equal(lean[name], other[name]) for name in lean)


def test_filter_conditions_choose_parameters_per_module(adapter_family, tmp_path):
    """mergekit's ``{filter, value}`` settings apply per adapter module: lambda 0 on q_proj
    leaves those weights at the base; v_proj gets the lambda-1 merge."""
    _, base, seeds = adapter_family
    conditional = tmp_path / "conditional.yml"
    conditional.write_text(
        recipe_text(
            "seedlora_dm", base, seeds, {"lambda": "[{filter: q_proj, value: 0.0}, {value: 1.0}]"}, {"format": "full"}
        )
    )
    plain = tmp_path / "plain.yml"
    plain.write_text(recipe_text("seedlora_dm", base, seeds, None, {"format": "full"}))
    run_cli("mergekit-seed", "run", conditional, tmp_path / "conditional", "--quiet", check=True)
    run_cli("mergekit-seed", "run", plain, tmp_path / "plain", "--quiet", check=True)
    base_weights = load_weights(base)
    result, expected = load_weights(tmp_path / "conditional"), load_weights(tmp_path / "plain")
    for name in ADAPTED:
        if "q_proj" in name:
            torch.testing.assert_close(result[name], base_weights[name])
        else:
            torch.testing.assert_close(result[name], expected[name])
            assert not torch.equal(result[name], base_weights[name])


def test_rank_auto_says_when_the_break_even_cap_kept_less_than_asked(tiny_loras, tmp_path):
    base = tiny_loras[0]
    # two rank-12 seeds: their mean has rank up to 24, past the 32x32 break-even rank of 16
    seeds = [save_random_lora(base, tmp_path / f"s{i}", r=12, seed=10 + i) for i in range(2)]
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text("seedlora_dm", None, seeds, output={"rank": "auto", "energy": 0.999}))
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    assert "kept less than the 0.999 asked for because rank auto stops at the break-even rank" in result.stdout

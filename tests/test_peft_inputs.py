"""Adapters saved by PEFT itself (``get_peft_model`` + ``save_pretrained``), with saved heads,
biases, trainable tokens and GPT-2 ``Conv1D`` layers: nothing is dropped.

The expectation is always an independent route: PEFT's own forward pass of the seed, or the
checkpoint route (PEFT ``merge_and_unload`` per seed, then ``mergekit-seed run`` with the same
method on the materialised checkpoints).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import refused, run_cli, write_recipe

from mergekit_seed.methods import our_method_names
from mergekit_seed.references.weights import load_weights


METHODS = list(our_method_names())  # the one list (methods.METHODS)
TOKENS = [3, 5, 7]


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **extra,
    )


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """Tiny bases of three real architectures: a LLaMA classifier (3 labels), a LLaMA causal LM
    and a GPT-2 LM (Conv1D layers, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("peft-bases")
    torch.manual_seed(0)
    LlamaForSequenceClassification(_llama_config(num_labels=3)).save_pretrained(root / "llama-cls")
    LlamaForCausalLM(_llama_config()).save_pretrained(root / "llama-lm")
    gpt2 = GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    gpt2.tie_word_embeddings = False
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2-untied")
    return root


# name: (base folder, PEFT LoraConfig arguments)
VARIANTS = {
    "llama-seq-cls": ("llama-cls", dict(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])),
    "llama-trainable-tokens": (
        "llama-cls",
        dict(task_type="SEQ_CLS", target_modules=["q_proj"], trainable_token_indices=TOKENS),
    ),
    "llama-lm-head": (
        "llama-lm",
        dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2-bias-all": ("gpt2", dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"], bias="all")),
    "gpt2-bias-lora-only": (
        "gpt2",
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"], bias="lora_only"),
    ),
    "gpt2-lora-bias": ("gpt2", dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "gpt2-trainable-tokens": (
        "gpt2",
        dict(task_type="CAUSAL_LM", target_modules=["c_attn"], trainable_token_indices=TOKENS[:2]),
    ),
    # Conv1D and Linear layers in one adapter: PEFT saves fan_in_fan_out as set for the last layer (false)
    "gpt2-conv1d-and-linear": (
        "gpt2-untied",
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "lm_head"]),
    ),
    # only embedding and head: PEFT saves their base layers too (save_embedding_layers), and a
    # LoRA output must keep them LoRA targets for PEFT to load it
    "llama-embed-and-head-only": ("llama-lm", dict(task_type="CAUSAL_LM", target_modules=["embed_tokens", "lm_head"])),
    # the fields that say what the tensors mean, each set by a variant
    "llama-rank-alpha-patterns-rslora": (
        "llama-lm",
        dict(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3.0},
            use_rslora=True,
        ),
    ),
    "gpt2-fan-in-fan-out": ("gpt2", dict(task_type="CAUSAL_LM", target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama-layers-and-exclusions": (
        "llama-lm",
        dict(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "up_proj"],
            layers_to_transform=[1],
            exclude_modules=["up_proj"],
            init_lora_weights="gaussian",
        ),
    ),
    "llama-target-parameters-2d": (
        "llama-lm",
        dict(task_type="CAUSAL_LM", target_modules=[], target_parameters=["self_attn.q_proj.weight"]),
    ),
}


def _model_class(base: Path):
    import transformers

    return getattr(transformers, json.loads((base / "config.json").read_text())["architectures"][0])


def load_base(base: Path):
    return _model_class(base).from_pretrained(base).eval()


def save_peft_seed(base: Path, out: Path, seed: int, **lora_arguments) -> Path:
    """A PEFT adapter as training leaves it: every trainable tensor moved away from its start."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base), LoraConfig(r=4, lora_alpha=8, **lora_arguments))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_seeds(bases, tmp_path_factory):
    """Three distinct PEFT seeds of every variant."""
    root = tmp_path_factory.mktemp("peft-seeds")
    return {
        name: [save_peft_seed(bases / base, root / f"{name}-{i}", 10 * i + 1, **arguments) for i in range(3)]
        for name, (base, arguments) in VARIANTS.items()
    }


@pytest.fixture(scope="session")
def materialised(bases, peft_seeds, tmp_path_factory):
    """Each seed merged into its base by PEFT (``merge_and_unload``) and saved as a checkpoint."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("peft-checkpoints")
    checkpoints = {}
    for name, seeds in peft_seeds.items():
        base = bases / VARIANTS[name][0]
        checkpoints[name] = []
        for seed in seeds:
            out = root / seed.name
            PeftModel.from_pretrained(load_base(base), seed).merge_and_unload().save_pretrained(out)
            checkpoints[name].append(out)
    return checkpoints


def adapter_recipe(path: Path, method: str, base, seeds, output: dict, parameters=None) -> Path:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines += ["models:"] + [f"  - model: {seed}" for seed in seeds]
    if parameters:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in parameters.items()]
    lines += ["output:"] + [f"  {k}: {v}" for k, v in output.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


INPUT_IDS = torch.tensor([[1, 3, 5, 7, 9, 11, 2, 4], [6, 7, 8, 3, 10, 12, 14, 5]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def assert_close_to(result: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, where: str) -> None:
    """Equal to 1e-4 of the fine-tune's effect on the logits."""
    effect = (expected - base).abs().max()
    assert effect > 1e-3, f"{where}: the fine-tune has no effect to check"
    error = (result - expected).abs().max()
    assert error <= 1e-4 * effect, f"{where}: off by {error / effect:.2e} of the fine-tune's effect"


@pytest.mark.parametrize("output_format", ["lora", "full"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identical_peft_seeds_give_back_the_seed(bases, peft_seeds, tmp_path, variant, output_format):
    from peft import PeftModel

    base = bases / VARIANTS[variant][0]
    seed = peft_seeds[variant][0]
    copies = [shutil.copytree(seed, tmp_path / f"copy{i}") for i in range(3)]
    recipe = adapter_recipe(tmp_path / "r.yml", "seedlora_dm", base, copies, {"format": output_format})
    out = tmp_path / "out"
    result = run_cli("mergekit-seed", "run", recipe, out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "missing in" not in result.stderr

    expected = logits(PeftModel.from_pretrained(load_base(base), seed))
    if output_format == "lora":
        merged = logits(PeftModel.from_pretrained(load_base(base), out))
    else:
        merged = logits(_model_class(base).from_pretrained(out).eval())
    assert_close_to(merged, expected, logits(load_base(base)), f"{variant} {output_format}")


def _checkpoint_route(tmp_path, method, base, checkpoints, parameters):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    lines += [f"  - model: {checkpoint}" for checkpoint in checkpoints]
    if parameters:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in parameters.items()]
    lines.append("dtype: float32")
    recipe = tmp_path / "checkpoints.yml"
    recipe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_cli("mergekit-seed", "run", recipe, tmp_path / "checkpoint-route", "--quiet", check=True)
    return load_weights(tmp_path / "checkpoint-route")


def assert_same_tensors(result, expected, base, where, rtol=1e-4):
    """Every tensor equal to 1e-4 of its delta from the base (plus float32 rounding of the
    tensor itself: LoRE rounds tensors no seed changes at ~1e-9)."""
    assert set(result) == set(expected), f"{where}: tensors differ: {set(result) ^ set(expected)}"
    changed = 0
    for name, value in expected.items():
        delta = (value - base[name]).norm()
        rounding = 1e-6 * value.norm()
        changed += bool(delta > rounding)
        error = (result[name] - value).norm()
        assert error <= rtol * delta + rounding, (
            f"{where}: {name} off by {error / delta.clamp_min(1e-30):.2e} of its delta"
        )
    assert changed, f"{where}: nothing changed"


DISTINCT = [
    "llama-seq-cls",
    "llama-trainable-tokens",
    "llama-lm-head",
    "gpt2-bias-all",
    "gpt2-bias-lora-only",
    "gpt2-lora-bias",
    "gpt2-trainable-tokens",
    "gpt2-conv1d-and-linear",
    "llama-embed-and-head-only",
]


@pytest.mark.parametrize("variant", DISTINCT)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_route_equals_the_checkpoint_route(bases, peft_seeds, materialised, tmp_path, method, variant):
    """Full output = the method on PEFT-materialised checkpoints, every tensor (heads, biases,
    token rows included); the LoRA output, loaded and merged by PEFT, = the full output."""
    from peft import PeftModel

    base = bases / VARIANTS[variant][0]
    parameters = {"energy": 1.0} if method == "seedlora_twostage" else None
    expected = _checkpoint_route(tmp_path, method, base, materialised[variant], parameters)
    base_weights = load_weights(base)

    recipe = adapter_recipe(tmp_path / "full.yml", method, base, peft_seeds[variant], {"format": "full"}, parameters)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "full", "--quiet", check=True)
    assert_same_tensors(load_weights(tmp_path / "full"), expected, base_weights, f"{method} {variant} full")

    recipe = adapter_recipe(tmp_path / "lora.yml", method, base, peft_seeds[variant], {"format": "lora"}, parameters)
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "lora", "--quiet")
    if method == "seedlora_dm" and "tokens" in variant:
        # distribution matching shifts every entry of the embedding: not trainable tokens any more
        refused(result, "changes rows beyond the trainable tokens", "output.format: full", out=tmp_path / "lora")
        return
    assert result.returncode == 0, result.stderr
    model = PeftModel.from_pretrained(load_base(base), tmp_path / "lora").merge_and_unload()
    model.save_pretrained(tmp_path / "lora-merged")
    assert_same_tensors(load_weights(tmp_path / "lora-merged"), expected, base_weights, f"{method} {variant} lora")


def test_lora_output_of_conv1d_seeds_is_written_in_peft_layout(peft_seeds, tmp_path):
    from safetensors.torch import load_file

    seeds = peft_seeds["gpt2-bias-all"]
    recipe = adapter_recipe(tmp_path / "r.yml", "seedft", None, seeds, {"format": "lora"})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["bias"] == "all"
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    A = tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"]
    assert A.shape[1] == 32 and B.shape[0] == 128  # (k, in) and (out, k), as PEFT saves them
    assert "base_model.model.transformer.h.0.ln_1.bias" in tensors


def test_an_unknown_tensor_is_refused_by_validate_and_run(peft_seeds, bases, tmp_path):
    from safetensors.torch import load_file, save_file

    seeds = [shutil.copytree(seed, tmp_path / seed.name) for seed in peft_seeds["llama-seq-cls"]]
    file = seeds[1] / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.norm.mystery_scale"] = torch.ones(32)
    save_file(tensors, file)
    recipe = adapter_recipe(tmp_path / "r.yml", "seedft", bases / "llama-cls", seeds, {"format": "lora"})
    refused(run_cli("mergekit-seed", "validate", recipe), "model.norm.mystery_scale", str(seeds[1]))
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "model.norm.mystery_scale", out=out)
    assert not out.exists()


def test_conv1d_seeds_without_a_reachable_base_are_refused(peft_seeds, tmp_path):
    seeds = [shutil.copytree(seed, tmp_path / seed.name) for seed in peft_seeds["gpt2-bias-all"]]
    for seed in seeds:
        config = json.loads((seed / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone")
        (seed / "adapter_config.json").write_text(json.dumps(config))
    recipe = adapter_recipe(tmp_path / "r.yml", "seedft", None, seeds, {"format": "lora"})
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out), "fan_in_fan_out", "base model", out=out)


def test_missing_saved_head_counts_as_the_base_with_a_warning(bases, peft_seeds, tmp_path):
    """A seed whose file lacks the saved head merges as if it kept the base's head."""
    from safetensors.torch import load_file, save_file

    seeds = [shutil.copytree(seed, tmp_path / seed.name) for seed in peft_seeds["llama-seq-cls"]]
    file = seeds[2] / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.score.weight"]
    save_file(tensors, file)
    base = bases / "llama-cls"
    recipe = adapter_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, {"format": "full"})
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "score.weight: missing in" in result.stderr and "the base's value" in result.stderr
    heads = [load_file(s / "adapter_model.safetensors")["base_model.model.score.weight"] for s in seeds[:2]]
    base_head = load_weights(base)["score.weight"]
    from mergekit_seed.maths.kernels.seedlora import seedlora_dm

    expected = base_head + seedlora_dm([h - base_head for h in heads] + [torch.zeros_like(base_head)])
    torch.testing.assert_close(load_weights(tmp_path / "out")["score.weight"], expected, rtol=1e-5, atol=1e-6)


def test_lora_output_honours_dtype_and_rank_auto(peft_seeds, bases, tmp_path):
    from safetensors.torch import load_file

    seeds = peft_seeds["llama-seq-cls"]
    recipe = adapter_recipe(tmp_path / "r.yml", "seedlora_twostage", bases / "llama-cls", seeds, {"format": "lora"})
    exact = run_cli("mergekit-seed", "run", recipe, tmp_path / "exact", "--quiet")
    assert exact.returncode == 0 and "output.rank: auto" in exact.stderr, exact.stderr

    text = recipe.read_text() + "  rank: auto\ndtype: bfloat16\n"
    recipe.write_text(text)
    auto = run_cli("mergekit-seed", "run", recipe, tmp_path / "auto", "--quiet")
    assert auto.returncode == 0 and "output.rank: auto" not in auto.stderr, auto.stderr
    tensors = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            B = tensors[key.replace("lora_A", "lora_B")]
            rank, (out_features, in_features) = A.shape[0], (B.shape[0], A.shape[1])
            assert rank * (in_features + out_features) <= in_features * out_features, key


def test_the_card_hashes_the_base_when_a_lora_output_reads_it(bases, peft_seeds, tmp_path):
    from mergekit_seed.card import read_card

    base = bases / "llama-cls"
    recipe = adapter_recipe(tmp_path / "heads.yml", "seedft", base, peft_seeds["llama-seq-cls"], {"format": "lora"})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "heads", "--quiet", check=True)

    def hashed_folders(output):
        return {entry["folder"] for entry in read_card(output)["provenance"]["inputs"].values()}

    assert base.name in hashed_folders(tmp_path / "heads")

    plain = [shutil.copytree(seed, tmp_path / f"plain{i}") for i, seed in enumerate(peft_seeds["llama-seq-cls"])]
    from safetensors.torch import load_file, save_file

    for seed in plain:  # LoRA factors only: the base's weights are not read, nor hashed
        file = seed / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(file).items() if "lora_" in k}, file)
    recipe = adapter_recipe(tmp_path / "plain.yml", "seedft", base, plain, {"format": "lora"})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "plain", "--quiet", check=True)
    assert base.name not in hashed_folders(tmp_path / "plain")


def test_the_engine_and_the_card_agree_on_whether_the_base_is_read(bases, peft_seeds, tmp_path):
    """One predicate (references.adapter_files.why_base_is_read) decides both: base-free lore with a
    head every seed saves whole reads no base weights, so the card hashes none; seedft, which
    takes that head's delta from the base, reads and hashes it."""
    from mergekit_seed.card import read_card
    from mergekit_seed.references.adapter_files import why_base_is_read

    base = bases / "llama-cls"
    seeds = peft_seeds["llama-seq-cls"]
    assert why_base_is_read(seeds, needs_base=False, output_format="lora", base_model=str(base)) is None
    assert "saved whole" in why_base_is_read(seeds, needs_base=True, output_format="lora", base_model=str(base))
    for method, hashed in (("lore", False), ("seedft", True)):
        recipe = adapter_recipe(tmp_path / f"{method}.yml", method, base, seeds, {"format": "lora"})
        run_cli("mergekit-seed", "run", recipe, tmp_path / method, "--quiet", check=True)
        folders = {entry["folder"] for entry in read_card(tmp_path / method)["provenance"]["inputs"].values()}
        assert (base.name in folders) is hashed, (method, folders)


# ------------------------------------------------------------------ refused, by PEFT's own files


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    MixtralForCausalLM(
        MixtralConfig(
            vocab_size=48,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=2,
            num_experts_per_tok=1,
        )
    ).save_pretrained(root / "base")
    return root / "base"


@pytest.mark.parametrize("case", ["alora", "layer_replication", "moe_target_parameters"])
@pytest.mark.parametrize("output_format", ["lora", "full"])
def test_peft_adapters_no_delta_can_express_are_refused_in_one_line(
    bases, tiny_mixtral, tmp_path, case, output_format
):
    """aLoRA acts only after its invocation tokens; layer_replication builds a deeper model;
    a LoRA on MoE experts' 3-D parameters is no Linear delta. Each was written wrong, exit 0."""
    base = tiny_mixtral if case == "moe_target_parameters" else bases / "llama-lm"
    arguments = {
        "alora": dict(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6]),
        "layer_replication": dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]]),
        "moe_target_parameters": dict(target_modules=[], target_parameters=["experts.gate_up_proj"]),
    }[case]
    seeds = [save_peft_seed(base, tmp_path / f"s{i}", i, task_type="CAUSAL_LM", **arguments) for i in range(2)]
    fragment = {
        "alora": "alora_invocation_tokens",
        "layer_replication": "layer_replication",
        "moe_target_parameters": "gate_up_proj",
    }[case]
    recipe = adapter_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, {"format": output_format})
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), fragment, out=tmp_path / "out")
    refused(run_cli("mergekit-seed", "validate", recipe), fragment)


@pytest.mark.parametrize("change", ["r disagrees with the factors", "r is a boolean", "int8 factors"])
def test_a_config_that_disagrees_with_its_tensors_is_refused(bases, tmp_path, change):
    from safetensors.torch import load_file, save_file

    base = bases / "llama-lm"
    seeds = [
        save_peft_seed(base, tmp_path / f"s{i}", i, task_type="CAUSAL_LM", target_modules=["q_proj"]) for i in range(2)
    ]
    config_path = seeds[1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if change == "r disagrees with the factors":
        config["r"] = 2  # the factors have rank 4
        fragment = "has rank 4 but adapter_config.json says 2"
    elif change == "r is a boolean":
        config["r"] = True
        fragment = "field 'r'"
    else:
        tensors = load_file(seeds[1] / "adapter_model.safetensors")
        save_file(
            {key: (value * 100).to(torch.int8) for key, value in tensors.items()},
            seeds[1] / "adapter_model.safetensors",
        )
        fragment = "is int8"
    config_path.write_text(json.dumps(config))
    recipe = adapter_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, {"format": "lora"})
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), str(seeds[1]), fragment, out=tmp_path / "out")


@pytest.mark.parametrize("field", ["use_hyper_lora", "rank_dropout_schedule"])
def test_a_lora_config_field_no_release_we_know_has_is_refused_naming_it(tiny_loras, tmp_path, field):
    """Issue 48: an adapter from a newer PEFT variant was read as plain LoRA."""
    base, loras = tiny_loras
    seeds = [shutil.copytree(lora, tmp_path / lora.name) for lora in loras]
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config[field] = True
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds, output={"format": "lora"})
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "out"),
        f"field '{field}' is not a LoraConfig field",
        out=tmp_path / "out",
    )


def test_every_lora_config_field_is_read_refused_or_without_effect():
    """A new PEFT release cannot slip a LoraConfig field past the reader: each field of the
    pinned peft is read (and covered by an exactness variant above), refused, or listed as
    changing nothing in what the saved tensors mean."""
    import dataclasses

    from peft import LoraConfig

    from mergekit_seed.references.adapter_files import (
        LORA_FIELDS_REFUSED,
        LORA_FIELDS_WITHOUT_EFFECT,
        LoraFolderConfig,
    )

    fields = {field.name for field in dataclasses.fields(LoraConfig)}
    read = set(LoraFolderConfig.model_fields) - {"peft_type", "base_model_name_or_path", "task_type"}
    classified = read | set(LORA_FIELDS_REFUSED) | set(LORA_FIELDS_WITHOUT_EFFECT)
    assert fields - classified == set(), "LoraConfig fields nobody decided about"
    assert not set(LORA_FIELDS_REFUSED) & set(LORA_FIELDS_WITHOUT_EFFECT)
    # every field the reader interprets is set by a PEFT variant whose merge is checked exactly
    exercised = {name for _, arguments in VARIANTS.values() for name in arguments}
    exercised |= {"r", "lora_alpha"}  # every variant
    untested = read - exercised - {"use_dora"}  # use_dora: refused (LORA_FIELDS_REFUSED's reason is DoRA's too)
    assert untested == set(), f"fields read but set by no exactness variant: {untested}"


def test_what_run_refuses_validate_refuses_too(bases, tiny_loras, tmp_path):
    """The base listed among the adapters, `base_model: /`, an adapter as the base, and an
    adapter whose saved embedding and its LoRA delta disagree on the vocabulary."""
    from safetensors.torch import load_file, save_file

    base, loras = tiny_loras
    adapters = [str(lora) for lora in loras]
    cases = {
        "is also listed under models": (str(base), [str(base)] + adapters),
        "/ is not a model or adapter folder": ("/", adapters),
        "is an adapter folder; give the model the adapters were trained on": (adapters[0], adapters),
    }
    llama = bases / "llama-lm"
    seeds = [
        save_peft_seed(
            llama, tmp_path / f"emb{i}", i, task_type="CAUSAL_LM", target_modules=["embed_tokens", "q_proj"]
        )
        for i in range(2)
    ]
    tensors = load_file(seeds[1] / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = torch.cat([tensors[key], torch.zeros(8, tensors[key].shape[1])])  # resized after the LoRA was made
    save_file(tensors, seeds[1] / "adapter_model.safetensors")
    cases["is saved whole with shape (56, 32) but its LoRA delta has shape (48, 32)"] = (
        str(llama),
        [str(s) for s in seeds],
    )
    for index, (fragment, (base_model, models)) in enumerate(cases.items()):
        recipe = adapter_recipe(tmp_path / f"r{index}.yml", "seedft", base_model, models, {"format": "full"})
        refused(run_cli("mergekit-seed", "validate", recipe), fragment)
        refused(run_cli("mergekit-seed", "run", recipe, tmp_path / f"out{index}"))


@pytest.mark.parametrize("method", METHODS)
def test_a_router_adapter_on_target_parameters_is_written_as_peft_can_load_it(tiny_mixtral, tmp_path, method):
    """Issue 39: a LoRA on Mixtral's router (``target_parameters=["mlp.gate.weight"]``) beside
    an attention LoRA. PEFT wraps a targeted parameter in a ParamWrapper, which ignores
    rank_pattern: the router (rank <= 2 experts) must be written at the adapter's one rank and
    under target_parameters, not as a module with its own rank. Identical seeds give back the seed."""
    from peft import PeftModel

    seed = save_peft_seed(
        tiny_mixtral, tmp_path / "seed", 1, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]
    )
    recipe = adapter_recipe(
        tmp_path / "r.yml",
        method,
        tiny_mixtral,
        [seed] * 3,
        {"format": "lora"},
        {"energy": 1.0} if method == "seedlora_twostage" else None,
    )
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.gate.weight"] and not any(
        "gate" in m for m in written["target_modules"]
    )
    expected = logits(PeftModel.from_pretrained(load_base(tiny_mixtral), seed))
    result = logits(PeftModel.from_pretrained(load_base(tiny_mixtral), tmp_path / "out"))
    assert_close_to(result, expected, logits(load_base(tiny_mixtral)), f"{method} router")


def test_a_router_adapter_routed_to_a_full_model_names_the_base_spelling(tiny_mixtral, tmp_path):
    """transformers 5 saves Mixtral's router as block_sparse_moe.gate and loads it as mlp.gate,
    which PEFT names: the refusal says where the base holds it and what works (a LoRA output)."""
    seed = save_peft_seed(
        tiny_mixtral, tmp_path / "seed", 1, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]
    )
    recipe = adapter_recipe(tmp_path / "r.yml", "seedft", tiny_mixtral, [seed] * 3, {"format": "full"})
    result = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet")
    refused(
        result,
        "model.layers.0.mlp.gate.weight",
        "block_sparse_moe.gate.weight",
        "output.format: lora",
        out=tmp_path / "out",
    )


def test_a_mixtral_saved_in_checkpoint_layout_merges_on_the_full_route_as_stock_mergekit_does(tiny_mixtral, tmp_path):
    """transformers 5 saves Mixtral's experts as block_sparse_moe.experts.N.w1/w2/w3, and
    mergekit reads them as mlp.experts.gate_up_proj through transformers' conversion mapping;
    the up-front check asks the same mapping (issue 39: it refused what stock merges)."""
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_mixtral)
    seeds = []
    for index in range(3):
        torch.manual_seed(10 + index)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(tmp_path / f"seed{index}")
        seeds.append(tmp_path / f"seed{index}")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: seedlora_dm\nbase_model: {tiny_mixtral}\nmodels:\n"
        + "".join(f"  - model: {seed}\n" for seed in seeds)
        + "dtype: float32\n"
    )
    run_cli("mergekit-seed", "validate", recipe, check=True)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "ours", "--quiet", check=True)
    run_cli("mergekit-yaml", recipe, tmp_path / "stock", check=True)
    ours, stock = (
        load_file(tmp_path / "ours" / "model.safetensors"),
        load_file(tmp_path / "stock" / "model.safetensors"),
    )
    assert "model.layers.0.mlp.experts.gate_up_proj" in ours and sorted(ours) == sorted(stock)
    assert all(torch.equal(ours[name], stock[name]) for name in ours)

    def state(path):  # in transformers' model layout, float64
        return {name: value.double() for name, value in MixtralForCausalLM.from_pretrained(path).state_dict().items()}

    base, deltas = state(tiny_mixtral), [state(seed) for seed in seeds]
    for name, merged in ours.items():  # docs/methods/seedlora_dm.md's math, written out in float64
        taus = [seed[name] - base[name] for seed in deltas]
        mean = sum(taus) / 3
        mu_hat = sum(tau.mean() for tau in taus) / 3
        s_hat = sum(tau.std(unbiased=False) for tau in taus) / 3
        expected = base[name] + s_hat * (mean - mean.mean()) / mean.std(unbiased=False) + mu_hat
        assert torch.allclose(merged.double(), expected, atol=1e-6), name

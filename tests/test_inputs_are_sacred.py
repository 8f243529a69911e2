"""Nothing a user types or a file holds destroys data, publishes NaN weights or ends in a traceback.

Each case here failed before the change that added it (issue 23): non-finite parameters written
into the model, adapters relative to a base PEFT modified, and malformed files that ended in
tracebacks. Inputs are hashed before and after every refusal. Where OUT may be (never over an
input) is tests/test_output.py's.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import lora_copies, no_staging_left, refused, run_cli, tree_hashes, write_recipe, write_splits
from safetensors.torch import load_file, save_file

from mergekit_seed.references.weights import load_weights


@pytest.fixture
def family(tiny_family, tmp_path):
    """A private copy of the tiny base and seeds, under ``runs/`` as users keep them."""
    base, seeds = tiny_family
    runs = tmp_path / "runs"
    return shutil.copytree(base, runs / "base"), [shutil.copytree(s, runs / s.name) for s in seeds]


# ------------------------------------------------------------------ 2. no non-finite number enters a merge


@pytest.mark.parametrize("method", ["seedft", "seedlora_dm"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_lambda_is_refused_by_validate_and_run(family, tmp_path, method, value):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", method, base, seeds, {"lambda": value})
    refused(run_cli("mergekit-seed", "validate", recipe), "'lambda'", "finite")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "'lambda'", out=tmp_path / "out")


@pytest.mark.parametrize("method", ["seedft", "seedlora_dm"])
@pytest.mark.parametrize("value", ["1e39", "-1e39"])
def test_lambda_past_float32_is_refused(family, tmp_path, method, value):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", method, base, seeds, {"lambda": value})
    refused(run_cli("mergekit-seed", "validate", recipe), "'lambda'")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "'lambda'", out=tmp_path / "out")


def _set_huge(folder: Path, file: str, keys: str, value: float) -> None:
    """Every tensor of ``folder/file`` whose key contains ``keys`` filled with ``value`` (finite)."""
    tensors = load_file(folder / file)
    for key in [k for k in tensors if keys in k]:
        tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, folder / file)


@pytest.mark.parametrize("route", ["checkpoints", "adapters-full", "adapters-lora"])
@pytest.mark.parametrize("method", ["seedft", "seedlora_dm"])
def test_a_merge_that_overflows_publishes_nothing(family, tiny_loras, tmp_path, route, method):
    """Finite inputs and parameters whose merge is not finite (float32 overflows): the runner's
    check of every written tensor refuses it, naming the tensor."""
    if route == "checkpoints":
        base, seeds = family
        for seed in seeds:
            _set_huge(seed, "model.safetensors", "model.layers.0.mlp.up_proj.weight", 3e38)
        recipe = write_recipe(tmp_path / "r.yml", method, base, seeds)
    else:
        base, seeds = lora_copies(tiny_loras, tmp_path)
        for seed in seeds:
            _set_huge(seed, "adapter_model.safetensors", "layers.0.self_attn.q_proj.lora_", 1e25)
        output = {"format": "full" if route == "adapters-full" else "lora"}
        recipe = write_recipe(tmp_path / "r.yml", method, base, seeds, output=output)
    out = tmp_path / "out"
    refused(run_cli("mergekit-seed", "run", recipe, out, "--quiet"), "NaN or Inf", out=out)
    assert not out.exists()


def test_stock_mergekit_yaml_never_writes_an_overflowed_tensor_of_ours(family, tmp_path):
    base, seeds = family
    for seed in seeds:
        _set_huge(seed, "model.safetensors", "model.layers.0.mlp.up_proj.weight", 3e38)
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    result = run_cli("mergekit-yaml", recipe, out, isolated=True)
    assert result.returncode != 0
    assert "gives NaN or Inf from finite inputs" in result.stderr
    for tensor in load_weights(out).values() if out.exists() else []:
        assert torch.isfinite(tensor).all()


def weighted_recipe(path: Path, method: str, base, weights: dict, extra: str = "") -> Path:
    """A recipe whose models carry their own ``weight`` ({model: weight, or None for none})."""
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for model, weight in weights.items():
        lines.append(f"  - model: {model}")
        if weight is not None:
            lines.append(f"    parameters: {{weight: {weight}}}")
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def test_weights_that_sum_to_zero_are_refused(family, tiny_loras, tmp_path):
    base, seeds = family
    recipe = weighted_recipe(tmp_path / "r.yml", "seedlora_dm", base, {seeds[0]: 1.0, seeds[1]: -1.0})
    refused(run_cli("mergekit-seed", "validate", recipe), "sum to 0")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "sum to 0", out=tmp_path / "out")
    # normalize: false divides by N instead: accepted
    weighted_recipe(recipe, "seedlora_dm", base, {seeds[0]: 1.0, seeds[1]: -1.0}, "parameters:\n  normalize: false\n")
    assert run_cli("mergekit-seed", "validate", recipe).returncode == 0
    # the adapter route refuses the same recipe
    _, adapters = lora_copies(tiny_loras, tmp_path / "a")
    adapter_recipe = weighted_recipe(tmp_path / "a.yml", "seedlora_dm", None, {adapters[0]: 2.5, adapters[1]: -2.5})
    refused(run_cli("mergekit-seed", "run", adapter_recipe, tmp_path / "aout"), "sum to 0", out=tmp_path / "aout")


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_non_finite_weight_is_refused(family, tmp_path, value):
    base, seeds = family
    recipe = weighted_recipe(tmp_path / "r.yml", "seedlora_dm", base, {seeds[0]: value, seeds[1]: None})
    refused(run_cli("mergekit-seed", "validate", recipe), "models[0]", "'weight'", "finite")
    # mergekit's own methods get the same check
    weighted_recipe(recipe, "linear", None, {seeds[0]: value, seeds[1]: 1.0})
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "'weight'", "finite", out=tmp_path / "out")


@pytest.mark.parametrize(
    "field,value",
    [("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("alpha_pattern", {"q_proj": float("nan")})],
)
def test_non_finite_adapter_config_numbers_are_one_line(tiny_loras, tmp_path, field, value):
    _, seeds = lora_copies(tiny_loras, tmp_path)
    config = json.loads((seeds[1] / "adapter_config.json").read_text())
    config[field] = value
    (seeds[1] / "adapter_config.json").write_text(json.dumps(config))  # json writes NaN and Infinity
    recipe = write_recipe(tmp_path / "r.yml", "seedft", None, seeds)
    refused(run_cli("mergekit-seed", "validate", recipe), field)
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), field, out=tmp_path / "out")


# ------------------------------------------------------------------ 3. adapters whose base is not the base


@pytest.fixture(scope="module")
def pissa(tmp_path_factory):
    """Two real PiSSA adapters on the tiny base, each saved as PEFT saves it (relative to the
    residual base) and converted (relative to the original base), with the fine-tuned weights."""
    from peft import LoraConfig, get_peft_model
    from tiny import save_tiny_llama
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("pissa")
    base = save_tiny_llama(root / "base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    initial = root / "initial"
    peft_model.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the initial adapter
    peft_model.save_pretrained(initial)
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "fine-tuning": move the factors
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    raw, converted = root / "raw", root / "converted"
    peft_model.save_pretrained(raw)
    peft_model.save_pretrained(converted, path_initial_model_for_weight_conversion=str(initial))
    fine_tuned = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, raw, converted, fine_tuned


def test_an_unconverted_pissa_adapter_is_refused_with_the_conversion(pissa, tmp_path):
    base, raw, converted, _ = pissa
    assert json.loads((raw / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, [raw, converted], output={"format": "full"})
    refused(
        run_cli("mergekit-seed", "validate", recipe),
        "init_lora_weights 'pissa'",
        "path_initial_model_for_weight_conversion",
    )
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "init_lora_weights 'pissa'", out=tmp_path / "out"
    )
    # the checkpoint route (model: BASE+ADAPTER) is refused as well
    text = (
        f"merge_method: seedlora_dm\nbase_model: {base}\nmodels:\n  - model: {base}+{raw}\n  - model: "
        f"{base}+{converted}\ndtype: float32\n"
    )
    (tmp_path / "c.yml").write_text(text)
    refused(run_cli("mergekit-seed", "validate", tmp_path / "c.yml"), "init_lora_weights 'pissa'")


@pytest.mark.parametrize("init", ["olora", "corda", "loftq", "pissa_niter_4"])
def test_every_init_that_changes_the_base_is_refused(tiny_loras, tmp_path, init):
    _, seeds = lora_copies(tiny_loras, tmp_path)
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    refused(
        run_cli("mergekit-seed", "run", write_recipe(tmp_path / "r.yml", "seedft", None, seeds), tmp_path / "out"),
        f"'{init}'",
    )


def test_a_converted_pissa_adapter_merges_to_the_fine_tuned_weights(pissa, tmp_path):
    """Two copies of the converted adapter, merged with seedlora_dm (N identical seeds give the
    seed back), equal PEFT's own fine-tuned model (its merge_and_unload) on the original base."""
    base, _, converted, fine_tuned = pissa
    copies = [shutil.copytree(converted, tmp_path / f"copy{i}") for i in range(2)]
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, copies, output={"format": "full"})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    merged = load_weights(tmp_path / "out")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(merged[name], fine_tuned[name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ 4. every malformed file is one line


def test_an_adapter_config_that_is_a_json_list_is_one_line(tiny_loras, tmp_path):
    _, seeds = lora_copies(tiny_loras, tmp_path)
    (seeds[0] / "adapter_config.json").write_text("[1, 2]")
    recipe = write_recipe(tmp_path / "r.yml", "seedft", None, seeds)
    refused(run_cli("mergekit-seed", "validate", recipe), "must be a JSON object")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "must be a JSON object", out=tmp_path / "out")


def test_a_zero_rank_pattern_is_one_line(tiny_loras, tmp_path):
    _, seeds = lora_copies(tiny_loras, tmp_path)
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 0}
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    refused(
        run_cli("mergekit-seed", "run", write_recipe(tmp_path / "r.yml", "seedft", None, seeds), tmp_path / "out"),
        "rank_pattern",
    )


def test_factors_whose_inner_dimensions_differ_are_one_line(tiny_loras, tmp_path):
    _, seeds = lora_copies(tiny_loras, tmp_path)
    file = seeds[0] / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], 3)
    save_file(tensors, file)
    refused(
        run_cli("mergekit-seed", "run", write_recipe(tmp_path / "r.yml", "seedft", None, seeds), tmp_path / "out"),
        "do not fit together",
    )


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("output", ["full", "lora"])
def test_a_truncated_base_is_one_line_on_the_adapter_route(tiny_loras, tmp_path, output):
    base, seeds = lora_copies(tiny_loras, tmp_path)
    _truncate(base / "model.safetensors")
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]  # a LoRA output then reads the base too
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(seeds[0] / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.randn(64, 32)  # as PEFT saves a module whole
    save_file(tensors, seeds[0] / "adapter_model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, output={"format": output})
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet"),
        "corrupt or truncated",
        out=tmp_path / "out",
    )


def test_a_truncated_base_is_one_line_on_the_checkpoint_route(family, tmp_path):
    base, seeds = family
    _truncate(base / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    refused(run_cli("mergekit-seed", "validate", recipe), "corrupt or truncated", str(base))
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "corrupt or truncated", out=tmp_path / "out")
    refused(
        run_cli("mergekit-seed", "analyze", *seeds, "--base", base, "--out", tmp_path / "analysis"),
        "corrupt or truncated",
    )


def test_a_truncated_model_is_one_line_in_compare(family, tmp_path):
    _, seeds = family
    _truncate(seeds[1] / "model.safetensors")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "abc"}\n{"text": "cab"}\n')
    refused(
        run_cli("mergekit-seed", "compare", seeds[0], seeds[1], "--data", data, "--out", tmp_path / "c", "--quiet"),
        "corrupt or truncated",
        str(seeds[1]),
    )


def test_a_truncated_check_folder_is_one_line(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "merged", "--quiet", check=True)
    check = shutil.copytree(tmp_path / "merged", tmp_path / "check")
    _truncate(check / "model.safetensors")
    refused(
        run_cli(
            "mergekit-seed", "reproduce", tmp_path / "merged", tmp_path / "again", "--recipe", recipe, "--check", check
        ),
        "corrupt or truncated",
    )


def _front(card: Path):
    text = card.read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _write_front(card: Path, front, body: str) -> None:
    card.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body, encoding="utf-8")


@pytest.fixture
def merged_card(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "merged", "--quiet", check=True)
    return tmp_path / "merged" / "README.md", recipe


CARD_DAMAGE = [
    ("provenance a list", lambda f: f.__setitem__("mergekit_seed", [1, 2]), "mergekit_seed"),
    ("provenance a string", lambda f: f.__setitem__("mergekit_seed", "x"), "mergekit_seed"),
    ("inputs a list", lambda f: f["mergekit_seed"].__setitem__("inputs", ["a"]), "mergekit_seed.inputs"),
    (
        "an input a string",
        lambda f: f["mergekit_seed"]["inputs"].__setitem__("input0", "x"),
        "mergekit_seed.inputs.input0",
    ),
    (
        "files a list",
        lambda f: f["mergekit_seed"]["inputs"]["input0"].__setitem__("files", ["x"]),
        "mergekit_seed.inputs.input0",
    ),
    ("hub_inputs a list", lambda f: f["mergekit_seed"].__setitem__("hub_inputs", ["x"]), "mergekit_seed.hub_inputs"),
    (
        "hub_inputs a string",
        lambda f: f["mergekit_seed"].__setitem__("hub_inputs", "org/x"),
        "mergekit_seed.hub_inputs",
    ),
]


@pytest.mark.parametrize("case,damage,fragment", CARD_DAMAGE, ids=[c[0] for c in CARD_DAMAGE])
def test_malformed_card_structures_are_one_line(merged_card, tmp_path, case, damage, fragment):
    card, recipe = merged_card
    front, body = _front(card)
    damage(front)
    _write_front(card, front, body)
    refused(
        run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--recipe", recipe),
        fragment,
        out=tmp_path / "again",
    )


def test_front_matter_that_is_not_a_mapping_is_one_line(merged_card, tmp_path):
    card, recipe = merged_card
    _, body = _front(card)
    card.write_text("---\n- a\n- b\n---\n" + body, encoding="utf-8")
    refused(run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--recipe", recipe), "not a mapping")


@pytest.mark.parametrize("block", ["merge_method: [\n", "- a list\n"])
def test_a_card_whose_recipe_is_not_a_yaml_mapping_is_one_line(merged_card, tmp_path, block):
    card, recipe = merged_card
    text = card.read_text(encoding="utf-8")
    start = text.index("```yaml\n") + len("```yaml\n")
    card.write_text(text[:start] + block + text[text.index("```", start) :], encoding="utf-8")
    for flags in ((), ("--recipe", recipe)):
        refused(run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", *flags), f"{card} (recipe)")


def test_a_card_that_is_not_utf8_is_one_line(merged_card, tmp_path):
    card, recipe = merged_card
    card.write_bytes(b"\xff\xfe" + card.read_bytes())
    refused(run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--recipe", recipe), "not UTF-8")


def test_deeply_nested_json_in_compare_data_is_one_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    refused(
        run_cli("mergekit-seed", "compare", tmp_path / "a", tmp_path / "b", "--data", data, "--out", tmp_path / "c"),
        "nested too deeply",
    )


# ------------------------------------------------------------------ 5. no local path is published


def _texts_mentioning(folder: Path, needle: str) -> list:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # weights
            if needle in text:
                found.append(path.name)
    return found


@pytest.mark.parametrize("route", ["checkpoints", "adapters-lora", "adapters-full"])
def test_no_written_text_file_carries_a_local_path(family, tiny_loras, tmp_path, route):
    if route == "checkpoints":
        base, seeds = family
        recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
        recipe.write_text(f"# my fine-tunes live in {tmp_path}\n" + recipe.read_text())
    else:
        base, seeds = lora_copies(tiny_loras, tmp_path)
        fmt = "full" if route == "adapters-full" else "lora"
        config = json.loads((seeds[0] / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"]  # PEFT wrote the (local) base path
        recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, output={"format": fmt})
    out = tmp_path / "out"
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)
    assert _texts_mentioning(out, str(tmp_path)) == []
    card = (out / "README.md").read_text()
    assert "`input0`" in card and "inputN" not in card.split("## Reproduce")[0]
    # the card still reproduces the merge, its inputs given by label or by the user's recipe
    labels = {f"input{i}": folder for i, folder in enumerate(sorted(str(p) for p in [base, *seeds]))}
    flags = [arg for label, folder in labels.items() for arg in ("--input", f"{label}={folder}")]
    result = run_cli("mergekit-seed", "reproduce", out, tmp_path / "again", *flags, "--check", out)
    assert result.returncode == 0 and "every tensor matches" in result.stdout, result.stderr
    assert _texts_mentioning(tmp_path / "again", str(tmp_path)) == []
    result = run_cli("mergekit-seed", "reproduce", out, tmp_path / "again2", "--recipe", recipe, "--check", out)
    assert result.returncode == 0, result.stderr


def test_reproduce_without_the_inputs_names_the_labels(merged_card, tmp_path):
    card, recipe = merged_card
    result = run_cli("mergekit-seed", "reproduce", card, tmp_path / "again")
    refused(result, "--input input0=PATH", "--recipe FILE", out=tmp_path / "again")
    refused(run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--input", "input9=/x"), "names no input9")
    other = tmp_path / "other.yml"
    other.write_text(recipe.read_text().replace("seedlora_dm", "seedft"))
    refused(
        run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", "--recipe", other), "not the card's recipe"
    )


# ------------------------------------------------------------------ 6. validate = run


def test_validate_refuses_adapters_whose_vocabulary_differs_from_the_base(tiny_loras, tmp_path):
    """Seeds trained on a resized vocabulary (a saved embedding with more rows than the base's)."""
    base, seeds = lora_copies(tiny_loras, tmp_path)
    for seed in seeds:
        config = json.loads((seed / "adapter_config.json").read_text())
        config["modules_to_save"] = ["embed_tokens"]
        (seed / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(seed / "adapter_model.safetensors")
        tensors["base_model.model.model.embed_tokens.weight"] = torch.randn(72, 32)  # base: 64 rows
        save_file(tensors, seed / "adapter_model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, output={"format": "full"})
    refused(run_cli("mergekit-seed", "validate", recipe), "model.embed_tokens.weight", "(72, 32)")
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "model.embed_tokens.weight", out=tmp_path / "out"
    )


def test_an_untrusted_card_cannot_make_reproduce_read_files_outside_its_inputs(tiny_family, tmp_path, monkeypatch):
    """A card's inputs may name only weight files inside the folders its recipe names, and its
    hub_inputs only repositories its recipe names: no absolute path, no ../, no other file."""
    import mergekit_seed.reproduce as card_module

    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds[:2])
    merged = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    text = (merged / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    metadata = yaml.safe_load(front)
    files = metadata["mergekit_seed"]["inputs"]["input0"]["files"]
    files.update({str(secret): "0" * 64, "../secret.safetensors": "0" * 64, "config.json": "0" * 64})
    metadata["mergekit_seed"]["hub_inputs"] = {"someone/elsewhere": {"revision": "a" * 40, "files": {}}}
    (merged / "README.md").write_text("---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n" + body)

    hashed = []
    original = card_module.sha256
    monkeypatch.setattr(
        card_module, "sha256", lambda path, *a, **k: hashed.append(Path(path)) or original(path, *a, **k)
    )
    result = run_cli("mergekit-seed", "reproduce", merged, tmp_path / "again", "--recipe", recipe)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for name in (str(secret), "../secret.safetensors", "config.json"):
        assert f"the card names {name!r}, which is not a weight file in the input's folder" in result.stderr
    assert "someone/elsewhere: the card records this Hub input, but its recipe does not name it" in result.stderr
    inputs = {str(folder.resolve()) for folder in (base, *seeds[:2])}
    assert hashed and all(str(path.resolve().parent) in inputs for path in hashed), hashed
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    "where", ["a seed", "the folder of the seeds", "inside a seed", "the base", "the folder of the data"]
)
def test_select_never_writes_over_an_input_and_leaves_every_input_as_it_was(family, tmp_path, where):
    """select merges candidates inside its own staging folder and moves the winner into OUT;
    OUT may not equal, contain or lie inside a seed, the base or a data file, even with
    --overwrite, and a successful selection changes no byte of its inputs."""
    base, seeds = family
    validation, test = write_splits(tmp_path / "runs" / "data")
    out = {
        "a seed": seeds[1],
        "the folder of the seeds": seeds[0].parent,
        "inside a seed": seeds[0] / "merged",
        "the base": base,
        "the folder of the data": validation.parent,
    }[where]
    arguments = [
        *map(str, seeds),
        "--base",
        base,
        "--validation",
        validation,
        "--test",
        test,
        "--methods",
        "linear",
        "--quiet",
    ]
    before = tree_hashes(tmp_path / "runs")
    refused(
        run_cli("mergekit-seed", "select", *arguments, "--out", out, "--overwrite"),
        "a merge never writes over its inputs",
    )
    assert tree_hashes(tmp_path / "runs") == before
    no_staging_left(out.parent)
    run_cli("mergekit-seed", "select", *arguments, "--out", tmp_path / "chosen", check=True)
    assert tree_hashes(tmp_path / "runs") == before and (tmp_path / "chosen" / "select.json").is_file()
    no_staging_left(tmp_path)

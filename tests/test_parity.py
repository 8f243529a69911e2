"""Recipes stock mergekit merges run here with the same tensors; mistakes are one line; a card
never switches on remote code."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import refused, run_cli, write_recipe

from mergekit_seed.references.weights import load_weights


def copy_family(tiny_family, root: Path):
    base, seeds = tiny_family
    return shutil.copytree(base, root / "base"), [shutil.copytree(s, root / s.name) for s in seeds]


def same_as_stock_mergekit(recipe: Path, tmp_path: Path, *options) -> Path:
    """``mergekit-seed run`` and stock ``mergekit-yaml`` give bitwise the same tensors; the
    card reproduces the merge. Returns our output folder."""
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    run_cli("mergekit-seed", "run", recipe, ours, "--quiet", *options, check=True)
    run_cli("mergekit-yaml", recipe, stock, *options, check=True)
    a, b = load_weights(ours), load_weights(stock)
    assert set(a) == set(b) and a
    for name in b:
        assert torch.equal(a[name], b[name]), name
    result = run_cli(
        "mergekit-seed", "reproduce", ours / "README.md", tmp_path / "again", "--check", ours, "--recipe", recipe
    )
    assert result.returncode == 0, result.stderr
    return ours


def test_per_model_conditional_parameters(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n"
        f"  - model: {seeds[0]}\n    parameters:\n      weight: [{{filter: self_attn, value: 0.0}}, {{value: 1.0}}]\n"
        f"  - model: {seeds[1]}\n    parameters:\n      weight: 1.0\ndtype: float32\n"
    )
    ours = same_as_stock_mergekit(recipe, tmp_path)
    assert "filter" in (ours / "README.md").read_text()


def test_a_builtin_method_with_one_model(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {seeds[0]}\n    parameters: "
        f"{{weight: 0.5}}\n"
        "dtype: float32\n"
    )
    same_as_stock_mergekit(recipe, tmp_path)


def test_pytorch_bin_checkpoints(tiny_family, tmp_path):
    from safetensors.torch import load_file

    base, seeds = copy_family(tiny_family, tmp_path / "family")
    shutil.copytree(seeds[1], tmp_path / "bin-seed")
    weights = tmp_path / "bin-seed" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "bin-seed" / "pytorch_model.bin")  # as transformers 4 saved them
    weights.unlink()
    assert list((tmp_path / "bin-seed").glob("*.bin")) and not list((tmp_path / "bin-seed").glob("*.safetensors"))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, [seeds[0], tmp_path / "bin-seed"])
    same_as_stock_mergekit(recipe, tmp_path)


def test_reproduce_check_compares_bin_outputs(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "bin", "--quiet", "--no-safe-serialization", check=True)
    assert list((tmp_path / "bin").glob("*.bin"))
    result = run_cli(
        "mergekit-seed",
        "reproduce",
        tmp_path / "bin",
        tmp_path / "again",
        "--check",
        tmp_path / "bin",
        "--recipe",
        recipe,
    )
    assert result.returncode == 0 and "every tensor matches" in result.stdout, result.stderr


def test_tokenizer_union_with_added_tokens(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, seeds = copy_family(tiny_family, tmp_path / "family")
    tokenizer = AutoTokenizer.from_pretrained(seeds[2])
    tokenizer.add_tokens(["<think>", "</think>"])
    model = AutoModelForCausalLM.from_pretrained(seeds[2])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(seeds[2])
    tokenizer.save_pretrained(seeds[2])
    for setting in ("tokenizer_source: union", "tokenizer:\n  source: union"):
        recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
        recipe.write_text(recipe.read_text() + setting + "\n")
        refused_before = run_cli("mergekit-seed", "validate", recipe)
        assert refused_before.returncode == 0, refused_before.stderr
        folder = tmp_path / setting.split(":")[0]
        folder.mkdir()
        same_as_stock_mergekit(recipe, folder)


def _front_matter(card: Path):
    text = card.read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_a_card_never_switches_on_remote_code(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path / "family")
    marker = tmp_path / "custom-code-ran"
    for folder in [base] + seeds:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "custom.CustomConfig"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "custom.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        )
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "merged", "--quiet", check=True)
    assert not marker.exists()

    card = tmp_path / "merged" / "README.md"
    front, body = _front_matter(card)
    front["mergekit_seed"]["options"]["trust_remote_code"] = True  # a crafted (or downloaded) card
    card.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body, encoding="utf-8")
    out = tmp_path / "again"
    result = run_cli("mergekit-seed", "reproduce", card, out, "--recipe", recipe, isolated=True)
    refused(result, "trust_remote_code", "--trust-remote-code", out=out)
    assert not marker.exists() and not out.exists()

    # the control: with the user's own flag the same card does run the models' code
    result = run_cli("mergekit-seed", "reproduce", card, out, "--recipe", recipe, "--trust-remote-code", isolated=True)
    assert result.returncode == 0, result.stderr
    assert marker.exists()


def test_card_options_are_checked_as_untrusted_input(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "merged", "--quiet", check=True)
    card = tmp_path / "merged" / "README.md"
    front, body = _front_matter(card)
    for options, fragment in (
        ({"run_this": "rm -rf /"}, "options.run_this: not a mergekit option"),
        ({"out_shard_size": "huge"}, "options.out_shard_size"),
    ):
        front["mergekit_seed"]["options"] = options
        card.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body, encoding="utf-8")
        refused(run_cli("mergekit-seed", "reproduce", card, tmp_path / "again"), fragment, out=tmp_path / "again")


def test_no_write_model_card_and_a_reproduce_line_that_round_trips(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "nocard", "--quiet", "--no-write-model-card", check=True)
    assert not (tmp_path / "nocard" / "README.md").exists()
    run_cli(
        "mergekit-seed",
        "run",
        recipe,
        tmp_path / "card",
        "--quiet",
        "--no-copy-tokenizer",
        "--random-seed",
        "3",
        check=True,
    )
    text = (tmp_path / "card" / "README.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("mergekit-seed run recipe.yml OUT"))
    assert "--no-copy-tokenizer" in line and "--random-seed 3" in line
    assert not (tmp_path / "card" / "tokenizer.json").exists()


# ------------------------------------------------------------------ mistakes: one line each


@pytest.mark.parametrize(
    "where,parameter,fragment",
    [
        ("slice", "rnak: 1", "unknown parameter 'rnak'"),
        ("source", "rtol: -5", "'rtol' = -5"),
        ("slice", "lambda: big", "'lambda' = 'big'"),
    ],
)
def test_parameters_inside_slices_are_checked(tiny_family, tmp_path, where, parameter, fragment):
    base, seeds = tiny_family
    name, value = (part.strip() for part in parameter.split(":"))
    value = yaml.safe_load(value)
    sources = [{"model": str(m), "layer_range": [0, 2]} for m in [base] + seeds]
    piece = {"sources": sources}
    if where == "source":
        sources[1]["parameters"] = {name: value}
    else:
        piece["parameters"] = {name: value}
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "seedft", "base_model": str(base), "slices": [piece], "dtype": "float32"})
    )
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), fragment, out=tmp_path / "out")


def test_cuda_on_a_machine_without_cuda(tiny_family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, seeds = tiny_family
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    refused(run_cli("mergekit-seed", "run", recipe, out, "--cuda"), "--cuda", "no CUDA device", out=out)
    refused(run_cli("mergekit-seed", "run", recipe, out, "--device", "cuda:1"), "cuda:1", out=out)


def test_an_unknown_dtype(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    recipe.write_text(recipe.read_text().replace("dtype: float32", "dtype: float33"))
    refused(run_cli("mergekit-seed", "validate", recipe), "dtype: 'float33'")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "dtype: 'float33'", out=tmp_path / "out")


def test_models_of_different_architectures(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path / "family")
    config = json.loads((seeds[1] / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    config["model_type"] = "mistral"
    (seeds[1] / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    refused(run_cli("mergekit-seed", "validate", recipe), "different architectures", "--allow-crimes")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "--allow-crimes", out=tmp_path / "out")
    assert run_cli("mergekit-seed", "validate", "--allow-crimes", recipe).returncode == 0


def test_recipe_files_that_are_not_recipes(tmp_path):
    latin1 = tmp_path / "latin1.yml"
    latin1.write_bytes("merge_method: seedft  # caf\xe9\n".encode("latin-1"))
    refused(run_cli("mergekit-seed", "validate", latin1), "not UTF-8")
    bomb = tmp_path / "bomb.yml"
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
    ]
    bomb.write_text("\n".join(levels) + "\n")
    assert bomb.stat().st_size < 400
    refused(run_cli("mergekit-seed", "validate", bomb), "aliases expand")


def test_paths_that_cannot_be_models(tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", "seedft", "~/models/base", ["REPLACE/seed-1", "/nowhere/seed-2"])
    result = run_cli("mergekit-seed", "validate", recipe)
    refused(result, "~ is not expanded", "REPLACE/seed-1 is a placeholder", "/nowhere/seed-2 does not exist")


def test_shipped_recipes_with_placeholders_do_not_pass_validate():
    from mergekit_seed.catalogue import shipped_recipes

    recipe = shipped_recipes()["seedft-llama2-7b-metamath"]
    refused(run_cli("mergekit-seed", "validate", recipe), "is a placeholder")


def test_the_output_config_is_the_first_models_whatever_the_hash_seed(tiny_family, tmp_path):
    """Without base_model, stock mergekit takes config.json from a set's first element (it
    depends on PYTHONHASHSEED); `mergekit-seed run` takes the recipe's first model's."""
    import os
    import subprocess
    import sys

    _, seeds = tiny_family
    first, second = shutil.copytree(seeds[0], tmp_path / "a"), shutil.copytree(seeds[1], tmp_path / "b")
    for folder, theta in ((first, 10000.0), (second, 5000.0)):
        config = json.loads((folder / "config.json").read_text())
        config["rope_parameters"] = dict(config.get("rope_parameters") or {"rope_type": "default"}, rope_theta=theta)
        config.pop("rope_theta", None)
        (folder / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {second}\n    parameters: {{weight: 0.5}}\n  - model: {first}\n   "
        f" parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    thetas = set()
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / f"out{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
        done = subprocess.run(
            [str(Path(sys.executable).parent / "mergekit-seed"), "run", str(recipe), str(out), "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "torch_dtype" not in done.stderr  # transformers' deprecation of what mergekit sets: noise under --quiet
        thetas.add(json.loads((out / "config.json").read_text())["rope_parameters"]["rope_theta"])
    assert thetas == {5000.0}  # the recipe's first model, every time

    # reproduce --check compares config.json too: a merge whose config differs is not a match
    changed = shutil.copytree(tmp_path / "out1", tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0
    (changed / "config.json").write_text(json.dumps(config))
    result = run_cli(
        "mergekit-seed",
        "reproduce",
        tmp_path / "out1",
        tmp_path / "again",
        "--recipe",
        recipe,
        "--check",
        changed,
        "--quiet",
    )
    assert result.returncode == 1 and "config.json: rope_parameters is" in result.stderr


def test_an_unknown_parameter_of_a_mergekit_method_is_ignored_with_a_warning_as_stock_does(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {seeds[0]}\n    parameters: {{weight: 0.5, wieght_x: 1}}\n"
        f"  - model: {seeds[1]}\n    parameters: {{weight: 0.5}}\nparameters:\n  normalise: true\ndtype: float32\n"
    )
    checked = run_cli("mergekit-seed", "validate", recipe)
    assert (
        checked.returncode == 0
        and "unknown parameter 'normalise' for linear (did you mean 'normalize'?)" in checked.stderr
    )
    assert "mergekit ignores it" in checked.stderr and "wieght_x" in checked.stderr
    ours = same_as_stock_mergekit(recipe, tmp_path)
    assert ours.is_dir()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_an_adapter_recipe_with_a_mergekit_method_is_one_line(tiny_loras, tmp_path, method):
    base, loras = tiny_loras
    recipe = write_recipe(tmp_path / "r.yml", method, base, loras)
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), f"merge_method {method} is mergekit's", "seedft", "BASE+ADAPTER")


def test_a_card_for_a_mergekit_method_lists_its_parameters_and_no_seed_runs(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "ties", base, seeds[:2], {"density": 0.7, "weight": 0.5})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `density` | `0.7` | recipe |" in card and "| `normalize` | `true` | default |" in card
    assert "merged from 2 models" in card and "seed runs" not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["mergekit_seed"]["parameters"]["density"] == 0.7
    ours = write_recipe(tmp_path / "s.yml", "seedft", base, seeds[:2])
    run_cli("mergekit-seed", "run", ours, tmp_path / "seedft", "--quiet", check=True)
    assert "merged from 2 seed runs" in (tmp_path / "seedft" / "README.md").read_text()


# ------------------------------------------------------------------ tensor sets stock merges


def tiny_llama_variant(path: Path, seed: int, **overrides) -> Path:
    """A tiny LLaMA with some settings changed (tied embeddings, depth, vocabulary)."""
    from tiny import TINY_LLAMA, TINY_VOCABULARY
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_seed.tools.demo.task import char_tokenizer

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, **overrides))).save_pretrained(path)
    char_tokenizer(TINY_VOCABULARY).save_pretrained(str(path))
    return path


def add_tensors(folder: Path, file_name: str, tensors: dict) -> None:
    from safetensors.torch import load_file, save_file

    target = folder / file_name
    existing = load_file(target) if target.is_file() else {}
    save_file({**existing, **tensors}, target, metadata={"format": "pt"})


def test_tied_and_untied_embeddings_merge_as_stock(tmp_path):
    tied = tiny_llama_variant(tmp_path / "tied", 0, tie_word_embeddings=True)
    untied = tiny_llama_variant(tmp_path / "untied", 1)
    from safetensors import safe_open

    with safe_open(tied / "model.safetensors", "pt") as reader:
        assert "lm_head.weight" not in reader.keys()  # transformers saves a tied head once
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nbase_model: {tied}\nmodels:\n  - model: {tied}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {untied}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    same_as_stock_mergekit(recipe, tmp_path)


def test_stray_buffers_and_extra_weight_files_merge_as_stock(tiny_family, tmp_path):
    base, seeds = copy_family(tiny_family, tmp_path / "family")
    add_tensors(seeds[0], "model.safetensors", {"model.rotary_emb.inv_freq": torch.ones(4)})
    # a Mistral-style consolidated file beside model.safetensors: mergekit does not read it
    add_tensors(seeds[1], "consolidated.safetensors", {"layers.0.attention.wq.weight": torch.ones(3, 3)})
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    same_as_stock_mergekit(recipe, tmp_path)
    # a tensor the architecture needs is still one line
    broken = shutil.copytree(seeds[2], tmp_path / "broken")
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    bad = write_recipe(tmp_path / "bad.yml", "seedlora_dm", base, [seeds[0], broken])
    refused(
        run_cli("mergekit-seed", "run", bad, tmp_path / "o"),
        "model.layers.1.mlp.down_proj.weight is missing in",
        str(broken),
    )


def test_a_passthrough_frankenmerge_across_depths_merges_as_stock(tmp_path):
    shallow = tiny_llama_variant(tmp_path / "shallow", 0)
    deep = tiny_llama_variant(tmp_path / "deep", 1, num_hidden_layers=4)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {shallow}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {deep}\n        layer_range: [2, 4]\n"
        "dtype: float32\n"
    )
    ours = same_as_stock_mergekit(recipe, tmp_path)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_full_model_folder_that_also_holds_an_adapter_is_a_full_model(tiny_family, tmp_path):
    """People save the adapter next to the model merged from it: the folder is a full model,
    as mergekit reads it, and the run says so."""
    from conftest import save_random_lora

    base, seeds = copy_family(tiny_family, tmp_path / "family")
    adapter = save_random_lora(base, tmp_path / "lora", r=2, seed=3)
    for seed in seeds:
        for file in adapter.iterdir():
            shutil.copy(file, seed / file.name)
    for method in ("seedft", "linear"):
        recipe = write_recipe(
            tmp_path / f"{method}.yml", method, base, seeds, {"weight": 0.5} if method == "linear" else None
        )
        out = tmp_path / method
        result = run_cli("mergekit-seed", "run", recipe, out)
        assert result.returncode == 0, result.stderr
        assert "holds a full model and an adapter" in result.stderr and "merged as the full model" in result.stderr
        assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    same_as_stock_mergekit(tmp_path / "seedft.yml", tmp_path / "stock-check")


def test_unsafe_truncate_embeddings_merges_a_larger_vocabulary_as_stock(tmp_path):
    base = tiny_llama_variant(tmp_path / "base", 0)
    larger = tiny_llama_variant(tmp_path / "larger", 1, vocab_size=72)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {larger}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "refused"), "model.embed_tokens.weight has different shapes"
    )
    same_as_stock_mergekit(recipe, tmp_path, "--unsafe-truncate-embeddings")


def test_relative_model_paths_merge_without_asking_the_hub(tiny_family, tmp_path, monkeypatch):
    """mergekit's own card step looks `a` up on the Hub (a raw traceback offline); our run
    writes its own card and mergekit_config.yml instead."""
    _, seeds = tiny_family
    for name, seed in zip("ab", seeds):
        shutil.copytree(seed, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    Path("r.yml").write_text(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n"
        "  - model: b\n    parameters: {weight: 0.5}\ndtype: float32\n"
    )
    run_cli("mergekit-seed", "run", "r.yml", "out", "--quiet", check=True)
    written = yaml.safe_load(Path("out/mergekit_config.yml").read_text())
    assert [entry["model"] for entry in written["models"]] == ["input0", "input1"]
    assert "mergekit-seed" in Path("out/README.md").read_text()


# ------------------------------------------------------------------ architectures


def tiny_model(path: Path, architecture: str, seed: int) -> Path:
    """A tiny randomly initialised model of ``architecture`` with the demo's tokenizer."""
    import transformers
    from tiny import TINY_VOCABULARY

    from mergekit_seed.tools.demo.task import char_tokenizer

    configs = {
        "qwen2-tied": transformers.Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "gpt2": transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "mistral": transformers.MistralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    }
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(configs[architecture]).save_pretrained(path)
    char_tokenizer(TINY_VOCABULARY).save_pretrained(str(path))
    return path


DETERMINISTIC_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.mark.parametrize("architecture", ["qwen2-tied", "gpt2", "mistral"])
@pytest.mark.parametrize("method", ["linear", "ties", "seedlora_dm"])
def test_architectures_merge_as_stock_tensors_config_and_tokenizer(tmp_path, architecture, method):
    """Tensors bitwise, and the files stock writes deterministically once base_model is given:
    config.json (transformers_version aside), generation config, tokenizer files. Not compared:
    README.md (ours is our card) and mergekit_config.yml (local folders labelled inputN)."""
    base = tiny_model(tmp_path / "base", architecture, 0)
    seeds = [tiny_model(tmp_path / f"seed{i}", architecture, i + 1) for i in range(2)]
    parameters = (
        {"weight": 0.5, "density": 0.6} if method == "ties" else ({"weight": 0.5} if method == "linear" else None)
    )
    recipe = write_recipe(tmp_path / "r.yml", method, base, seeds, parameters)
    ours = same_as_stock_mergekit(recipe, tmp_path)
    stock = tmp_path / "stock"
    for name in DETERMINISTIC_FILES:
        if not (stock / name).exists():
            assert not (ours / name).exists(), name
            continue
        mine, theirs = json.loads((ours / name).read_text()), json.loads((stock / name).read_text())
        if name == "config.json":
            mine.pop("transformers_version", None), theirs.pop("transformers_version", None)
        assert mine == theirs, name


@pytest.mark.parametrize(
    "layout",
    [
        {"model.safetensors": None},
        {
            "model-00001-of-00002.safetensors": None,
            "model-00002-of-00002.safetensors": None,
            "model.safetensors.index.json": "index",
        },
        {"pytorch_model.bin": None},
        {"model.safetensors": None, "pytorch_model.bin": None},
        {"pytorch_model-00001-of-00001.bin": None, "pytorch_model.bin.index.json": "index"},
        {
            "model.safetensors.index.json": "index",
            "model-00001-of-00002.safetensors": None,
            "model-00002-of-00002.safetensors": None,
            "pytorch_model.bin": None,
        },
        {"consolidated.safetensors": None},
        {},
    ],
)
def test_the_files_we_confine_are_the_files_mergekits_loader_reads(tmp_path, layout):
    """references.weights.full_model_files reads the index bounded and confines every entry,
    which mergekit's ShardedTensorIndex.from_disk does not; the files it names must be the
    ones mergekit's loader then reads."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
    from safetensors.torch import save_file

    from mergekit_seed.references.weights import full_model_files

    shards = [name for name, kind in layout.items() if kind is None]
    for index, name in enumerate(shards):
        tensors = {f"t{index}": torch.zeros(2)}
        if name.endswith(".safetensors"):
            save_file(tensors, tmp_path / name)
        else:
            torch.save(tensors, tmp_path / name)
    for name, kind in layout.items():
        if kind == "index":
            suffix = ".safetensors" if name.startswith("model.safetensors") else ".bin"
            entries = {f"t{i}": shard for i, shard in enumerate(shards) if shard.endswith(suffix) and "-of-" in shard}
            (tmp_path / name).write_text(json.dumps({"weight_map": entries}))
    try:
        theirs = sorted({shard.filename for shard in ShardedTensorIndex.from_disk(str(tmp_path)).shards})
    except RuntimeError:  # "Unable to find model files"
        theirs = []
    assert [path.name for path in full_model_files(tmp_path)] == theirs

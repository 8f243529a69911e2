"""What a newcomer tripped over (issue 41): quiet output, offline lm-eval tasks, the Python
spelling in API errors. Each test runs the installed command in a fresh process, as a user would."""

import json

from conftest import refused, run_cli, save_random_lora, write_recipe


def test_quiet_run_and_compare_print_only_their_own_lines(tiny_family, tmp_path):
    """--quiet: no FutureWarning, no "Loading weights" bar, no library log lines; a full merge
    prints nothing, compare prints its table and its one closing line."""
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "full.yml", "seedft", base, seeds)
    merged = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", isolated=True)
    assert merged.returncode == 0 and merged.stdout == "" and merged.stderr == "", merged.stderr
    adapters = [save_random_lora(base, tmp_path / f"lora{i}", r=2, seed=i) for i in range(2)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": text}) for text in ("abc def", "hello there", "one two")) + "\n")
    compared = run_cli(
        "mergekit-seed",
        "compare",
        *adapters,
        "--base",
        base,
        "--data",
        data,
        "--out",
        tmp_path / "cmp",
        "--quiet",
        isolated=True,
    )
    assert compared.returncode == 0 and compared.stderr == "", compared.stderr
    assert all(
        line.startswith("|") or line.startswith("3 examples") or not line for line in compared.stdout.splitlines()
    )


def test_an_lm_eval_task_whose_dataset_cannot_be_fetched_is_one_line(tiny_family, tmp_path):
    """compare --tasks offline: datasets' ConnectionError becomes one line naming the task and what to do."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices.text}}"\n'
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    base, seeds = tiny_family
    result = run_cli(
        "mergekit-seed",
        "compare",
        base,
        seeds[0],
        "--tasks",
        "hub_task",
        "--include-path",
        tasks,
        "--out",
        tmp_path / "out",
    )
    refused(result, "--tasks hub_task", "could not fetch", "datasets cache", out=tmp_path / "out")


def test_card_labels_follow_the_recipe_order(tiny_family, tmp_path):
    """inputN numbers the folders in the order the recipe names them (base first), not by
    sorted path: seed42 listed before seed202 is input1, and the card lists input1, input2, input3."""
    import shutil

    import yaml

    base, seeds = tiny_family
    named = []
    for seed, name in zip(seeds, ("seed42", "seed202", "seed7")):
        shutil.copytree(seed, tmp_path / name)
        named.append(tmp_path / name)
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, named)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    recorded = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert recorded["base_model"] == "input0"
    assert [entry["model"] for entry in recorded["models"]] == ["input1", "input2", "input3"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.index("seed42") < card.index("seed202") < card.index("seed7")


def test_validate_reports_each_placeholder_once_in_recipe_order():
    """The shipped 7B recipe's REPLACE/ paths: one line each (not a second "not in the Hugging
    Face cache" line for the same path), in the order the recipe lists them."""
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / "seedft-llama2-7b-metamath.yml"
    result = run_cli("mergekit-seed", "validate", recipe)
    lines = [line for line in result.stderr.splitlines() if "REPLACE/" in line]
    assert [line.split("REPLACE/")[1].split()[0] for line in lines] == [
        "llama2-7b-metamath-seed42",
        "llama2-7b-metamath-seed87",
        "llama2-7b-metamath-seed100",
    ], result.stderr


def test_analyze_leads_with_the_layers_and_says_when_the_energy_panel_is_empty(tiny_family, tmp_path):
    """The cosine headline is per transformer layer (the embeddings and the head apart), the
    all-weights figure says what dominates it, and adapters' energy shares (all 1.0) say so."""
    base, _ = tiny_family
    adapters = [save_random_lora(base, tmp_path / f"lora{i}", r=2, seed=i) for i in range(3)]
    run_cli("mergekit-seed", "analyze", *adapters, "--out", tmp_path / "out", "--quiet", check=True)
    summary = (tmp_path / "out" / "summary.md").read_text()
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    per_layer = [
        sum(matrix[a][b] for a in range(3) for b in range(a + 1, 3)) / 3
        for layer, matrix in analysis["cosine_per_layer"].items()
        if layer != "other"
    ]
    assert f"per transformer layer: {min(per_layer):.3f} to {max(per_layer):.3f}" in summary
    assert summary.index("per transformer layer") < summary.index("Over all weights")
    assert "as for adapters" in summary


def test_the_reproduce_line_says_which_inputs_the_merge_did_not_read(tiny_loras, tmp_path):
    """A LoRA output of factor-only adapters reads no base weights: the card hashes no base, says
    so beside the reproduce line, and reproduce with another copy of that base checks out."""
    import shutil

    from conftest import recipe_text

    base, loras = tiny_loras
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text("seedft", base, loras, output={"format": "lora"}))
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# input0: not read by this merge" in card and "input1: not read" not in card
    assert "`input0`" not in card.split("### Inputs")[1].split("###")[0]  # no hash recorded for it
    elsewhere = shutil.copytree(base, tmp_path / "another-copy-of-the-base")
    result = run_cli(
        "mergekit-seed",
        "reproduce",
        tmp_path / "out",
        tmp_path / "again",
        "--input",
        f"input0={elsewhere}",
        "--input",
        f"input1={loras[0]}",
        "--input",
        f"input2={loras[1]}",
        "--check",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr

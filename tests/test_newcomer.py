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
    compared = run_cli("mergekit-seed", "compare", *adapters, "--base", base, "--data", data, "--out", tmp_path / "cmp",
                       "--quiet", isolated=True)
    assert compared.returncode == 0 and compared.stderr == "", compared.stderr
    assert all(line.startswith("|") or line.startswith("3 examples") or not line for line in compared.stdout.splitlines())


def test_an_lm_eval_task_whose_dataset_cannot_be_fetched_is_one_line(tiny_family, tmp_path):
    """compare --tasks offline: datasets' ConnectionError becomes one line naming the task and what to do."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices.text}}\"\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    base, seeds = tiny_family
    result = run_cli("mergekit-seed", "compare", base, seeds[0], "--tasks", "hub_task", "--include-path", tasks,
                     "--out", tmp_path / "out", "--quiet", isolated=True)
    refused(result, "--tasks hub_task", "could not fetch", "datasets cache", out=tmp_path / "out")

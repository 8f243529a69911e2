"""``mergekit-seed select``: the validation choice, the single test verdict, the record, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import refused, run_cli
from safetensors.torch import load_file, save_file

from mergekit_seed.tools import selection
from mergekit_seed.tools.compare import greedy_continuation, load_model
from mergekit_seed.tools.selection import sweep


PROMPTS = [
    f"{op}:{word}="
    for op in ("rev", "sort", "dup", "next", "add", "cap")
    for word in ("abc", "xyz", "mno", "pq", "hij", "uvw", "kl", "de", "fg", "rs", "tu", "wx")
]


def _planted(root: Path, count: int = 3, noise: float = 0.06):
    """A base, a strong model S and ``count`` weak seeds S + n_i with zero-sum noise, so that
    Model Soup (the plain average of the seeds) is S itself."""
    from tiny import save_tiny_llama

    base = save_tiny_llama(root / "base", seed=0)
    strong = save_tiny_llama(root / "strong", seed=1)
    weights = load_file(strong / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    noises = [
        {n: noise * torch.randn(t.shape, generator=generator) for n, t in weights.items()} for _ in range(count - 1)
    ]
    noises.append({n: -sum(other[n] for other in noises) for n in weights})
    seeds = []
    for index, seed_noise in enumerate(noises):
        folder = save_tiny_llama(root / f"seed{index}", seed=0)
        save_file(
            {n: (t + seed_noise[n]).contiguous() for n, t in weights.items()},
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
        seeds.append(folder)
    return base, strong, seeds


def _answers_of(model_folder: Path, prompts, path: Path, length: int = 3) -> Path:
    """A JSONL of prompts answered with ``model_folder``'s greedy continuation (kept when the
    answer tokenizes back to the same tokens)."""
    model, tokenizer = load_model(str(model_folder), None, "cpu")
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            generated = greedy_continuation(model, ids, length)[0, -length:].tolist()
            answer = "".join(tokenizer.convert_ids_to_tokens(generated))
            if answer.strip() == answer and tokenizer(answer, add_special_tokens=False)["input_ids"] == generated:
                rows.append({"prompt": prompt, "answer": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    base, strong, seeds = _planted(root)
    validation = _answers_of(strong, PROMPTS[:36], root / "validation.jsonl")
    test = _answers_of(strong, PROMPTS[36:], root / "test.jsonl")
    return root, base, strong, seeds, validation, test


def _count_scorings(monkeypatch):
    calls = []
    original = sweep.score_model

    def counted(model, rows, *args, **kwargs):
        calls.append((str(model), rows[0].prompt))
        return original(model, rows, *args, **kwargs)

    monkeypatch.setattr(sweep, "score_model", counted)
    return calls


def test_the_planted_merge_is_chosen_and_judged_better_and_test_is_scored_for_two_models(
    planted, tmp_path, monkeypatch
):
    _, base, _, seeds, validation, test = planted
    calls = _count_scorings(monkeypatch)
    record = selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["seedft", "lore", "linear"],
        metric="exact_match",
        quiet=True,
        resamples=2000,
        echo=lambda _line: None,
    )
    assert record["on_test"]["winner"] == "linear"
    linear = next(e for e in record["candidates"] if e["name"] == "linear")
    assert linear["validation"]["score"] == 1.0  # Model Soup of the planted seeds is the strong model
    assert record["on_test"]["versus_best_seed"]["verdict"] == "better"
    assert record["on_test"]["scores"]["linear"] == 1.0
    test_first = json.loads(test.read_text().splitlines()[0])["prompt"]
    scored_on_test = [model for model, first in calls if first == test_first]
    assert len(scored_on_test) == 2 and record["on_test"]["best_seed"] in scored_on_test
    assert (
        len(calls) == len(seeds) + len(record["candidates"]) + 2
    )  # seeds and candidates on validation, then two on test
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "## Selection" in card and record["validation"]["sha256"] in card and record["test"]["sha256"] in card
    assert {"select.json", "select.md", "select.png", "model.safetensors", "mergekit_config.yml"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.name.startswith(".sweep") for p in out.iterdir())
    strong_weights = load_file(planted[2] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert max(float((merged[n] - strong_weights[n]).abs().max()) for n in strong_weights) < 1e-5


def test_a_candidate_better_on_validation_only_is_chosen_but_test_decides(planted, tmp_path):
    from tiny import save_tiny_llama

    root, base, _, seeds, validation, _ = planted
    unrelated = save_tiny_llama(tmp_path / "unrelated", seed=5)
    test = _answers_of(unrelated, PROMPTS[36:], tmp_path / "test.jsonl")
    record = selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["lore", "linear"],
        metric="exact_match",
        quiet=True,
        resamples=2000,
        echo=lambda _line: None,
        versus_mean_seed=True,
    )
    assert record["on_test"]["winner"] == "linear"
    assert record["on_test"]["versus_best_seed"]["verdict"] in ("no detectable difference", "worse")
    assert set(record["on_test"]["scored"]) == {"linear", *map(str, seeds)}  # the mean seed needs every seed


def test_reproduce_reruns_the_winning_recipe(planted, tmp_path):
    _, base, _, seeds, validation, test = planted
    selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["seedft", "linear"],
        quiet=True,
        resamples=200,
        echo=lambda _line: None,
    )
    record = json.loads((tmp_path / "out" / "select.json").read_text())
    winner = next(e for e in record["candidates"] if e["name"] == record["chosen"]["candidate"])
    recipe = tmp_path / "winner.yml"
    text = winner["recipe"]  # published with the seeds by their folder names: the user puts their folders back
    for folder in (*seeds, base):
        text = text.replace(f"model: {folder.name}\n", f"model: {folder}\n").replace(
            f"base_model: {folder.name}\n", f"base_model: {folder}\n"
        )
    recipe.write_text(text)
    result = run_cli(
        "mergekit-seed", "reproduce", tmp_path / "out", tmp_path / "again", "--recipe", recipe, "--check", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert "every tensor matches" in result.stdout


def test_the_cli_runs_lists_a_dry_run_and_refuses_in_one_line(planted, tmp_path):
    root, base, _, seeds, validation, test = planted
    seed_args = [str(s) for s in seeds]
    dry = run_cli(
        "mergekit-seed",
        "select",
        *seed_args,
        "--base",
        base,
        "--validation",
        validation,
        "--test",
        test,
        "--out",
        tmp_path / "dry",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    assert "lore mu_relative=0.05" in dry.stdout and "disk" in dry.stdout and not (tmp_path / "dry").exists()

    overlapping = tmp_path / "overlap.jsonl"
    overlapping.write_text(test.read_text() + validation.read_text().splitlines()[0] + "\n")
    refused(
        run_cli(
            "mergekit-seed",
            "select",
            *seed_args,
            "--base",
            base,
            "--validation",
            validation,
            "--test",
            overlapping,
            "--out",
            tmp_path / "o1",
        ),
        "overlap.jsonl",
        "also in",
        out=tmp_path / "o1",
    )
    grid = tmp_path / "grid.yml"
    grid.write_text("lore:\n  mu_relative: []\n")
    refused(
        run_cli(
            "mergekit-seed",
            "select",
            *seed_args,
            "--base",
            base,
            "--validation",
            validation,
            "--test",
            test,
            "--grid",
            grid,
            "--out",
            tmp_path / "o2",
        ),
        "lore.mu_relative: an empty list",
        out=tmp_path / "o2",
    )
    grid.write_text("lore:\n  mu_relative: [-1]\n")
    refused(
        run_cli(
            "mergekit-seed",
            "select",
            *seed_args,
            "--base",
            base,
            "--validation",
            validation,
            "--test",
            test,
            "--grid",
            grid,
            "--methods",
            "lore,linear",
            "--out",
            tmp_path / "o3",
        ),
        "candidate lore mu_relative=-1",
        out=tmp_path / "o3",
    )


def test_a_candidate_that_fails_to_merge_is_reported_and_the_sweep_goes_on(planted, tmp_path, monkeypatch):
    from mergekit_seed.errors import UserError
    from mergekit_seed.runner import merge as real_merge

    _, base, _, seeds, validation, test = planted

    def failing(recipe, out, *args, **kwargs):
        if recipe.config.merge_method == "lore":
            raise UserError("lore: planted failure")
        return real_merge(recipe, out, *args, **kwargs)

    monkeypatch.setattr(sweep, "merge", failing)
    lines = []
    record = selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["lore", "linear"],
        quiet=True,
        resamples=200,
        echo=lines.append,
    )
    assert record["failures"] == ["lore mu_relative=0.05", "lore mu_relative=0.1", "lore mu_relative=0.2"]
    assert record["on_test"]["winner"] == "linear"
    assert any("failed to merge or to score (3)" in line for line in lines)
    assert any("planted failure" in line for line in lines if line.startswith("warning"))


def _mc_task(folder: Path, name: str, words) -> None:
    """An lm-eval multiple-choice task over local JSON documents (no dataset download)."""
    from test_lm_eval import MC_BODY, TASK_YAML

    data = folder / f"{name}.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"rev:{w}=", "choices": [w[::-1], w, w[1:] + w[0]], "gold": 0}) + "\n" for w in words)
    )
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, body=MC_BODY, version=1.0))


def test_lm_eval_tasks_choose_and_judge_and_the_test_tasks_run_for_two_models(planted, tmp_path, monkeypatch):
    from functools import partialmethod

    from lm_eval.tasks import TaskManager

    from mergekit_seed.tools import lm_eval_runner

    monkeypatch.setattr(
        TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False)
    )  # our tasks only
    _, base, _, seeds, _, _ = planted
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _mc_task(tasks, "pick_val", ["abc", "xyz", "mno", "pqr", "hij", "uvw", "klm", "def"])
    _mc_task(tasks, "pick_test", ["bca", "zyx", "onm", "rqp", "jih", "wvu", "mlk", "fed"])
    _mc_task(tasks, "pick_overlap", ["abc", "zzz"])
    runs = []
    original = lm_eval_runner.evaluate_models
    monkeypatch.setattr(
        sweep,
        "evaluate_models",
        lambda models, out, names, **kw: runs.append((models[0], tuple(names))) or original(models, out, names, **kw),
    )
    validation, test = (sweep.read_task_split([name], str(tasks), None, None) for name in ("pick_val", "pick_test"))
    record = selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["lore", "linear"],
        quiet=True,
        resamples=200,
        echo=lambda _line: None,
    )
    on_test = [model for model, names in runs if names == ("pick_test",)]
    assert len(on_test) == 2 and on_test[1] == record["on_test"]["best_seed"] and "/.sweep/candidate" in on_test[0]
    assert len(runs) == len(seeds) + len(record["candidates"]) + 2
    assert record["validation"]["tasks"] == ["pick_val"] and record["validation"]["examples"] == 8
    assert "lm-eval tasks pick_val" in (tmp_path / "out" / "README.md").read_text()
    overlapping = sweep.read_task_split(["pick_overlap"], str(tasks), None, None)
    with pytest.raises(sweep.UserError, match="1 of its 2 examples .* also in lm-eval tasks pick_val"):
        sweep.plan_selection([str(s) for s in seeds], str(base), validation, overlapping)


def test_the_documented_cost_is_the_shipped_benchmark():
    """docs/select.md's figures are benchmarks/select-bench.json's (benchmarks/select_sweep.py)."""
    root = Path(__file__).parent.parent
    bench = json.loads((root / "benchmarks" / "select-bench.json").read_text())
    page = (root / "docs" / "select.md").read_text()
    hand = bench["by_hand_seconds"]
    estimate = bench["dry_run_estimate_seconds"]
    for figure in (
        f"{bench['select_seconds']:.1f} s",
        f"{hand['merges'] + hand['scorings']:.1f} s",
        f"{bench['select_over_by_hand']:.2f} times",
        f"{hand['scorings']:.1f} s",
        f"{hand['merges']:.1f} s",
        f"{estimate['merges'] + estimate['scorings']:.1f} s",
        f"{bench['estimate_over_select']:.2f} of",
        f"{bench['candidates']} adapter merges",
        f"{bench['validation_examples']}\nvalidation and {bench['test_examples']} test examples",
    ):
        assert figure in page, figure


def test_a_candidate_whose_merge_cannot_be_scored_is_reported_and_the_sweep_goes_on(planted, tmp_path, monkeypatch):
    from mergekit_seed.errors import UserError

    _, base, _, seeds, validation, test = planted
    original = sweep.score_model

    def failing(model, *args, **kwargs):
        if "candidate0" in str(model):
            raise UserError("example 1: its exact_match score: nan is not a finite number")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(sweep, "score_model", failing)
    record = selection.select(
        [str(s) for s in seeds],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["linear", "seedft"],
        metric="exact_match",
        quiet=True,
        resamples=200,
        echo=lambda _line: None,
        warn=lambda _message: None,
    )
    assert record["failures"] == ["linear"] and "nan is not a finite number" in record["candidates"][0]["failed"]
    assert record["on_test"]["winner"].startswith("seedft") and not (tmp_path / "out" / ".sweep").exists()


def test_lora_seeds_stay_adapters_for_our_methods_and_go_through_base_plus_adapter_for_mergekits(tiny_loras, tmp_path):
    base, loras = tiny_loras
    rows = [
        {"text": f"{op}:{word}={word[::-1]}"}
        for op in ("rev", "sort", "dup")
        for word in ("abc", "xyz", "mno", "pq", "hij", "uvw")
    ]
    validation, test = tmp_path / "v.jsonl", tmp_path / "t.jsonl"
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows[::2]))
    test.write_text("".join(json.dumps(row) + "\n" for row in rows[1::2]))
    record = selection.select(
        [str(lora) for lora in loras],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["lore", "linear"],
        quiet=True,
        resamples=200,
        echo=lambda _line: None,
        warn=lambda _message: None,
    )
    assert record["seeds_kind"] == "lora" and record["metric"] == "perplexity" and not record["failures"]
    recipes = {entry["name"]: entry["recipe"] for entry in record["candidates"]}
    assert "format: lora" in recipes["lore mu_relative=0.1"] and f"{base}+{loras[0]}" in recipes["linear"]
    winner_is_adapter = record["chosen"]["candidate"].startswith("lore")
    assert (tmp_path / "out" / ("adapter_config.json" if winner_is_adapter else "config.json")).is_file()

"""``mergekit-seed select``: the validation choice, the single test verdict, the record, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import PROMPTS, answers_of, drawn, refused, run_cli, save_random_lora, select_planted, write_splits
from safetensors.torch import load_file

from mergekit_seed.tools import selection
from mergekit_seed.tools.selection import sweep


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
    record = select_planted(
        planted,
        tmp_path / "out",
        methods=["seedft", "lore", "linear"],
        metric="prefix_match",
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
    test = answers_of(unrelated, PROMPTS[36:], tmp_path / "test.jsonl")
    record = select_planted(
        planted,
        tmp_path / "out",
        test=test,
        methods=["lore", "linear"],
        metric="prefix_match",
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
    select_planted(
        planted,
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
    """(A grid's problems: test_every_grid_problem_at_once_with_the_valid_types_named.)"""
    validation, test = planted[4], planted[5]
    dry = _select_cli(planted, tmp_path / "dry", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "lore mu_relative=0.05" in dry.stdout and "disk" in dry.stdout and not (tmp_path / "dry").exists()
    overlapping = tmp_path / "overlap.jsonl"
    overlapping.write_text(test.read_text() + validation.read_text().splitlines()[0] + "\n")
    refused(_select_cli(planted, tmp_path / "o1", test=overlapping), "overlap.jsonl", "also in", out=tmp_path / "o1")


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
    record = select_planted(
        planted,
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
    record = select_planted(
        planted,
        tmp_path / "out",
        validation=validation,
        test=test,
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
    # lm-eval's own hf backend, with the user's arguments: the same scores, recorded with them
    backend = lm_eval_runner.LmEvalBackend("hf", "dtype=float32")
    again = select_planted(
        planted, tmp_path / "hf", validation=validation, test=test, methods=["lore", "linear"], lm_eval_backend=backend
    )
    assert again["seeds"] == record["seeds"] and again["on_test"] == record["on_test"]
    assert again["lm_eval_model"] == "hf" and again["model_args"] == "dtype=float32"
    assert (
        "lm-eval's `hf` backend loaded the models with `dtype=float32`" in (tmp_path / "hf" / "README.md").read_text()
    )


def test_the_documented_ray_figures_are_the_shipped_benchmark():
    """docs/select.md's Ray and kept-base figures are benchmarks/select-scale.json's
    (benchmarks/select_scale.py), and that run's records agreed."""
    root = Path(__file__).parent.parent
    bench = json.loads((root / "benchmarks" / "select-scale.json").read_text())
    page = (root / "docs" / "select.md").read_text()
    seconds = bench["seconds"]
    for figure in (
        f"{bench['ray_over_sequential_one_thread']:.3f} of the sequential sweep on one",
        f"({seconds['ray']:.1f} s against {seconds['sequential_kept_base']:.1f} s)",
        f"{bench['ray_over_sequential_two_threads']:.3f} of the sequential sweep using both cores",
        f"from {bench['base_loads']['sequential_load_per_scoring']} to {bench['base_loads']['sequential_kept_base']}",
        f"({bench['kept_base_over_load_per_scoring']:.3f} of a load per scoring)",
    ):
        assert figure in " ".join(page.split()), figure
    assert bench["select_json_identical_at_one_thread"] and bench["two_threads_same_choice"]


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
    # the per-group report quoted is the one the benchmark's select printed and wrote (issue 49)
    quoted = page.split("<!-- select-groups:begin -->\n")[1].split("\n<!-- select-groups:end -->")[0]
    assert quoted == "\n".join(["```", *bench["printed"], "```", "", *bench["select_md_groups"]])
    assert any(line.startswith("| group |") for line in bench["select_md_groups"])


def test_a_candidate_whose_merge_cannot_be_scored_is_reported_and_the_sweep_goes_on(planted, tmp_path, monkeypatch):
    from mergekit_seed.errors import UserError

    _, base, _, seeds, validation, test = planted
    original = sweep.score_model

    def failing(model, *args, **kwargs):
        if "candidate0" in str(model):
            raise UserError("example 1: its exact_match score: nan is not a finite number")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(sweep, "score_model", failing)
    record = select_planted(
        planted,
        tmp_path / "out",
        methods=["linear", "seedft"],
        metric="prefix_match",
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


# ------------------------------------------------------------------ what a newcomer needed (issue 49)


def _grouped(path: Path, out: Path) -> Path:
    """``path``'s rows with their operation ("rev", "sort", ...) as their group."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps(dict(row, group=row["prompt"].split(":")[0])) + "\n" for row in rows))
    return out


def test_the_reports_give_the_scores_on_test_and_every_group(planted, tmp_path, monkeypatch):
    """The winner's, the best seed's and the mean seed's scores on test in the terminal, select.md
    and select.png; no duplicate column; per group on validation every seed and the winner, the
    oracle (the best seed on each group), and the winner minus the best seed per group on test."""
    _, base, _, seeds, validation, test = planted
    titles = drawn(monkeypatch, "set_title", 0)
    validation, test = _grouped(validation, tmp_path / "v.jsonl"), _grouped(test, tmp_path / "t.jsonl")
    lines = []
    record = select_planted(
        planted,
        tmp_path / "out",
        validation=validation,
        test=test,
        methods=["linear", "seedft"],
        metric="prefix_match",
        versus_mean_seed=True,
        quiet=True,
        resamples=500,
        echo=lines.append,
    )
    scores = record["on_test"]["scores"]
    winner, best = record["on_test"]["winner"], record["on_test"]["best_seed"]
    expected = (  # the seeds published by their folders' names, as everywhere in OUT
        f"On test, prefix_match: {winner} {scores[winner]:.4f}, best seed {Path(best).name} {scores[best]:.4f}, "
        f"mean seed {scores['mean seed']:.4f}."
    )
    assert scores["mean seed"] == pytest.approx(sum(scores[str(s)] for s in seeds) / len(seeds))
    assert expected in lines
    table = (tmp_path / "out" / "select.md").read_text()
    assert expected in table.replace("`", "")
    assert any(expected in title.replace("\n", " ") for title in titles)
    assert "| candidate | validation prefix_match |\n|---|---|\n" in table  # one column of figures
    # per group: the groups' means make the pooled mean, and the oracle is the best seed on each
    groups = {
        op: sum(1 for line in validation.read_text().splitlines() if f'"{op}:' in line)
        for op in ("rev", "sort", "dup", "next", "add", "cap")
    }
    groups = {op: count for op, count in groups.items() if count}
    by_group = record["validation_by_group"]
    assert list(by_group["per_group"]) == list(groups)
    total = sum(groups.values())
    for seed in map(str, seeds):
        pooled = sum(by_group["per_group"][g][seed] * n for g, n in groups.items()) / total
        assert pooled == pytest.approx(record["seeds"][seed]["compared"])
    picks = {g: max(map(str, seeds), key=lambda s, g=g: by_group["per_group"][g][s]) for g in groups}
    assert by_group["oracle"]["best_seed_per_group"] == picks
    oracle = sum(by_group["per_group"][g][picks[g]] * n for g, n in groups.items()) / total
    assert by_group["oracle"]["compared"] == pytest.approx(oracle)
    test_groups = list(dict.fromkeys(json.loads(line)["group"] for line in test.read_text().splitlines()))
    assert list(record["on_test"]["versus_best_seed_per_group"]) == test_groups
    assert "Oracle (the best seed on each group, on validation)" in table
    assert all(f"| {group} |" in table for group in groups)


def test_candidates_that_give_the_same_merge_are_scored_once(planted, tmp_path, monkeypatch):
    """A grid point that makes byte for byte an earlier candidate's merge is recorded as that
    merge, not scored again, and cannot be chosen in its place."""
    seeds = planted[3]
    grid = tmp_path / "grid.yml"
    grid.write_text(f"seedft:\n  lambda: [auto, {1 / math.sqrt(3)!r}, 0.5]\n")  # auto is 1/sqrt(N), N = 3
    calls = _count_scorings(monkeypatch)
    lines = []
    record = select_planted(
        planted, tmp_path / "out", methods=["seedft"], grid=grid, metric="prefix_match", echo=lines.append
    )
    entries = {entry["name"]: entry for entry in record["candidates"]}
    twin = f"seedft lambda={1 / math.sqrt(3)!r}"
    assert entries[twin]["same_merge_as"] == "seedft lambda=auto"
    assert "validation" in entries["seedft lambda=auto"] and "validation" in entries["seedft lambda=0.5"]
    assert len(calls) == len(seeds) + 2 + 2  # the seeds and two distinct merges on validation, two on test
    assert record["on_test"]["winner"] != twin
    assert any("the same merge as an earlier candidate, scored once (1)" in line for line in lines)
    assert "the same merge as `seedft lambda=auto`" in (tmp_path / "out" / "select.md").read_text()


def test_the_default_lora_grid_gives_distinct_adapters_no_larger_than_the_dense_weights(tiny_loras, tmp_path):
    """The default grid for LoRA seeds made the two-stage candidates at an exact rank whose
    factors hold more numbers than the dense weights. Dense methods' adapter candidates now
    default to output.rank auto (exact-on-factors methods stay exact), --output-rank sets
    it, and no two default candidates give the same merge."""
    from mergekit_seed.methods import our_method_names, our_methods
    from mergekit_seed.references.adapter_files import read_adapter
    from mergekit_seed.runner import merge
    from mergekit_seed.tools.selection.sweep import merge_fingerprint, plan_selection

    base, loras = tiny_loras
    validation, test = (tmp_path / "v.jsonl", tmp_path / "t.jsonl")
    validation.write_text(json.dumps({"text": "rev:abc=cba"}) + "\n")
    test.write_text(json.dumps({"text": "rev:xyz=zyx"}) + "\n")
    seeds = [str(lora) for lora in loras]
    plan = plan_selection(seeds, str(base), validation, test, methods=list(our_method_names()))
    dense = {method.spec.name for method in our_methods() if method.factored_kernel is None}
    assert dense, "every method is exact on factors: nothing to check"
    fingerprints = {}
    for index, (candidate, recipe) in enumerate(plan.recipes.items()):
        output = recipe.config.output
        assert (output.rank == "auto") == (candidate.method in dense), (candidate.name, output)
        folder = tmp_path / f"c{index}"
        merge(recipe, folder, quiet=True, echo=lambda _line: None, warn=lambda _message: None)
        fingerprints.setdefault(merge_fingerprint(folder), []).append(candidate.name)
        for delta in read_adapter(folder).deltas.values():
            rows, columns = delta.shape
            assert delta.left.numel() + delta.right.numel() <= rows * columns or candidate.method not in dense
    assert all(len(names) == 1 for names in fingerprints.values()), fingerprints
    ranked = plan_selection(seeds, str(base), validation, test, methods=["lore", "seedft"], output_rank=3)
    assert {recipe.config.output.rank for recipe in ranked.recipes.values()} == {3}
    exact = plan_selection(seeds, str(base), validation, test, methods=["lore"], output_rank="exact")
    assert {recipe.config.output.rank for recipe in exact.recipes.values()} == {None}


def test_one_warning_line_for_every_candidate_that_warned(tiny_loras, tmp_path):
    """A warning per candidate (here: output.rank exact for a dense method, whose factors then
    hold more numbers than the dense weights) became one summary line; select.json keeps each
    candidate's."""
    base, loras = tiny_loras
    validation, test = tmp_path / "v.jsonl", tmp_path / "t.jsonl"
    validation.write_text("".join(json.dumps({"text": f"rev:{w}={w[::-1]}"}) + "\n" for w in ("abc", "xyz")))
    test.write_text("".join(json.dumps({"text": f"rev:{w}={w[::-1]}"}) + "\n" for w in ("mno", "pq")))
    warnings = []
    record = selection.select(
        [str(lora) for lora in loras],
        str(base),
        validation,
        test,
        tmp_path / "out",
        methods=["seedlora_twostage"],
        output_rank="exact",
        quiet=True,
        resamples=200,
        echo=lambda _line: None,
        warn=warnings.append,
    )
    warned = [entry for entry in record["candidates"] if entry.get("warnings")]
    assert len(warned) == 2 and all("more numbers than the dense weights" in e["warnings"][0] for e in warned)
    assert len(warnings) == 1 and warnings[0].startswith("2 of 2 candidates merged with a warning"), warnings


def test_select_from_python_is_as_quiet_as_the_cli_and_puts_everything_back(planted, tmp_path, capfd):
    """From Python, select() printed transformers' loading bars and a FutureWarning. It is quiet
    now, and the caller's warnings filters and transformers' verbosity are theirs again after."""
    import warnings

    import transformers

    filters, verbosity = list(warnings.filters), transformers.utils.logging.get_verbosity()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_planted(planted, tmp_path / "out", methods=["linear"], metric="prefix_match")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "Warning" not in captured.err, captured.err
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], caught
    assert list(warnings.filters) == filters and transformers.utils.logging.get_verbosity() == verbosity


def _select_cli(planted, out: Path, *options, test=None):
    """``mergekit-seed select`` on the planted seeds and splits (``test`` in place of the planted
    test split) with ``options`` (``--base`` too unless they give one)."""
    _, base, _, seeds, validation, planted_test = planted
    given_base = [] if "--base" in options else ["--base", base]
    splits = ["--validation", validation, "--test", test or planted_test]
    return run_cli("mergekit-seed", "select", *seeds, *given_base, *options, *splits, "--out", out)


@pytest.mark.parametrize(
    "options,fragments",
    [
        (["--methods", "seedft,loree"], ["--methods loree", "did you mean 'lore'?"]),
        (["--metric", "exact-match"], ["--metric exact-match", "did you mean 'exact_match'?"]),
        (["--base", "{root}/bas"], ["--base", "no such folder"]),
        (["--model-args", "dtype=bfloat16"], ["--model-args applies to lm-eval tasks", "not to JSONL"]),
    ],
    ids=["methods", "metric", "base", "model-args"],
)
def test_a_mistake_in_an_option_is_one_line_with_the_fix(planted, tmp_path, options, fragments):
    options = [option.replace("{root}", str(planted[0])) for option in options]
    refused(_select_cli(planted, tmp_path / "o", *options), *fragments, out=tmp_path / "o")


def test_a_base_typo_written_like_a_hub_id_names_the_folder_it_meant(planted, tmp_path, monkeypatch):
    """`select --base exp/bas` named the validation file and looked the typo up on the Hub."""
    root, validation = planted[0], planted[4]
    monkeypatch.chdir(root.parent)
    result = _select_cli(planted, tmp_path / "o", "--base", f"{root.name}/bas")
    refused(result, f"--base {root.name}/bas: no such folder; did you mean {root.name}/base?", out=tmp_path / "o")
    assert validation.name not in result.stderr


def test_every_grid_problem_at_once_with_the_valid_types_named(planted, tmp_path):
    grid = tmp_path / "grid.yml"
    grid.write_text("seedft:\n  lambda: [abc]\nlore:\n  mu_relative: []\nlinear: 3\n")
    result = _select_cli(planted, tmp_path / "o", "--grid", grid)
    refused(result, "lore.mu_relative: an empty list", "linear: give a mapping", out=tmp_path / "o")
    grid.write_text("seedft:\n  lambda: [abc, 1.0]\nlore:\n  mu_relative: [-1]\n")
    result = _select_cli(planted, tmp_path / "o", "--grid", grid, "--methods", "seedft,lore")
    refused(result, "candidate seedft lambda=abc", "float | auto", "candidate lore mu_relative=-1", out=tmp_path / "o")


def test_adapters_scored_on_one_kept_base_score_as_fresh_loads(tiny_loras, tmp_path, monkeypatch):
    """select keeps the base loaded for adapter seeds and candidates (issue 50): each adapter is
    put on it for its scoring and taken off after. Every score equals a fresh load's, for LoRA
    adapters of different ranks and targets and for SeRA, in any order, and the base is loaded
    once; a full model in between lets the base go (one model in memory at a time)."""
    from conftest import save_random_sera
    from transformers import AutoModelForCausalLM

    from mergekit_seed.tools.compare import KeptBase, read_data, score_model

    base, loras = tiny_loras
    wide = save_random_lora(base, tmp_path / "wide", r=8, seed=5, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    sera = save_random_sera(base, tmp_path / "sera", r=4, split=2, seed=6)
    _, rows = read_data(write_splits(tmp_path / "data")[0])
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda folder, **k: loads.append(str(folder)) or original(folder, **k)
    )
    kept = KeptBase()
    order = [loras[0], wide, sera, loras[1], loras[0], sera]
    for adapter in order:
        on_kept = score_model(str(adapter), rows, "answer_logprob", str(base), None, 4, "cpu", kept=kept)
        assert on_kept == score_model(str(adapter), rows, "answer_logprob", str(base), None, 4, "cpu"), adapter
    assert kept.loads == 1 and loads.count(str(base)) == 1 + len(order)  # once kept, then every fresh load
    score_model(str(base), rows, "answer_logprob", None, None, 4, "cpu", kept=kept)  # a full model
    score_model(str(loras[1]), rows, "answer_logprob", str(base), None, 4, "cpu", kept=kept)
    assert kept.loads == 2

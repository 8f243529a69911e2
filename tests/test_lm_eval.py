"""`compare --lm-eval` and `compare --tasks`, against real lm-evaluation-harness runs (offline).

Tiny LLaMA models with tokenizers are evaluated by lm-eval's own command line (run in-process)
on two local tasks over a JSONL file: one multiple-choice, one generate_until. The data are
built from a first "probe" run so that one model is right on every document and the other
wrong on every one: "better" by construction."""

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from conftest import refused, run_cli, save_random_lora
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


LETTERS = "abcdefghijklmnopqrstuvwxyz"

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{body}metadata:
  version: {version}
"""
MC_BODY = """output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_BODY = """output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""
TASKS = "tiny_mc,tiny_gen"


def write_tasks(folder: Path, data: Path, version: float = 1.0, gen_body: str = GEN_BODY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in (("tiny_mc", MC_BODY), ("tiny_gen", gen_body)):
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, body=body, version=version))
    return folder


def lm_eval(tasks_folder: Path, out: Path, model_args: str, *extra: str) -> Path:
    """lm-eval's own command line, in-process; returns the model's output folder."""
    import lm_eval.__main__

    argv = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        model_args,
        "--tasks",
        TASKS,
        "--include_path",
        str(tasks_folder),
        "--output_path",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    saved, sys.argv = sys.argv, argv
    try:
        lm_eval.__main__.cli_evaluate()
    finally:
        sys.argv = saved
    (folder,) = [path for path in out.iterdir() if path.is_dir()]
    return folder


def samples(folder: Path, task: str):
    (path,) = folder.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def local_tasks_only():
    """lm-eval indexes its ~14,000 built-in task files on every run (11 s here); these tests use
    only their own tasks, so the index skips the built-in ones (lm-eval's include_defaults)."""
    from functools import partialmethod

    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
        yield


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("harness")
    good, other = save_tiny_llama(root / "good", seed=0), save_tiny_llama(root / "other", seed=1)
    twin = Path(shutil.copytree(good, root / "twin"))
    rng = random.Random(0)
    probe_docs = []
    for _ in range(40):
        choices = ["".join(rng.sample(LETTERS, 3)) for _ in range(3)]
        probe_docs.append({"q": f"rev:{choices[0]}=", "choices": choices, "gold": 0, "answer": "x"})
    probe_data = root / "probe.jsonl"
    probe_data.write_text("".join(json.dumps(doc) + "\n" for doc in probe_docs))
    probe_tasks = write_tasks(root / "probe-tasks", probe_data)
    picks, texts = {}, {}
    for name, model in (("good", good), ("other", other)):
        folder = lm_eval(probe_tasks, root / f"probe-{name}", f"pretrained={model}", "--log_samples")
        picks[name] = {
            row["doc_id"]: max(range(3), key=lambda i: float(row["filtered_resps"][i][0]))
            for row in samples(folder, "tiny_mc")
        }
        texts[name] = {row["doc_id"]: row["filtered_resps"][0] for row in samples(folder, "tiny_gen")}
    docs = []
    for doc_id, doc in enumerate(probe_docs):
        text = texts["good"][doc_id]
        if (
            picks["good"][doc_id] != picks["other"][doc_id]
            and text
            and text == text.strip()
            and text != texts["other"][doc_id]
        ):
            docs.append(dict(doc, gold=picks["good"][doc_id], answer=text))
    assert len(docs) >= 10, "the probe left too few documents to tell the models apart"
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = write_tasks(root / "tasks", data)
    runs = {
        name: lm_eval(tasks, root / "runs" / name, f"pretrained={model}", "--log_samples")
        for name, model in (("good", good), ("other", other), ("twin", twin))
    }
    return {
        "root": root,
        "good": good,
        "other": other,
        "twin": twin,
        "tasks": tasks,
        "data": data,
        "runs": runs,
        "documents": len(docs),
    }


def compare_json(out: Path) -> dict:
    return json.loads((out / "compare.json").read_text())


def test_scores_are_lm_evals_own_and_verdicts_follow_construction(harness, tmp_path):
    runs = harness["runs"]
    result = run_cli(
        "mergekit-seed",
        "compare",
        "--lm-eval",
        runs["good"],
        runs["other"],
        runs["twin"],
        "--out",
        tmp_path / "c",
        check=True,
    )
    assert (
        "tiny_mc" in result.stdout
        and (tmp_path / "c" / "compare.md").is_file()
        and (tmp_path / "c" / "compare.png").is_file()
    )
    report = compare_json(tmp_path / "c")
    # the runs name their models by absolute paths; the published report, by their folder names
    published = {name: harness[name].name for name in ("good", "other", "twin")}
    names = {published[name]: name for name in ("good", "other", "twin")}
    assert set(report["models"]) == set(names)
    compared = set()
    for entry in report["tasks"]:
        metric, task = entry["metric"], entry["task"]
        for model, score in entry["scores"].items():
            (results_file,) = runs[names[model]].glob("results_*.json")
            assert score == pytest.approx(json.loads(results_file.read_text())["results"][task][metric], abs=1e-12)
        compared.add((task, metric))
        assert entry["examples"] == harness["documents"]
    assert compared == {("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none"), ("tiny_gen", "exact_match,none")}
    # the good model is right everywhere by construction: it is the best non-merge, the reference
    assert report["reference"] == published["good"]
    for entry in report["tasks"]:
        assert entry["scores"][published["good"]] == 1.0 and entry["scores"][published["other"]] == 0.0
        other, twin = entry["versus_reference"][published["other"]], entry["versus_reference"][published["twin"]]
        assert other["verdict"] == "worse" and other["mean"] == -1.0
        assert (twin["mean"], twin["low"], twin["high"]) == (0.0, 0.0, 0.0)
    pooled = report["pooled"]
    assert pooled["metrics"] == {"tiny_mc": "acc,none", "tiny_gen": "exact_match,none"}
    assert pooled["versus_reference"][published["twin"]]["mean"] == 0.0
    assert pooled["versus_reference"][published["other"]]["groups"] == 2
    # the tasks are the groups (issue 49): the best seed on each task, and what those picks make
    assert report["oracle"] == {
        "best_seed_per_task": {"tiny_mc": published["good"], "tiny_gen": published["good"]},
        "score": 1.0,
    }
    assert "Oracle (the best seed on each task" in (tmp_path / "c" / "compare.md").read_text()
    # --reference and --metric choose the comparison; the other model is better than... nothing
    run_cli(
        "mergekit-seed",
        "compare",
        "--lm-eval",
        runs["good"],
        runs["other"],
        "--reference",
        str(harness["other"]),
        "--metric",
        "acc_norm",
        "--out",
        tmp_path / "r",
        check=True,
    )
    report = compare_json(tmp_path / "r")
    assert report["pooled"]["metrics"] == {"tiny_mc": "acc_norm,none"}
    assert report["pooled"]["versus_reference"][published["good"]]["verdict"] == "better"


def test_an_output_path_with_every_model_is_one_argument(harness, tmp_path):
    together = tmp_path / "all"
    for name in ("good", "other"):
        shutil.copytree(harness["runs"][name], together / name)
    run_cli(
        "mergekit-seed", "compare", "--lm-eval", together, "--out", tmp_path / "c", "--tasks", "tiny_mc", check=True
    )
    report = compare_json(tmp_path / "c")
    assert len(report["models"]) == 2 and {entry["task"] for entry in report["tasks"]} == {"tiny_mc"}


def _compare_tasks(harness, out: Path, *models, options=()):
    return run_cli(
        "mergekit-seed", "compare", *models, "--base", harness["good"], "--tasks", TASKS,
        "--include-path", harness["tasks"], "--limit", "6", "--batch-size", "1", "--out", out, "--quiet", *options,
    )  # fmt: skip


def test_the_tasks_route_runs_lm_eval_and_matches_its_command_line(harness, tmp_path):
    """`compare --tasks` on a full model and a PEFT adapter gives the scores lm-eval's own CLI
    gives them (the adapter through lm-eval's peft= argument)."""
    adapter = save_random_lora(harness["good"], tmp_path / "lora", r=4, seed=3)
    result = _compare_tasks(harness, tmp_path / "c", harness["other"], adapter)
    assert result.returncode == 0, result.stderr
    assert "Pooled over tasks" in result.stdout
    report = compare_json(tmp_path / "c")
    assert set(report["models"]) == {harness["other"].name, adapter.name}  # published by folder name, not path
    cli_runs = {
        harness["other"].name: lm_eval(
            harness["tasks"], tmp_path / "cli-other", f"pretrained={harness['other']}", "--log_samples", "--limit", "6"
        ),
        adapter.name: lm_eval(
            harness["tasks"],
            tmp_path / "cli-lora",
            f"pretrained={harness['good']},peft={adapter}",
            "--log_samples",
            "--limit",
            "6",
        ),
    }
    for entry in report["tasks"]:
        assert entry["examples"] == 6
        for model, folder in cli_runs.items():
            (results_file,) = folder.glob("results_*.json")
            expected = json.loads(results_file.read_text())["results"][entry["task"]][entry["metric"]]
            assert entry["scores"][model] == pytest.approx(expected, abs=1e-12), (
                model,
                entry["task"],
                entry["metric"],
            )
    # the runs it made are lm-eval's own files, comparable again with --lm-eval
    run_cli(
        "mergekit-seed", "compare", "--lm-eval", tmp_path / "c" / "lm-eval", "--out", tmp_path / "again", check=True
    )
    assert compare_json(tmp_path / "again")["tasks"] == report["tasks"]
    # its runs are part of the report, recorded relative to it; a file the user adds there is never replaced
    assert all(folder.startswith("lm-eval/") for folder in report["lm_eval_runs"].values())
    (tmp_path / "c" / "lm-eval" / "notes.txt").write_text("mine")
    refused(
        _compare_tasks(harness, tmp_path / "c", harness["other"], adapter),
        "lm-eval/notes.txt",
        "was not written by it",
    )
    assert (tmp_path / "c" / "lm-eval" / "notes.txt").read_text() == "mine"
    refused(
        run_cli(
            "mergekit-seed", "compare", harness["other"], adapter, "--tasks", "no_such_task", "--out", tmp_path / "n"
        ),
        "no_such_task",
        "--include-path",
    )


def _copy_run(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


def test_runs_that_cannot_be_paired_are_refused_in_one_line(harness, tmp_path):
    runs, tasks, other = harness["runs"], harness["tasks"], harness["other"]
    compare = ("mergekit-seed", "compare", "--lm-eval")
    out = ("--out", tmp_path / "out")

    limited = lm_eval(tasks, tmp_path / "limited", f"pretrained={other}", "--log_samples", "--limit", "4")
    refused(run_cli(*compare, runs["good"], limited, *out), str(limited), "tiny_", "--limit")

    fewshot = lm_eval(tasks, tmp_path / "fewshot", f"pretrained={other}", "--log_samples", "--num_fewshot", "1")
    refused(run_cli(*compare, runs["good"], fewshot, *out), str(fewshot), "-shot", "--num_fewshot")

    versioned = lm_eval(
        write_tasks(tmp_path / "v2", harness["data"], version=2.0),
        tmp_path / "versioned",
        f"pretrained={other}",
        "--log_samples",
    )
    refused(run_cli(*compare, runs["good"], versioned, *out), str(versioned), "version")

    no_samples = lm_eval(tasks, tmp_path / "no-samples", f"pretrained={other}")
    refused(run_cli(*compare, runs["good"], no_samples, *out), str(no_samples), "--log_samples")

    one_task = _copy_run(runs["other"], tmp_path / "one-task")
    for path in one_task.glob("samples_tiny_gen_*"):
        path.unlink()
    (results_file,) = one_task.glob("results_*.json")
    results = json.loads(results_file.read_text())
    for key in ("results", "configs", "versions", "n-shot"):
        results[key].pop("tiny_gen")
    results_file.write_text(json.dumps(results))
    refused(run_cli(*compare, runs["good"], one_task, *out), str(one_task), "tiny_gen", "--tasks")

    again = _copy_run(runs["good"], tmp_path / "good-again")
    refused(run_cli(*compare, runs["good"], again, *out), str(again), "second run of")

    twice = _copy_run(runs["other"], tmp_path / "twice")
    for path in list(twice.iterdir()):
        shutil.copy(path, twice / path.name.replace("2026-", "2025-"))
    refused(run_cli(*compare, runs["good"], twice, *out), str(twice), "run twice")

    refused(run_cli(*compare, runs["good"], tmp_path / "nothing-here", *out), "no such folder")
    refused(run_cli(*compare, runs["good"], "--out", tmp_path / "one"), "at least two")
    refused(run_cli(*compare, runs["good"], runs["other"], "--data", harness["data"], *out), "--data", "--lm-eval")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["samples file", "results file", "task name"])
def test_an_lm_eval_run_is_read_only_from_inside_its_folder(harness, tmp_path, what):
    """Issue 47: a samples_*.jsonl or results_*.json linked out of the run folder was followed,
    and a task name such as ``x/../../outside/stolen`` in ``configs`` opened a file outside it."""
    run = _copy_run(harness["runs"]["other"], tmp_path / "other")
    outside = tmp_path / "outside"
    outside.mkdir()
    (results_file,) = run.glob("results_*.json")
    date = results_file.stem[len("results_") :]
    if what == "samples file":
        (samples_file,) = run.glob("samples_tiny_mc_*.jsonl")
        moved = shutil.move(samples_file, outside / samples_file.name)
        samples_file.symlink_to(moved)
    elif what == "results file":
        results_file.symlink_to(shutil.move(results_file, outside / results_file.name))
    else:
        results = json.loads(results_file.read_text())
        stolen = "x/../../outside/stolen"
        for key in ("results", "configs", "versions", "n-shot"):
            results[key][stolen] = results[key].pop("tiny_gen")
        results_file.write_text(json.dumps(results))
        (samples_gen,) = run.glob("samples_tiny_gen_*.jsonl")
        shutil.copy(samples_gen, outside / f"stolen_{date}.jsonl")
        (run / "samples_x").mkdir()
    refused(
        run_cli("mergekit-seed", "compare", "--lm-eval", harness["runs"]["good"], run, "--out", tmp_path / "out"),
        "leads outside the run folder",
        out=tmp_path / "out",
    )


def test_exact_match_is_lm_evals_on_the_same_outputs(harness, tmp_path):
    """Issue 49: compare's exact_match decoded as many tokens as the answer has, so a model that
    went on after the answer counted as right. Now it is lm-eval's rule for a generate_until task
    (until a newline), held equal to lm-eval's own exact_match, per example, on the same model and
    documents: answers that are the model's continuation up to where it stops (a hit), the same with
    one more letter (a miss), and the same less its last letter (a miss that the old rule, kept as
    prefix_match, counts right: the model went on after the answer)."""
    from mergekit_seed.tools.compare import Row, load_model, score_rows

    limit = 40  # room for the tiny models (64 positions) to stop, as lm-eval's max_gen_toks
    long_body = GEN_BODY.replace("max_gen_toks: 4", f"max_gen_toks: {limit}")
    docs = [json.loads(line) for line in harness["data"].read_text().splitlines()]
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(dict(doc, answer="x")) + "\n" for doc in docs))
    first = lm_eval(write_tasks(tmp_path / "probe-tasks", probe, gen_body=long_body), tmp_path / "first",
                    f"pretrained={harness['good']}", "--log_samples")  # fmt: skip
    continuations = {row["doc_id"]: row["filtered_resps"][0] for row in samples(first, "tiny_gen")}
    stopped = [i for i, text in continuations.items() if len(text.strip()) > 1 and len(text) < limit - 1]
    assert len(stopped) >= 6, "the model stops too rarely for this test"
    variants = [lambda text: text, lambda text: text + "z", lambda text: text.strip()[:-1]]
    answers = {i: variants[n % 3](continuations[i]) for n, i in enumerate(stopped)}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(docs[i], answer=answers[i])) + "\n" for i in stopped))
    second = lm_eval(write_tasks(tmp_path / "tasks", data, gen_body=long_body), tmp_path / "second",
                     f"pretrained={harness['good']}", "--log_samples")  # fmt: skip
    theirs = [row["exact_match"] for row in sorted(samples(second, "tiny_gen"), key=lambda row: row["doc_id"])]
    model, tokenizer = load_model(str(harness["good"]), None, "cpu")
    rows = [Row(prompt=docs[i]["q"], answer=answers[i]) for i in stopped]
    ours = [hit for hit, _ in score_rows(model, tokenizer, rows, "exact_match", stop=("\n",))]
    assert ours == theirs and 0 < sum(ours) < len(ours), (ours, theirs)
    prefix = [hit for hit, _ in score_rows(model, tokenizer, rows, "prefix_match")]
    cut_short = [n for n in range(len(stopped)) if n % 3 == 2]
    assert all(prefix[n] == 1.0 and ours[n] == 0.0 for n in cut_short), (prefix, ours)


# generated lm-eval files: one place of a run's results or samples replaced by a hostile value
HOSTILE_VALUES = st.sampled_from(
    ["list", "mapping", "string", "nan", "inf", "past-float", "huge-int", "missing", "null"]
)


def _hostile(kind: str):
    return {
        "list": [1, 2],
        "mapping": {"a": 1},
        "string": "x",
        "nan": float("nan"),
        "inf": float("inf"),
        "past-float": 1e308 * 10,
        "huge-int": 10**400,
        "null": None,
    }[kind]


@settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    where=st.sampled_from(
        [
            "versions",
            "n-shot",
            "results",
            "results.task",
            "results.metric",
            "higher_is_better",
            "configs",
            "config",
            "sample.metric",
            "sample.metrics",
            "sample.doc_id",
        ]
    ),
    kind=HOSTILE_VALUES,
    row=st.integers(0, 5),
)
def test_generated_lm_eval_structures_end_in_a_report_or_one_line(harness, tmp_path_factory, where, kind, row):
    """Whatever lm-eval-like file compare reads, it writes a report without NaN or Inf, or says
    in one line what is wrong: never a traceback, never 'no detectable difference' from NaN."""
    root = tmp_path_factory.mktemp("hostile")
    run = _copy_run(harness["runs"]["other"], root / "other")
    (results_file,) = run.glob("results_*.json")
    results = json.loads(results_file.read_text())
    section, _, part = where.partition(".")
    if section == "sample":
        (samples_file,) = run.glob("samples_tiny_mc_*.jsonl")
        rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
        target = rows[row % len(rows)]
        key = {"metric": "acc", "metrics": "metrics", "doc_id": "doc_id"}[part]
        if kind == "missing":
            target.pop(key, None)
        else:
            target[key] = _hostile(kind)
        samples_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        container, key = (
            (results, section)
            if not part
            else (results["results"], "tiny_mc")
            if part == "task"
            else (results["results"]["tiny_mc"], "acc,none")
        )
        if kind == "missing":
            container.pop(key, None)
        else:
            container[key] = _hostile(kind)
    results_file.write_text(json.dumps(results))
    out = root / "out"
    result = run_cli("mergekit-seed", "compare", "--lm-eval", harness["runs"]["good"], run, "--out", out)
    if result.returncode == 0:
        json.loads(
            (out / "compare.json").read_text(), parse_constant=lambda name: pytest.fail(f"compare.json holds {name}")
        )
        assert "nan" not in (out / "compare.md").read_text().lower()
    else:
        refused(result)


def test_lm_evals_own_backend_loads_the_models_with_the_users_arguments(harness, tmp_path):
    """--lm-eval-model and --model-args (issue 50): lm-eval's hf backend loads a full model and
    a LoRA adapter (its peft= argument) with the user's dtype, and scores them as our loader
    does; the arguments are recorded in lm-eval's files; what cannot hold is one line."""
    from conftest import save_random_sera

    adapter = save_random_lora(harness["good"], tmp_path / "lora", r=4, seed=3)
    ours = _compare_tasks(harness, tmp_path / "ours", harness["other"], adapter)
    assert ours.returncode == 0, ours.stderr
    options = ("--lm-eval-model", "hf", "--model-args", "dtype=float32")
    theirs = _compare_tasks(harness, tmp_path / "theirs", harness["other"], adapter, options=options)
    assert theirs.returncode == 0, theirs.stderr
    assert compare_json(tmp_path / "theirs")["tasks"] == compare_json(tmp_path / "ours")["tasks"]
    for results_file in (tmp_path / "theirs" / "lm-eval").glob("*/results_*.json"):
        config = json.loads(results_file.read_text())["config"]
        assert config["model"] == "hf" and config["model_args"]["dtype"] == "float32", config
    sera = save_random_sera(harness["good"], tmp_path / "sera", r=4, split=2, seed=4)
    for options, fragments in [
        (("--model-args", "pretrained=/elsewhere"), ["--model-args pretrained=", "leave it out"]),
        (("--model-args", "dtype"), ["'dtype' is not KEY=VALUE"]),
        (("--model-args", "token=hf_abcdefgh"), ["--model-args token=...", "HF_TOKEN"]),
        (("--lm-eval-model", "no_such_backend"), ["--lm-eval-model no_such_backend"]),
    ]:
        refused(_compare_tasks(harness, tmp_path / "no", harness["other"], adapter, options=options), *fragments)
    refused(
        _compare_tasks(harness, tmp_path / "no", harness["other"], sera, options=("--lm-eval-model", "hf")),
        "sera",
        "cannot load this SERA adapter",
        "leave --lm-eval-model out",
    )

"""``mergekit-seed compare --lm-eval``: paired verdicts from lm-evaluation-harness runs.

lm-eval (``lm_eval ... --output_path DIR --log_samples``) writes one folder per model:

- ``results_<date>.json``: the aggregated scores (``results[task]["acc,none"]``), the tasks'
  versions, ``n-shot``, ``higher_is_better``, the run's ``config`` (``model_args``, ``limit``),
  ``model_name`` and ``task_hashes``;
- ``samples_<task>_<date>.jsonl``: one row per document and filter, with ``doc_id``,
  ``doc_hash``, ``prompt_hash``, ``filter`` and the per-example value of every metric the task
  computes (``"acc": 1.0``).

Examples are paired by ``doc_id`` (and filter) task by task, after checking that every run saw the
same documents with the same prompts. Each per-example metric whose mean is the score lm-eval
reports is compared with the reference by :func:`mergekit_seed.maths.stats.paired_difference`;
one pooled verdict resamples tasks, then examples. Running lm-eval is
:mod:`mergekit_seed.tools.lm_eval_runner`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.finite import require_finite_number
from mergekit_seed.installed import package_version
from mergekit_seed.maths.stats import paired_difference
from mergekit_seed.output import OutputFolder, local_paths
from mergekit_seed.reader import read_json, read_lines, regular_file
from mergekit_seed.references.hub import is_hub_id, split_revision
from mergekit_seed.tools.compare import (
    comparison_table,
    is_merge,
    unique_models,
    write_outputs,
)
from mergekit_seed.tools.lm_eval_runner import RESULTS_GLOB, evaluate_models


DocKey = Tuple[int, str]  # (doc_id, filter)


@dataclass
class TaskRun:
    """One task of one run: per-example metric values keyed by (doc_id, filter)."""

    task: str
    samples_file: Path
    version: object
    n_shot: object
    values: Dict[str, Dict[DocKey, float]]  # "metric,filter" -> (doc_id, filter) -> value
    not_numbers: List[str]  # metrics whose per-example values lm-eval aggregates corpus-wide
    doc_hashes: Dict[DocKey, Optional[str]]
    prompt_hashes: Dict[DocKey, Optional[str]]
    reported: Dict[str, float]  # "metric,filter" -> the score in results_*.json
    higher_is_better: Dict[str, bool]  # metric -> direction


@dataclass
class Run:
    """One model's lm-eval output folder."""

    folder: Path
    name: str
    model_args: object
    limit: object
    tasks: Dict[str, TaskRun] = field(default_factory=dict)


class ResultsFile(BaseModel):
    """The parts of lm-eval's ``results_*.json`` that compare reads, checked by type before use
    (a file is untrusted input; other fields are kept as they are)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    results: Dict[str, Dict[str, Any]]
    versions: Optional[Dict[str, Any]] = None
    n_shot: Optional[Dict[str, Any]] = Field(None, alias="n-shot")
    configs: Optional[Dict[str, Any]] = None
    config: Optional[Dict[str, Any]] = None
    higher_is_better: Optional[Dict[str, Dict[str, Any]]] = None


def _read_json(path: Path) -> dict:
    regular_file(path, within=path.parent, fix="lm-eval writes its results as files", kind="run folder")
    data = read_json(path, "lm-eval results file", within=path.parent)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f'{path}: not an lm-eval results file (no "results" object)')
    try:
        ResultsFile.model_validate(data)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(f"{path}: {location}: {message}; not an lm-eval results file as lm-eval writes it") from None
    return data


def run_folders(paths: Sequence[str]) -> List[Path]:
    """Each argument is a model's folder (it holds ``results_*.json``) or lm-eval's
    ``--output_path`` folder (its subfolders do); the model folders, in order."""
    folders: List[Path] = []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"{path}: no such folder; pass the folder lm_eval's --output_path wrote")
        if any(folder.glob(RESULTS_GLOB)):
            folders.append(folder)
            continue
        inside = sorted(sub for sub in folder.iterdir() if sub.is_dir() and any(sub.glob(RESULTS_GLOB)))
        if not inside:
            raise UserError(
                f"{path}: no results_*.json in it or its subfolders; pass the folder lm_eval's --output_path wrote"
            )
        folders.extend(inside)
    return folders


def _model_name(results: dict, folder: Path) -> str:
    name = results.get("model_name")
    return str(name) if name else folder.name


def _number(value, where: str) -> Optional[float]:
    """A metric value as a float; None for what is not a number (lm-eval aggregates such
    metrics corpus-wide); a number that is NaN, Inf or past float's range is refused."""
    if isinstance(value, (bool, int, float)):
        return require_finite_number(value, where)
    return None


def _read_samples(path: Path, task: str) -> TaskRun:
    values: Dict[str, Dict[DocKey, float]] = {}
    not_numbers: set = set()
    doc_hashes: Dict[DocKey, Optional[str]] = {}
    prompt_hashes: Dict[DocKey, Optional[str]] = {}
    listed_any = False
    lines = read_lines(path, "lm-eval samples file")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path}:{number}: not a JSON line; is this lm-eval's samples file?") from None
        if not isinstance(row, dict) or not isinstance(row.get("doc_id"), int):
            raise UserError(f"{path}:{number}: a sample without an integer doc_id; is this lm-eval's samples file?")
        flt = str(row.get("filter", "none"))
        key = (row["doc_id"], flt)
        if key in doc_hashes:
            raise UserError(
                f"{path}:{number}: document {row['doc_id']} (filter {flt}) appears twice; the file holds two runs, "
                "keep one"
            )
        doc_hashes[key] = row.get("doc_hash")
        prompt_hashes[key] = row.get("prompt_hash")
        metrics = row.get("metrics")
        for metric in metrics if isinstance(metrics, list) else []:
            if metric not in row:
                continue
            listed_any = True
            value = _number(row[metric], f"{path}:{number}: {task} document {row['doc_id']}, {metric}")
            if value is None:
                not_numbers.add(metric)
            else:
                values.setdefault(f"{metric},{flt}", {})[key] = value
    if not listed_any:
        raise UserError(
            f"{path}: no per-example metric values in the samples of {task}; "
            "rerun lm_eval with --log_samples (lm-eval 0.4.3 or newer writes them)"
        )
    for metric in not_numbers:
        for name in [name for name in values if name.split(",")[0] == metric]:
            del values[name]  # a metric with some non-number rows is aggregated corpus-wide
    for name, by_document in values.items():
        flt = name.partition(",")[2]
        missing = [key for key in doc_hashes if key[1] == flt and key not in by_document]
        if missing:
            raise UserError(
                f"{path}: document {missing[0][0]} (filter {flt}) has no {name.partition(',')[0]} value, which other "
                f"documents of {task} have; the file is damaged: rerun lm_eval with --log_samples"
            )
    return TaskRun(task, path, None, None, values, sorted(not_numbers), doc_hashes, prompt_hashes, {}, {})


def read_run(folder: Path, only_tasks: Optional[Sequence[str]] = None) -> Run:
    """The tasks of every ``results_*.json`` in ``folder`` with their samples files. A task run
    twice in one folder is refused: which run is meant is the user's choice."""
    results_files = sorted(folder.glob(RESULTS_GLOB))
    run: Optional[Run] = None
    seen: Dict[str, Path] = {}
    for results_file in results_files:
        results = _read_json(results_file)
        config = results.get("config") if isinstance(results.get("config"), dict) else {}
        name = _model_name(results, folder)
        if run is None:
            run = Run(folder, name, config.get("model_args"), config.get("limit"))
        elif (name, config.get("model_args")) != (run.name, run.model_args):
            raise UserError(
                f"{folder}: {results_file.name} is a run of {name}, another results file of {run.name}; "
                "keep one model's runs per folder"
            )
        date = results_file.stem[len("results_") :]
        task_configs = results.get("configs") if isinstance(results.get("configs"), dict) else {}
        for task in task_configs:  # groups have no config and no samples of their own
            if only_tasks is not None and task not in only_tasks:
                continue
            if task in seen:
                raise UserError(
                    f"{folder}: {task} was run twice ({seen[task].name} and {results_file.name}); "
                    "move the older results_*.json and its samples_*.jsonl files out of the folder"
                )
            seen[task] = results_file
            samples_file = folder / f"samples_{task}_{date}.jsonl"
            if not os.path.lexists(samples_file):
                raise UserError(
                    f"{folder}: {task} has no {samples_file.name} next to {results_file.name}; "
                    "rerun lm_eval with --log_samples"
                )
            regular_file(samples_file, within=folder, fix="lm-eval writes its samples as files", kind="run folder")
            task_run = _read_samples(samples_file, task)
            task_run.version = (results.get("versions") or {}).get(task)
            task_run.n_shot = (results.get("n-shot") or {}).get(task)
            reported = results["results"].get(task) or {}
            task_run.reported = {
                key: value
                for key, value in (
                    (key, _number(value, f"{results_file}: {task} {key}"))
                    for key, value in reported.items()
                    if "," in key and "_stderr," not in key
                )
                if value is not None
            }
            direction = (results.get("higher_is_better") or {}).get(task) or {}
            task_run.higher_is_better = {str(metric): bool(up) for metric, up in direction.items()}
            run.tasks[task] = task_run
    if run is None or not run.tasks:
        wanted = f" among {', '.join(only_tasks)}" if only_tasks else ""
        raise UserError(f"{folder}: its results_*.json name no task{wanted}")
    return run


def _differs(run: Run, other: Run, task: str) -> Optional[str]:
    """Why ``run`` and ``other`` did not see the same documents and prompts of ``task``; None if they did."""
    mine, theirs = run.tasks[task], other.tasks[task]
    where = f"{run.folder}: {task}"
    if mine.version != theirs.version:
        return (
            f"{where} is version {mine.version} there and {theirs.version} in {other.folder}; evaluate every "
            "model with the same task version"
        )
    if mine.n_shot != theirs.n_shot:
        return (
            f"{where} ran {mine.n_shot}-shot there and {theirs.n_shot}-shot in {other.folder}; rerun with the "
            "same --num_fewshot"
        )
    if set(mine.doc_hashes) != set(theirs.doc_hashes):
        shared = len(set(mine.doc_hashes) & set(theirs.doc_hashes))
        limits = f" (--limit {run.limit} there, {other.limit} in {other.folder})" if run.limit != other.limit else ""
        return (
            f"{where} has {len(mine.doc_hashes)} samples there and {len(theirs.doc_hashes)} in {other.folder}, "
            f"{shared} shared{limits}; rerun every model on the same documents (same --limit, tasks and filters)"
        )
    for key, doc_hash in mine.doc_hashes.items():
        if doc_hash and theirs.doc_hashes[key] and doc_hash != theirs.doc_hashes[key]:
            return (
                f"{where} document {key[0]} differs from the one in {other.folder}; evaluate every model on the "
                "same dataset revision"
            )
    for key, prompt_hash in mine.prompt_hashes.items():
        if prompt_hash and theirs.prompt_hashes[key] and prompt_hash != theirs.prompt_hashes[key]:
            return (
                f"{where} document {key[0]} was prompted differently in {other.folder} (few-shot examples, "
                "fewshot seed, chat template or system instruction); rerun every model with the same settings"
            )
    return None


def check_runs(runs: Sequence[Run]) -> List[str]:
    """The tasks every run can be compared on; refuses two runs of one model, a task missing
    from a run, and runs that saw different documents."""
    for index, run in enumerate(runs):
        for other in runs[:index]:
            if run.name == other.name and run.model_args == other.model_args:
                raise UserError(
                    f"{run.folder}: a second run of {run.name} (the first is {other.folder}); "
                    "compare each model once, keep the run you trust"
                )
    tasks = list(runs[0].tasks)
    for run in runs:
        for task in set(tasks) ^ set(run.tasks):
            missing_from = run if task not in run.tasks else runs[0]
            has_it = runs[0] if missing_from is run else run
            raise UserError(
                f"{missing_from.folder}: no run of {task}, which {has_it.folder} has; evaluate every model on it, "
                "or pass --tasks with the tasks every run has"
            )
    for run in runs[1:]:
        for task in tasks:
            problem = _differs(run, runs[0], task)
            if problem:
                raise UserError(problem)
    return tasks


def _merge_flag(run: Run) -> bool:
    """Whether the model of ``run`` is a merge: its folder's card, local or in the HF cache."""
    args = run.model_args if isinstance(run.model_args, dict) else _parse_args(run.model_args)
    reference = str(args.get("peft") or args.get("pretrained") or run.name)
    if Path(reference).is_dir():
        return is_merge(Path(reference))
    if is_hub_id(split_revision(reference)[0]):
        repo_id, revision = split_revision(reference)
        for name in ("README.md", "mergekit_config.yml"):
            cached = try_to_load_from_cache(repo_id, name, revision=revision)
            if isinstance(cached, str):
                return is_merge(Path(cached).parent)
    return False


def _parse_args(model_args) -> Dict[str, str]:
    if not isinstance(model_args, str):
        return {}
    pairs = (item.split("=", 1) for item in model_args.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def comparable_metrics(task_runs: Sequence[TaskRun], echo: Callable[[str], None]) -> List[str]:
    """The task's metrics whose per-example mean is the score every run's results file reports."""
    first = task_runs[0]
    kept = []
    for metric in first.values:
        if not all(metric in task_run.values for task_run in task_runs):
            continue
        agrees = True
        for task_run in task_runs:
            reported = task_run.reported.get(metric)
            mean = sum(task_run.values[metric].values()) / len(task_run.values[metric])
            if reported is not None and not math.isclose(mean, reported, rel_tol=1e-6, abs_tol=1e-9):
                agrees = False
        if agrees:
            kept.append(metric)
        else:
            echo(
                f"note: {first.task} {metric}: lm-eval's score is not the mean of its per-example values; not compared"
            )
    for metric in first.not_numbers:
        echo(
            f"note: {first.task} {metric}: per-example values are not numbers (lm-eval aggregates it corpus-wide); "
            "not compared"
        )
    return kept


def compare_runs(paths: Sequence[str], out: Path, **settings) -> dict:
    """Compare lm-eval runs and publish compare.json, .md and .png in ``out`` through the
    output protocol (:func:`mergekit_seed.tools.compare.compare`'s rules); ``settings`` are
    :func:`compare_runs_into`'s."""
    with OutputFolder(out, local_paths(paths), command="compare", report=True) as output:
        results = compare_runs_into(paths, output.staging, **settings)
        output.publish()
    settings.get("echo", print)(output.public(harness_tables(results)))
    return results


def compare_tasks(models: Sequence[str], tasks: Sequence[str], out: Path, evaluation: dict, **settings) -> dict:
    """Score ``models`` with lm-eval on ``tasks`` (``evaluation``: :func:`evaluate_models`'
    settings), keeping lm-eval's files in ``out/lm-eval``, and compare the runs there; one
    output folder, published once (:func:`compare_runs`)."""
    inputs = local_paths(
        [*models, evaluation.get("base"), evaluation.get("tokenizer"), evaluation.get("include_path")]
    )
    with OutputFolder(out, inputs, command="compare", report=True) as output:
        folders = evaluate_models(models, output.staging / "lm-eval", tasks, **evaluation)
        results = compare_runs_into(
            [str(folder) for folder in folders], output.staging, within=output.staging, **settings
        )
        output.publish()
    settings.get("echo", print)(output.public(harness_tables(results)))
    return results


def _run_names(runs: List[Run], reference: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """Each run's model name (with its folder where one model ran under different arguments),
    and ``--reference`` matched to one of them (None: chosen later)."""
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        names = [f"{run.name} ({run.folder.name})" for run in runs]
    if reference is not None:
        matches = [name for name, run in zip(names, runs) if reference in (name, run.name, str(run.folder))]
        if len(matches) != 1:
            raise UserError(f"--reference {reference}: not one of the runs ({', '.join(names)})")
        reference = matches[0]
    return names, reference


def _metric_sections(
    runs: List[Run], names: List[str], task_names: List[str], metric: Optional[str], echo
) -> Tuple[List[dict], Dict[str, str]]:
    """One section per task and comparable metric (per-example values by model, on the shared
    documents), and the metric pooled for each task (``metric``, else the task's first)."""
    sections, pooled_metrics = [], {}
    for task in task_names:
        task_runs = [run.tasks[task] for run in runs]
        metrics = comparable_metrics(task_runs, echo)
        if not metrics:
            echo(f"note: {task}: no per-example metric to compare")
            continue
        for metric_key in metrics:
            docs = sorted(task_runs[0].values[metric_key])
            up = task_runs[0].higher_is_better.get(metric_key.split(",")[0], True)
            values = {name: [tr.values[metric_key][doc] for doc in docs] for name, tr in zip(names, task_runs)}
            sections.append(
                {"task": task, "metric": metric_key, "higher_is_better": up, "examples": len(docs), "values": values}
            )
        chosen = pooled_metric(metrics, metric)
        if chosen:
            pooled_metrics[task] = chosen
    return sections, pooled_metrics


def pooled_metric(metrics: Sequence[str], metric: Optional[str]) -> Optional[str]:
    """The ``metric,filter`` key pooled for a task: the first of ``metrics`` named ``metric``,
    else (no ``metric`` given) the task's first; None when the task does not compute it."""
    chosen = [key for key in metrics if key.split(",")[0] == metric] if metric else list(metrics[:1])
    return chosen[0] if chosen else None


def _oriented(section: dict, name: str) -> List[float]:
    """A model's per-example values in a section, signed so that higher is better."""
    sign = 1.0 if section["higher_is_better"] else -1.0
    return [sign * value for value in section["values"][name]]


def _versus(
    names: List[str], reference: str, groups_of: Callable[[str], List[List[float]]], bootstrap: Tuple[float, int, int]
) -> Dict[str, dict]:
    """Each model's paired difference with ``reference`` over the groups ``groups_of`` gives
    (``bootstrap``: confidence, resamples, seed)."""
    confidence, resamples, seed = bootstrap
    return {
        name: paired_difference(
            [[a - b for a, b in zip(mine, theirs)] for mine, theirs in zip(groups_of(name), groups_of(reference))],
            confidence,
            resamples,
            seed,
        ).to_dict()
        for name in names
        if name != reference
    }


def compare_runs_into(
    paths: Sequence[str],
    out: Path,
    reference: Optional[str] = None,
    metric: Optional[str] = None,
    tasks: Optional[Sequence[str]] = None,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = 10_000,
    echo: Callable[[str], None] = print,
    within: Optional[Path] = None,
) -> dict:
    """Compare lm-eval runs (one folder per model, see the module docstring) with the reference
    model, per task and metric and pooled; writes compare.json, .md and .png into the folder
    ``out``. Runs inside ``within`` (the report's own) are recorded relative to it."""
    paths = unique_models(paths, echo)
    runs = [read_run(folder, tasks) for folder in run_folders(paths)]
    if len(runs) < 2:
        raise UserError(f"{' '.join(paths)}: one model's run; compare needs at least two")
    task_names = check_runs(runs)
    names, reference = _run_names(runs, reference)
    merges = {name: _merge_flag(run) for name, run in zip(names, runs)}
    sections, pooled_metrics = _metric_sections(runs, names, task_names, metric, echo)
    if not sections:
        raise UserError(f"{' '.join(paths)}: no task has a per-example metric to compare")
    if not pooled_metrics:
        raise UserError(
            f"--metric {metric}: no task computes it ({', '.join(sorted({s['metric'] for s in sections}))})"
        )
    pooled_sections = [s for s in sections if pooled_metrics.get(s["task"]) == s["metric"]]
    examples = sum(s["examples"] for s in pooled_sections)
    pooled_mean = {name: sum(sum(_oriented(s, name)) for s in pooled_sections) / examples for name in names}
    if reference is None:
        candidates = [name for name in names if not merges[name]] or names
        reference = max(candidates, key=lambda name: pooled_mean[name])
    bootstrap = (confidence, resamples, seed)
    per_task = [
        {
            **{key: section[key] for key in ("task", "metric", "higher_is_better", "examples")},
            "scores": {name: sum(section["values"][name]) / section["examples"] for name in names},
            "versus_reference": _versus(names, reference, lambda name, s=section: [_oriented(s, name)], bootstrap),
        }
        for section in sections
    ]
    pooled = {
        "metrics": pooled_metrics,
        "examples": examples,
        "scores": pooled_mean,
        "versus_reference": _versus(
            names, reference, lambda name: [_oriented(s, name) for s in pooled_sections], bootstrap
        ),
    }
    results = {
        "lm_eval_runs": {name: _shown_folder(run.folder, within) for name, run in zip(names, runs)},
        "reference": reference,
        "models": {name: {"merge": merges[name], "model_args": run.model_args} for name, run in zip(names, runs)},
        "tasks": per_task,
        "pooled": pooled,
        **({"oracle": task_oracle(pooled_sections, names, merges)} if len(pooled_sections) > 1 else {}),
        "confidence": confidence,
        "bootstrap": {"resamples": resamples, "seed": seed},
        "versions": {p: package_version(p) for p in ("lm_eval", "mergekit-seed")},
    }
    write_outputs(results, out, harness_tables(results), harness_panels(results))
    return results


def task_oracle(pooled_sections: List[dict], names: List[str], merges: Dict[str, bool]) -> dict:
    """The tasks are the groups of an lm-eval comparison: on each task the best of the models that
    are not merges (the seeds), and the pooled mean those picks make together (oriented, higher
    is better), what merging the seeds could win."""
    seeds = [name for name in names if not merges[name]] or names
    picks = {s["task"]: max(seeds, key=lambda name, s=s: sum(_oriented(s, name))) for s in pooled_sections}
    total = sum(sum(_oriented(s, picks[s["task"]])) for s in pooled_sections)
    return {"best_seed_per_task": picks, "score": total / sum(s["examples"] for s in pooled_sections)}


def _shown_folder(folder: Path, within: Optional[Path]) -> str:
    return (
        Path(folder).relative_to(within).as_posix()
        if within is not None and Path(folder).is_relative_to(within)
        else str(folder)
    )


def harness_panels(results: dict) -> List[Tuple[str, Dict[str, dict]]]:
    """(title, versus_reference) per panel of compare.png: pooled first, then each task and metric."""
    panels = [(f"pooled over {len(results['pooled']['metrics'])} task(s)", results["pooled"]["versus_reference"])]
    for entry in results["tasks"]:
        panels.append((f"{entry['task']} {entry['metric']}", entry["versus_reference"]))
    return panels


def harness_tables(results: dict) -> str:
    reference, confidence = results["reference"], results["confidence"]
    merges = {name: entry["merge"] for name, entry in results["models"].items()}
    pooled = results["pooled"]
    parts = [
        "Pooled over tasks (" + ", ".join(f"{task} {metric}" for task, metric in pooled["metrics"].items()) + "):",
        comparison_table(
            "mean (higher is better)", pooled["scores"], merges, reference, pooled["versus_reference"], confidence
        ),
    ]
    if "oracle" in results:
        oracle = results["oracle"]
        picks = ", ".join(f"{name} on {task}" for task, name in oracle["best_seed_per_task"].items())
        parts.append(
            f"Oracle (the best seed on each task: {picks}): pooled mean {oracle['score']:.4f}, against "
            f"{pooled['scores'][reference]:.4f} for the reference: what merging the seeds could win."
        )
    for entry in results["tasks"]:
        direction = "" if entry["higher_is_better"] else ", lower is better"
        parts.append(f"{entry['task']}, {entry['metric']} ({entry['examples']} examples{direction}):")
        parts.append(
            comparison_table(
                entry["metric"], entry["scores"], merges, reference, entry["versus_reference"], confidence
            )
        )
    legend = (
        "Examples are paired by lm-eval's doc_id; differences are model minus reference, oriented so "
        "that positive is better; better or worse only when the interval excludes 0. The pooled "
        "interval resamples tasks, then examples."
    )
    return "\n\n".join(parts) + "\n\n" + legend

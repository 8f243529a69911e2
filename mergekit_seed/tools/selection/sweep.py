"""``select``'s work: the validation and test splits, the scorers, the plan checked before anything
runs, the sweep over candidates and seeds on validation, the verdict on test (the protocol's
:func:`choose`, :func:`mean_seed` and :func:`judge`, which the demo uses too), and the
``--dry-run`` estimates."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm import tqdm

from mergekit_seed.errors import UserError
from mergekit_seed.maths.stats import paired_difference
from mergekit_seed.output import (
    remove,
    scratch_folder,
)
from mergekit_seed.reader import sha256
from mergekit_seed.references.adapter_files import is_adapter_folder
from mergekit_seed.references.hub import local_folder
from mergekit_seed.references.sera_files import CONFIG_NAME as ADAPTER_CONFIG
from mergekit_seed.references.weights import weight_file_hashes, weight_files
from mergekit_seed.runner import merge
from mergekit_seed.tools.compare import (
    DEFAULT_STOP,
    HIGHER_IS_BETTER,
    KeptBase,
    choose_metric,
    groups_of,
    load_model,
    per_example,
    read_data,
    score_model,
    score_rows,
    summary,
)
from mergekit_seed.tools.lm_eval_report import comparable_metrics, pooled_metric, read_run
from mergekit_seed.tools.lm_eval_runner import INSTALL_HINT, LmEvalBackend, evaluate_models, task_manager
from mergekit_seed.tools.selection.candidates import (
    Candidate,
    candidates,
    check_methods,
    checked_reference,
    default_grid,
    default_methods,
    our_method,
    parsed_candidates,
    read_grid,
    seed_kind,
)
from mergekit_seed.tools.selection.ledger import Ledger
from mergekit_seed.tools.selection.workers import Finish, Workers


def choose(scores: Mapping[str, float]) -> str:
    """The name with the highest score (higher is better); on a tie, the first listed."""
    if not scores:
        raise ValueError("nothing to choose from")
    return max(scores, key=scores.__getitem__)


def mean_seed(seed_values: Sequence[Sequence[float]]) -> List[float]:
    """Per example, the mean over seeds (``seed_values``: one list per seed): what one
    fine-tuning run gives on average."""
    return [statistics.fmean(row) for row in zip(*seed_values)]


def judge(
    model: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """The paired difference ``model - reference`` on test, per group (experiment) and example,
    with its bootstrap interval and verdict, as a dict."""
    differences = [[m - r for m, r in zip(mine, theirs)] for mine, theirs in zip(model, reference)]
    return paired_difference(differences, confidence, resamples, seed).to_dict()


@dataclass(frozen=True)
class Split:
    """A JSONL file of compare's format, its rows, its kind and its sha256."""

    path: Path
    kind: str
    rows: list
    sha256: str

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def examples(self) -> int:
        return len(self.rows)

    @property
    def inputs(self) -> List[Path]:
        return [self.path]

    def prompt_hashes(self) -> List[str]:
        """What makes two examples the same question: the prompt (answer rows) or the text."""
        return [_sha256(row.text if row.text is not None else row.prompt) for row in self.rows]

    def groups(self) -> Dict[str, List[int]]:
        """{group: its rows' indices} ({} when the rows have no groups)."""
        return groups_of(self.rows)

    def record(self) -> dict:
        return {"name": str(self.path), "path": str(self.path), "examples": len(self.rows), "sha256": self.sha256}


@dataclass(frozen=True)
class TaskSplit:
    """lm-eval tasks as a split: the tasks, lm-eval's settings for them, and the sha256 of every
    document's prompt (``doc_to_text``), read from the tasks' datasets before any model runs."""

    tasks: Tuple[str, ...]
    include_path: Optional[str]
    num_fewshot: Optional[int]
    limit: Optional[float]
    prompts: Tuple[str, ...]
    kind: str = "tasks"

    @property
    def name(self) -> str:
        return "lm-eval tasks " + ",".join(self.tasks)

    @property
    def examples(self) -> int:
        return len(self.prompts)

    @property
    def inputs(self) -> List[str]:
        return [self.include_path] if self.include_path else []

    def prompt_hashes(self) -> List[str]:
        return list(self.prompts)

    def record(self) -> dict:
        digest = _sha256("\n".join(self.prompts))
        return {
            "name": self.name,
            "tasks": list(self.tasks),
            "examples": len(self.prompts),
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "sha256": digest,
            "sha256_of": "the documents' prompts (doc_to_text), one per line",
        }


def read_split(path: Path, group_by: Optional[str] = None) -> Split:
    kind, rows = read_data(path, group_by)
    return Split(path=path, kind=kind, rows=rows, sha256=sha256(path))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_task_split(
    tasks: Sequence[str], include_path: Optional[str], num_fewshot: Optional[int], limit: Optional[float]
) -> TaskSplit:
    """lm-eval ``tasks`` as a split, their documents' prompts hashed (lm-eval's task manager
    and datasets; a dataset it cannot reach is one line)."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise UserError(
            f"--validation-tasks and --test-tasks run lm-evaluation-harness, which is not installed; {INSTALL_HINT}"
        ) from None
    manager = task_manager(TaskManager, tasks, include_path)
    try:
        loaded = get_task_dict(list(tasks), manager)
    except ConnectionError as error:
        raise UserError(
            f"{','.join(tasks)}: lm-eval could not fetch a task's dataset ({str(error).splitlines()[0]})"
        ) from None
    prompts = [_sha256(str(task.doc_to_text(doc))) for task in _leaf_tasks(loaded) for doc in task.eval_docs]
    return TaskSplit(tuple(tasks), include_path, num_fewshot, limit, tuple(prompts))


def _leaf_tasks(tasks: Mapping[Any, Any]) -> List[Any]:
    """The tasks of lm-eval's task dictionary, groups opened."""
    found = []
    for value in tasks.values():
        found += _leaf_tasks(value) if isinstance(value, dict) else [value]
    return found


def refuse_overlap(validation, test) -> None:
    """Refuse a test set that shares an example with validation (same prompt, by hash): a
    result judged on examples it was chosen on is inflated."""
    if validation.kind != test.kind:
        raise UserError(
            f"{test.name}: its examples are {test.kind} rows and {validation.name}'s are {validation.kind} rows; give "
            "both splits one kind"
        )
    seen = set(validation.prompt_hashes())
    shared = [index for index, digest in enumerate(test.prompt_hashes(), start=1) if digest in seen]
    if shared:
        raise UserError(
            f"{test.name}: {len(shared)} of its {test.examples} examples (the first is example {shared[0]}) have a "
            "prompt "
            f"that is also in {validation.name}; the test set must be disjoint from validation: remove them"
        )


# this process's base kept loaded for adapter scorings (each Ray worker has its own); select lets it go
KEPT_BASE = KeptBase()


@dataclass(frozen=True)
class Scorer:
    """Scores one model on one split with compare's scorers: (the model's figure, the per-example
    values the choice and the verdict compare, higher is better)."""

    metric: str
    base: Optional[str]
    tokenizer: Optional[str]
    batch_size: int = 16
    device: str = "cpu"
    stop: Tuple[str, ...] = DEFAULT_STOP
    share_base: bool = False  # adapters on this process's KEPT_BASE (scores as a fresh load's)

    def describe(self) -> Tuple[str, bool, str]:
        """(metric, whether its figure is better higher, what the choice and the verdict compare)."""
        compared = "mean log-probability per token" if self.metric == "perplexity" else self.metric
        return self.metric, HIGHER_IS_BETTER[self.metric], compared + " (higher is better)"

    def __call__(self, model: str, split: Split) -> Tuple[float, List[float]]:
        try:
            scores = score_model(
                model,
                split.rows,
                self.metric,
                self.base,
                self.tokenizer,
                self.batch_size,
                self.device,
                stop=self.stop,
                kept=KEPT_BASE if self.share_base else None,
            )
        except UserError as error:
            raise UserError(f"{split.path}: {error} for {model}") from None
        return summary(scores, self.metric), per_example(scores, self.metric)


@dataclass(frozen=True)
class TaskScorer:
    """Scores one model on lm-eval tasks (:func:`~mergekit_seed.tools.lm_eval_runner.evaluate_models`,
    the route of ``compare --tasks``): (the mean of its per-example values, those values signed
    so that higher is better), pooled over the tasks in their order, each task with ``metric``
    (else its first metric whose per-example mean is lm-eval's score)."""

    metric: Optional[str]
    base: Optional[str]
    tokenizer: Optional[str]
    batch_size: int = 16
    device: str = "cpu"
    share_base: bool = False  # adapters on this process's KEPT_BASE (scores as a fresh load's)
    backend: Optional[LmEvalBackend] = None  # lm-eval's own loader (--lm-eval-model, --model-args)

    def describe(self) -> Tuple[str, bool, str]:
        return (
            self.metric or "each task's first metric",
            True,
            "lm-eval's per-example values, signed so that higher is better",
        )

    def __call__(self, model: str, split: TaskSplit) -> Tuple[float, List[float]]:
        with scratch_folder() as scratch:
            (folder,) = evaluate_models(
                [model],
                scratch,
                split.tasks,
                base=self.base,
                tokenizer=self.tokenizer,
                device=self.device,
                batch_size=self.batch_size,
                num_fewshot=split.num_fewshot,
                limit=split.limit,
                include_path=split.include_path,
                quiet=True,
                kept=KEPT_BASE if self.share_base else None,
                backend=self.backend,
            )
            run = read_run(folder)
        raw, oriented = [], []
        for task in split.tasks:
            task_run = run.tasks[task]
            metrics = comparable_metrics([task_run], echo=lambda _line: None)
            chosen = pooled_metric(metrics, self.metric)
            if chosen is None:
                raise UserError(
                    f"--metric {self.metric}: lm-eval task {task} gives "
                    f"{', '.join(metrics) or 'no per-example metric'}"
                )
            sign = 1.0 if task_run.higher_is_better.get(chosen.split(",")[0], True) else -1.0
            values = [task_run.values[chosen][doc] for doc in sorted(task_run.values[chosen])]
            raw += values
            oriented += [sign * value for value in values]
        return statistics.fmean(raw), oriented


@dataclass
class Plan:
    """Everything a selection needs, checked before anything is merged or scored."""

    seeds: List[str]
    base: str
    kind: str
    recipes: Dict[Candidate, Any]
    validation: Union[Split, TaskSplit]
    test: Union[Split, TaskSplit]
    scorer: Union[Scorer, TaskScorer]
    grid_path: Optional[Path] = None

    @property
    def inputs(self) -> List[Any]:
        return [
            *self.seeds,
            self.base,
            *self.validation.inputs,
            *self.test.inputs,
            self.scorer.tokenizer,
            self.grid_path,
        ]

    @property
    def labels(self) -> Dict[str, str]:
        """How what is published names the local seeds and base: by their folder names (each
        made unique), never by their paths."""
        labels: Dict[str, str] = {}
        for index, path in enumerate([*self.seeds, self.base]):
            name = Path(path).name or "model"
            labels[path] = (
                name if name not in labels.values() else ("base" if path == self.base else f"seed{index + 1}")
            )
        return labels


@dataclass
class Sweep:
    """What the validation pass found: each seed's and candidate's (figure, values), the
    candidates that failed (to merge, or to score), those whose merge was byte for byte an
    earlier candidate's (``same_merge``: scored once, under the earlier name), and the folder of
    the best candidate so far."""

    seeds: Dict[str, Tuple[float, List[float]]] = field(default_factory=dict)
    candidates: Dict[Candidate, Tuple[float, List[float]]] = field(default_factory=dict)
    failures: Dict[Candidate, str] = field(default_factory=dict)
    warnings: Dict[Candidate, List[str]] = field(default_factory=dict)
    same_merge: Dict[Candidate, Candidate] = field(default_factory=dict)
    best_folder: Optional[Path] = None

    def means(self, entries: Mapping[Any, Tuple[float, List[float]]]) -> Dict[Any, float]:
        return {key: statistics.fmean(values) for key, (_, values) in entries.items()}


def plan_selection(
    seeds: Sequence[str],
    base: str,
    validation: Union[Path, TaskSplit],
    test: Union[Path, TaskSplit],
    *,
    methods: Optional[Sequence[str]] = None,
    grid: Optional[Path] = None,
    metric: Optional[str] = None,
    tokenizer: Optional[str] = None,
    batch_size: int = 16,
    device: str = "cpu",
    stop: Sequence[str] = DEFAULT_STOP,
    group_by: Optional[str] = None,
    output_rank: Optional[Union[int, str]] = None,
    lm_eval_backend: Optional[LmEvalBackend] = None,
) -> Plan:
    """Check every input of a selection and build its candidates (see :func:`select`).
    ``validation`` and ``test`` are JSONL files (compare's format, rows grouped by ``group_by``)
    or lm-eval tasks (:func:`read_task_split`), both of one kind. ``output_rank``: the adapter
    candidates' ``output.rank`` (default: exact for methods exact on factors, ``auto`` for the
    others, whose merged deltas are dense). ``lm_eval_backend``: lm-eval's own backend loads
    the models scored on lm-eval tasks (default: our loader)."""
    seeds = list(dict.fromkeys(seeds))
    if len(seeds) < 2:
        raise UserError("select needs at least two seeds")
    checked_reference(base, "--base")
    kind = seed_kind(seeds)
    found = _grid_candidates(methods, grid, kind)
    validation_split, test_split = (
        split if isinstance(split, TaskSplit) else read_split(Path(split), group_by) for split in (validation, test)
    )
    refuse_overlap(validation_split, test_split)
    share_base = kind != "full"  # every seed and candidate is an adapter on the base
    if isinstance(validation_split, TaskSplit):
        if lm_eval_backend is not None:
            lm_eval_backend.check()
        scorer = TaskScorer(metric, base, tokenizer, batch_size, device, share_base, lm_eval_backend)
    elif lm_eval_backend is not None:
        raise UserError("--lm-eval-model and --model-args apply to lm-eval tasks, not to JSONL files")
    else:
        metric = choose_metric(validation_split.kind, metric, validation_split.path)
        scorer = Scorer(metric, base, tokenizer, batch_size, device, tuple(stop), share_base)
    return Plan(
        seeds=seeds,
        base=base,
        kind=kind,
        recipes=parsed_candidates(found, base, seeds, kind, output_rank),
        validation=validation_split,
        test=test_split,
        scorer=scorer,
        grid_path=grid,
    )


def _grid_candidates(methods: Optional[Sequence[str]], grid: Optional[Path], kind: str) -> List[Candidate]:
    """The candidates of ``methods`` (default: every method that reads seeds of ``kind``) over
    ``grid`` (default: each method's own grid), both checked."""
    if methods is None:
        methods = [m for m in default_methods() if kind != "sera" or our_method(m)]
    check_methods(methods, kind)
    user_grid = None if grid is None else read_grid(grid)
    strays = [method for method in user_grid or {} if method not in methods]
    if strays:
        raise UserError(
            f"{grid}: names {', '.join(strays)}, which --methods ({', '.join(methods)}) leaves out; add it there or "
            "drop it from the grid"
        )
    return candidates(methods, default_grid() if user_grid is None else user_grid)


def sweep_validation(
    plan: Plan,
    work: Path,
    out_name: str,
    quiet: bool,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    ledger: Optional[Ledger] = None,
    workers: Optional[Workers] = None,
) -> Sweep:
    """Score every seed and every candidate on validation, merging the candidates under
    ``work`` and keeping only the best so far on disk (and, on Ray ``workers``, the candidates
    started and not yet taken). A
    candidate whose weight files (and adapter config) are byte for byte an earlier candidate's
    is not chosen in the earlier one's place: it is recorded as the same merge. What ``ledger``'s
    journal holds from an interrupted run is read back instead of done again (the winner is
    merged again at the end if its merge is not on disk). The jobs are taken in order, so the
    sweep is the same wherever they ran (:mod:`.workers`)."""
    ledger = ledger or Ledger(plan.scorer, [*plan.seeds, plan.base])
    workers = workers or Workers()
    shared_plan = workers.shared(plan)
    sweep = Sweep()
    merged: Dict[Tuple[Tuple[str, str], ...], Candidate] = {}

    def start(job: Union[str, Tuple[int, Tuple[Candidate, Any]]]) -> Finish:
        if isinstance(job, str):
            return _scoring(ledger, workers, shared_plan, ledger.seed(job), job, "validation", plan.validation)
        index, (_candidate, recipe) = job
        folder = _folder(work, index, out_name)
        return _candidate_outcome(plan, ledger, workers, shared_plan, recipe, folder, merged)

    jobs = [*plan.seeds, *enumerate(plan.recipes.items())]
    started: Deque[Finish] = deque()
    with tqdm(total=len(jobs), desc="Validation", unit="model", disable=quiet) as progress:
        for position, job in enumerate(jobs):
            while len(started) < workers.window and position + len(started) < len(jobs):
                started.append(start(jobs[position + len(started)]))
            if isinstance(job, str):
                progress.set_postfix_str(Path(job).name)
                sweep.seeds[job] = started.popleft()()
                progress.update()
                continue
            index, (candidate, _recipe) = job
            progress.set_postfix_str(candidate.name)
            outcome = started.popleft()()
            _take(plan, sweep, candidate, outcome, _folder(work, index, out_name), merged)
            if "failed" in outcome:
                _above_bar(progress, warn, f"{candidate.name}: failed, the sweep goes on: {outcome['failed']}")
            elif candidate in sweep.candidates and not quiet:
                progress.write(
                    f"  {candidate.name}: validation {plan.scorer.describe()[0]} {sweep.candidates[candidate][0]:.4f}"
                )
            progress.update()
    if not sweep.candidates:
        first = next(iter(sweep.failures.values()))
        raise UserError(f"every candidate failed to merge or to score; the first: {first}")
    if sweep.best_folder is None:  # the winner was scored by an interrupted run: its merge again
        sweep.best_folder = work / "winner" / out_name
        winner = plan.recipes[choose(sweep.means(sweep.candidates))]
        workers.submit(_merge, shared_plan, winner, sweep.best_folder, [])()
    if sweep.warnings:  # one line, not one per candidate: select.json has each candidate's
        first_candidate, messages = next(iter(sweep.warnings.items()))
        warn(
            f"{len(sweep.warnings)} of {len(plan.recipes)} candidates merged with a warning (select.json lists them); "
            f"the first, {first_candidate.name}: {messages[0]}"
        )
    return sweep


def _candidate_outcome(
    plan: Plan, ledger: Ledger, workers: Workers, shared_plan: Any, recipe: Any, folder: Path, merged: Dict
) -> Finish:
    """Start merging ``recipe`` into ``folder`` and scoring it on validation, or read its
    outcome back from an interrupted run; ``finish()`` gives the outcome, recorded. In this
    process the job runs when finished, after every earlier candidate was taken into
    ``merged``."""
    model = ledger.candidate(recipe.source)
    outcome = ledger.outcome(model, plan.validation)
    if _usable(outcome, merged):
        return lambda: outcome
    finish = workers.submit(_merge_and_score, shared_plan, recipe, folder, merged)

    def recorded() -> dict:
        outcome = finish()
        ledger.record(model, plan.validation, outcome)
        return outcome

    return recorded


def _folder(work: Path, index: int, out_name: str) -> Path:
    """Where candidate ``index`` is merged (the card's title is the folder's name)."""
    return work / f"candidate{index}" / out_name


def _score(plan: Plan, reference: str, split_name: str) -> Tuple[float, List[float]]:
    """A job: ``reference`` scored on the plan's ``split_name`` split."""
    return plan.scorer(reference, getattr(plan, split_name))


def _scoring(
    ledger: Ledger, workers: Workers, shared_plan: Any, model: dict, reference: str, split_name: str, split: Any
) -> Finish:
    """Start scoring ``reference`` (``model`` in the ledger) on ``split``, the plan's
    ``split_name``, or read it back from an interrupted run; ``finish()`` gives the score,
    recorded."""
    recorded = ledger.recorded(model, split)
    if recorded is not None:
        return lambda: recorded
    finish = workers.submit(_score, shared_plan, reference, split_name)

    def kept() -> Tuple[float, List[float]]:
        score = finish()
        ledger.keep(model, split, score)
        return score

    return kept


def _merge(plan: Plan, recipe: Any, folder: Path, warnings: List[str]) -> None:
    merge(
        recipe,
        folder,
        quiet=True,
        device=plan.scorer.device,
        random_seed=0,
        echo=lambda _line: None,
        warn=warnings.append,
    )


def _merge_and_score(plan: Plan, recipe: Any, folder: Path, merged: Mapping[Any, Candidate]) -> dict:
    """A candidate's outcome: its merge's fingerprint and warnings, and its validation score
    unless its merge is an earlier candidate's; or why it failed (a merge refused, or a merge
    that scores NaN: the others still count)."""
    warnings: List[str] = []
    try:
        _merge(plan, recipe, folder, warnings)
        fingerprint = merge_fingerprint(folder)
        outcome: Dict[str, Any] = {"fingerprint": [list(pair) for pair in fingerprint], "warnings": warnings}
        if fingerprint not in merged:
            figure, values = plan.scorer(str(folder), plan.validation)
            outcome.update(score=figure, values=values)
        return outcome
    except UserError as error:
        return {"failed": str(error), "warnings": warnings}


def _usable(outcome: Optional[dict], merged: Mapping[Any, Candidate]) -> bool:
    """A recorded outcome is used when it is a failure, a score, or an earlier candidate's merge."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("warnings", []), list):
        return False
    if isinstance(outcome.get("failed"), str):
        return True
    try:
        fingerprint = tuple((str(name), str(digest)) for name, digest in outcome["fingerprint"])
    except (KeyError, TypeError, ValueError):
        return False
    has_score = isinstance(outcome.get("score"), (int, float)) and isinstance(outcome.get("values"), list)
    return has_score or fingerprint in merged


def _take(plan: Plan, sweep: Sweep, candidate: Candidate, outcome: dict, folder: Path, merged: Dict) -> None:
    """Enter a candidate's outcome into ``sweep``, keeping its merge on disk only while it is the
    best so far (a merge read back from the journal is not on disk)."""
    if outcome.get("warnings"):
        sweep.warnings[candidate] = [str(message) for message in outcome["warnings"]]
    if "failed" in outcome:
        sweep.failures[candidate] = str(outcome["failed"])
        remove(folder.parent)
        return
    fingerprint = tuple((str(name), str(digest)) for name, digest in outcome["fingerprint"])
    if fingerprint in merged:
        sweep.same_merge[candidate] = merged[fingerprint]
        remove(folder.parent)
        return
    merged[fingerprint] = candidate
    sweep.candidates[candidate] = (float(outcome["score"]), [float(value) for value in outcome["values"]])
    if choose(sweep.means(sweep.candidates)) != candidate:
        remove(folder.parent)
        return
    if sweep.best_folder is not None:
        remove(sweep.best_folder.parent)
    sweep.best_folder = folder if folder.is_dir() else None


def merge_fingerprint(folder: Path) -> Tuple[Tuple[str, str], ...]:
    """What makes two merges the same: the sha256 of each weight file, and of the adapter config
    (its rank and alpha scale the weights) for an adapter."""
    hashes = dict(weight_file_hashes(folder))
    if is_adapter_folder(folder):
        hashes[ADAPTER_CONFIG] = sha256(folder / ADAPTER_CONFIG, folder)
    return tuple(sorted(hashes.items()))


def _above_bar(progress, warn: Callable[[str], None], message: str) -> None:
    with progress.external_write_mode():
        warn(message)


def judge_on_test(
    plan: Plan,
    sweep: Sweep,
    versus_mean_seed: bool,
    bootstrap: Tuple[float, int, int],
    ledger: Optional[Ledger] = None,
    workers: Optional[Workers] = None,
) -> dict:
    """Score the chosen candidate and the chosen seed on test (the other seeds too with
    ``versus_mean_seed``), after the choice (through ``ledger``: a scoring an interrupted run
    finished is read back; on ``workers``, all at once); their scores (the mean seed's, the
    mean of every seed's), their paired differences and verdicts, pooled and per group."""
    ledger = ledger or Ledger(plan.scorer, [*plan.seeds, plan.base])
    workers = workers or Workers()
    shared_plan = workers.shared(plan)
    winner = choose(sweep.means(sweep.candidates))
    chosen_seed = choose(sweep.means(sweep.seeds))
    others = [other for other in plan.seeds if other != chosen_seed] if versus_mean_seed else []
    merge_on_test = ledger.candidate(plan.recipes[winner].source)
    finishes = {
        winner.name: _scoring(ledger, workers, shared_plan, merge_on_test, str(sweep.best_folder), "test", plan.test),
        **{
            seed: _scoring(ledger, workers, shared_plan, ledger.seed(seed), seed, "test", plan.test)
            for seed in [chosen_seed, *others]
        },
    }
    scored = {name: finish() for name, finish in finishes.items()}
    confidence, resamples, seed = bootstrap
    verdicts = {
        "versus_best_seed": judge([scored[winner.name][1]], [scored[chosen_seed][1]], confidence, resamples, seed)
    }
    if versus_mean_seed:
        average = mean_seed([scored[name][1] for name in plan.seeds])
        verdicts["versus_mean_seed"] = judge([scored[winner.name][1]], [average], confidence, resamples, seed)
    scores = {name: figure for name, (figure, _) in scored.items()}
    if versus_mean_seed:
        scores["mean seed"] = statistics.fmean(scores[name] for name in plan.seeds)
    groups = plan.test.groups() if isinstance(plan.test, Split) else {}
    per_group = {
        group: judge(
            [[scored[winner.name][1][i] for i in rows]], [[scored[chosen_seed][1][i] for i in rows]], *bootstrap
        )
        for group, rows in groups.items()
    }
    return {
        "winner": winner.name,
        "best_seed": chosen_seed,
        "scored": list(scored),
        "scores": scores,
        **verdicts,
        **({"versus_best_seed_per_group": per_group} if per_group else {}),
    }


def validation_by_group(plan: Plan, sweep: Sweep) -> Dict[str, Any]:
    """Per group of the validation rows: every seed's and candidate's mean compared value, and
    the oracle (the best seed on each group, and what those picks make together): what merging
    the seeds could win. {} when the rows have no groups."""
    groups = plan.validation.groups() if isinstance(plan.validation, Split) else {}
    if not groups:
        return {}
    entries = {**sweep.seeds, **{candidate.name: value for candidate, value in sweep.candidates.items()}}
    per_group = {
        group: {name: statistics.fmean(values[i] for i in rows) for name, (_, values) in entries.items()}
        for group, rows in groups.items()
    }
    picks = {group: choose({seed: means[seed] for seed in sweep.seeds}) for group, means in per_group.items()}
    oracle = statistics.fmean(sweep.seeds[picks[group]][1][i] for group, rows in groups.items() for i in rows)
    return {"per_group": per_group, "oracle": {"best_seed_per_group": picks, "compared": oracle}}


def _weight_bytes(reference: str) -> int:
    return sum(file.stat().st_size for file in weight_files(local_folder(reference)))


def disk_estimate(plan: Plan, at_once: int = 1) -> int:
    """Bytes on disk at the worst moment: the best merge kept and the ``at_once`` being written
    (with the largest), and for mergekit's methods on LoRA seeds the ``BASE+ADAPTER`` models
    mergekit writes first (one full model per seed, removed after that merge)."""
    base_bytes = _weight_bytes(plan.base)
    seed_bytes = sum(_weight_bytes(seed) for seed in plan.seeds)
    sizes = []
    for candidate in plan.recipes:
        if plan.kind == "full" or not our_method(candidate.method):
            cache = len(plan.seeds) * base_bytes if plan.kind == "lora" else 0
            sizes.append((base_bytes, cache))
        else:  # an exact merge of N rank-r adapters has rank up to N * r
            sizes.append((seed_bytes, 0))
    largest_output = max(output for output, _ in sizes)
    return largest_output + min(at_once, len(sizes)) * max(output + cache for output, cache in sizes)


@dataclass(frozen=True)
class TimeEstimate:
    """--dry-run's guess, in seconds: every merge, and every scoring (validation and test)."""

    merges: float
    scorings: float

    @property
    def seconds(self) -> float:
        return self.merges + self.scorings


def time_estimate(plan: Plan, probe_rows: int = 256) -> TimeEstimate:
    """The selection's time from one measurement on this machine: loading the first seed
    (``L``) and scoring it on up to ``probe_rows`` validation examples (``S``; all of them for
    a set that small, since a few examples in small batches cost more each). A scoring is ``L``
    plus ``S`` per ``probe_rows`` examples; a merge, reading the base and every seed and
    writing one model, about ``(N + 2) L``."""
    load_model(
        plan.seeds[0], plan.base, plan.scorer.device, plan.scorer.tokenizer
    )  # the first load also pays for imports
    started = time.perf_counter()
    model, tokenizer = load_model(plan.seeds[0], plan.base, plan.scorer.device, plan.scorer.tokenizer)
    loaded = time.perf_counter()
    rows = plan.validation.rows[:probe_rows]
    score_rows(model, tokenizer, rows, plan.scorer.metric, plan.scorer.batch_size, plan.scorer.device)
    load, per_row = loaded - started, (time.perf_counter() - loaded) / len(rows)
    validation = (len(plan.seeds) + len(plan.recipes)) * (load + per_row * len(plan.validation.rows))
    return TimeEstimate(
        merges=len(plan.recipes) * (len(plan.seeds) + 2) * load,
        scorings=validation + 2 * (load + per_row * len(plan.test.rows)),
    )


def dry_run_lines(plan: Plan, workers: Optional[Workers] = None) -> List[str]:
    """What ``--dry-run`` prints: the candidates, the work, the disk and the time it will take;
    with Ray ``workers``, where the work runs and how much of it at once (the time is measured
    in one task)."""
    workers = workers or Workers()
    at_once, started = workers.at_once, workers.window
    lines = [f"{len(plan.recipes)} candidates for {len(plan.seeds)} {plan.kind} seeds on {plan.base}:"]
    lines += [f"  {candidate.name}" for candidate in plan.recipes]
    lines.append(
        f"work: {len(plan.recipes)} merges, {len(plan.seeds) + len(plan.recipes)} scorings on validation "
        f"({plan.validation.examples} examples), 2 on test ({plan.test.examples} examples)"
    )
    ray = workers.describe()
    if ray:
        lines += ray
        lines.append(
            f"ray tasks: {len(plan.seeds)} seed scorings and {len(plan.recipes)} candidates (a merge and a scoring "
            "each) on validation, then 2 scorings on test; OUT's parent must be on storage every node sees"
        )
    held = "two merges" if started == 1 else f"the best merge and {started} started, running or queued"
    megabytes = disk_estimate(plan, started) / 1e6
    lines.append(f"disk: about {megabytes:,.1f} MB at most while it runs ({held}), then one merge in OUT")
    if isinstance(plan.validation, TaskSplit):
        lines.append(
            "time: not estimated for lm-eval tasks (each scoring is one lm-eval run; time one with compare --tasks)"
        )
        return lines
    seconds = workers.submit(time_estimate, workers.shared(plan))().seconds
    how = "from loading one seed and scoring it on up to 256 validation examples"
    if not ray:
        lines.append(f"time: about {seconds:,.0f} s here ({how})")
    else:
        lines.append(
            f"time: about {seconds:,.0f} s of work, {seconds / at_once:,.0f} s with {at_once} tasks at once if each "
            f"runs as fast as the one timed ({how}, in a Ray task)"
        )
    return lines

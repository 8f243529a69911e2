"""``mergekit-seed select``: choose the merge on validation, judge it on test, publish the winner.

The candidates (:mod:`.candidates`), the validation sweep and the test verdict (:mod:`.sweep`),
the finished work kept for a resumed run (:mod:`.ledger`) and the published record
(:mod:`.record`) are modules of this package; :func:`select` runs them.

The protocol (one implementation: the demo's choice and verdict use :func:`choose`,
:func:`mean_seed` and :func:`judge` too):

1. Every candidate (a method with one setting of the grid) is merged through the real engines
   (:func:`mergekit_seed.runner.merge`) and scored on the validation set; every seed is too.
2. The candidate and the seed with the best validation score are chosen.
3. Only those two are scored on the test set, once, after the choice. The paired per-example
   difference on test, with :func:`~mergekit_seed.maths.stats.paired_difference`'s interval,
   gives the verdict ("better", "worse", "no detectable difference"). ``versus_mean_seed``
   scores the other seeds on test as well (still after the choice) for the comparison with
   the average seed.

Candidates are merged one at a time and only the best so far stays on disk (two merges at
most); with Ray (:mod:`.workers`), as many at once as the cluster holds, and only the best so
far and those not yet taken stay on disk. OUT is the winning merge, card included, with a
"Selection" section added to the card, and ``select.json``, ``select.md`` and ``select.png``
beside it. Every finished scoring is kept in ``.OUT.resume`` until OUT is published: the same
command run again after a crash, a SIGKILL or Ctrl-C reads it back instead of scoring again,
and ends with the same record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from mergekit_seed.output import OutputFolder, local_paths, remove
from mergekit_seed.quiet import libraries_quieted
from mergekit_seed.tools.selection.ledger import Ledger
from mergekit_seed.tools.selection.record import publish_winner, selection_record, summary_lines
from mergekit_seed.tools.selection.sweep import (
    KEPT_BASE,
    TaskSplit,
    judge_on_test,
    plan_selection,
    sweep_validation,
)
from mergekit_seed.tools.selection.workers import RaySettings, workers_for


def select(
    seeds: Sequence[str],
    base: str,
    validation: Union[Path, TaskSplit],
    test: Union[Path, TaskSplit],
    out: Path,
    *,
    versus_mean_seed: bool = False,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = 10_000,
    overwrite: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    warn: Optional[Callable[[str], None]] = None,
    ray: Optional[RaySettings] = None,
    **plan_settings: Any,
) -> dict:
    """Choose among ``plan_settings``' candidates (:func:`.sweep.plan_selection`: ``methods``, ``grid``,
    ``metric``, ``tokenizer``, ``batch_size``, ``device``) on ``validation``, judge the choice
    on ``test`` (JSONL files, or lm-eval tasks from :func:`.sweep.read_task_split`) and publish the winning
    merge with its record in ``out`` (:class:`~mergekit_seed.output.OutputFolder`). With ``ray``,
    the scorings and candidates run as Ray tasks (:mod:`.workers`) and the record is the same.
    Returns what select.json holds."""
    warn = warn or (lambda message: echo(f"warning: {message}"))
    # the merges' and loads' own bars and notices would break up select's one progress bar
    with libraries_quieted():
        plan = plan_selection(seeds, base, validation, test, **plan_settings)
        bootstrap = (confidence, resamples, seed)
        with OutputFolder(
            out, local_paths(plan.inputs), overwrite, command="select", labels=plan.labels, warn=warn
        ) as output:
            journal = output.resume_journal()
            try:
                ledger = Ledger(plan.scorer, [*plan.seeds, plan.base], journal)
                with workers_for(ray) as workers:
                    for line in workers.describe():
                        echo(line)
                    work = output.staging / ".sweep"
                    sweep = sweep_validation(plan, work, output.path.name, quiet, echo, warn, ledger, workers)
                    results = judge_on_test(plan, sweep, versus_mean_seed, bootstrap, ledger, workers)
                record = selection_record(plan, sweep, results, bootstrap)
                publish_winner(sweep, output.staging, record, output.public)
                remove(output.staging / ".sweep")
                output.publish()
                journal.discard()
            finally:
                journal.close()
                KEPT_BASE.clear()
        if ledger.reused:
            echo(
                f"resumed: {ledger.reused} scorings and candidate outcomes of an interrupted run read back from "
                f"{journal.path.name} instead of done again"
            )
    for line in summary_lines(record):
        echo(output.public(line))  # as select.md names the models
    return record

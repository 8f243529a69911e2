"""What ``mergekit-seed select`` costs beyond its own merges and scorings, and how good --dry-run's guess is.

    python benchmarks/select_sweep.py [--out select-bench.json]

Trains the quick demo's three LoRA seeds (experiment 1: its cached base, 250 steps each, one
thread), writes its validation and test splits as JSONL (each row's skill as its group), then in
one process:
1. ``--dry-run``'s time estimate (:func:`mergekit_seed.tools.selection.sweep.time_estimate`);
2. ``select`` with the default methods and grid, exact match, timed as a whole;
3. the same work by hand: every seed scored on validation, every candidate merged with
   ``runner.merge`` and scored on validation, then two scorings on test, each timed.
Reports select / by hand (target: near 1) and estimate / select, and keeps what select printed
and the per-group part of its select.md (docs/select.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from bench import machine  # noqa: E402


def demo_lora_seeds(root: Path):
    """The quick demo's base (from its cache) and three LoRA seeds, with validation and test JSONL."""
    from mergekit_seed.tools.demo.pipeline import SEED_COUNT, DemoConfig, cached_base, experiment_data
    from mergekit_seed.tools.demo.task import CharVocabulary
    from mergekit_seed.tools.demo.train import finetune

    config, vocabulary = DemoConfig.for_mode(quick=True), CharVocabulary()
    base = shutil.copytree(cached_base(config.base_for(0), vocabulary, quiet=True), root / "base")
    train, validation, test = experiment_data(config, 0)
    seeds = []
    for index in range(SEED_COUNT):
        seeds.append(root / f"seed{index}")
        finetune(base, seeds[-1], train, config.finetune["lora"], index, vocabulary, quiet=True)
    return base, seeds, *jsonl_splits(root, validation, test)


def jsonl_splits(root: Path, validation, test) -> list:
    """The demo's validation and test examples as compare's JSONL rows, each skill its group:
    ``root/validation.jsonl`` and ``root/test.jsonl``."""
    splits = []
    for name, examples in (("validation", validation), ("test", test)):
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "group": e.skill}) + "\n" for e in examples),
            encoding="utf-8",
        )
        splits.append(path)
    return splits


def by_hand(plan, work: Path) -> dict:
    """Seconds for the selection's merges and scorings run one by one, as a user would."""
    from mergekit_seed.runner import merge

    spent = {"merges": 0.0, "scorings": 0.0}

    def timed(kind: str, function) -> None:
        started = time.perf_counter()
        function()
        spent[kind] += time.perf_counter() - started

    for seed in plan.seeds:
        timed("scorings", lambda: plan.scorer(seed, plan.validation))
    for index, recipe in enumerate(plan.recipes.values()):
        folder = work / f"candidate{index}"
        timed(
            "merges",
            lambda: merge(
                recipe, folder, quiet=True, random_seed=0, echo=lambda _line: None, warn=lambda _message: None
            ),
        )
        timed("scorings", lambda: plan.scorer(str(folder), plan.validation))
    timed("scorings", lambda: plan.scorer(str(work / "candidate0"), plan.test))
    timed("scorings", lambda: plan.scorer(plan.seeds[0], plan.test))
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("select-bench.json"))
    args = parser.parse_args()

    from mergekit_seed.quiet import quiet_libraries
    from mergekit_seed.tools.selection import select
    from mergekit_seed.tools.selection.sweep import plan_selection, time_estimate

    torch.set_num_threads(1)
    quiet_libraries()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, seeds, validation, test = demo_lora_seeds(root / "models")
        settings = dict(metric="exact_match")
        plan = plan_selection([str(s) for s in seeds], str(base), validation, test, **settings)
        estimate = time_estimate(plan)
        printed = []
        started = time.perf_counter()
        record = select(
            [str(s) for s in seeds],
            str(base),
            validation,
            test,
            root / "out",
            quiet=True,
            echo=printed.append,
            warn=lambda _message: None,
            **settings,
        )
        selected = time.perf_counter() - started
        report = (root / "out" / "select.md").read_text(encoding="utf-8")
        manual = by_hand(plan, root / "by-hand")
    result = {
        "candidates": len(plan.recipes),
        "validation_examples": len(plan.validation.rows),
        "test_examples": len(plan.test.rows),
        "winner": record["chosen"]["candidate"],
        "verdict_versus_best_seed": record["on_test"]["versus_best_seed"]["verdict"],
        "select_seconds": round(selected, 2),
        "by_hand_seconds": {kind: round(value, 2) for kind, value in manual.items()},
        "select_over_by_hand": round(selected / sum(manual.values()), 3),
        "dry_run_estimate_seconds": {"merges": round(estimate.merges, 2), "scorings": round(estimate.scorings, 2)},
        "estimate_over_select": round(estimate.seconds / selected, 3),
        "estimate_over_by_hand": {kind: round(getattr(estimate, kind) / manual[kind], 3) for kind in manual},
        "printed": printed,
        "select_md_groups": report[report.index("Per group") :].rstrip("\n").splitlines(),
        "machine": machine("cpu"),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

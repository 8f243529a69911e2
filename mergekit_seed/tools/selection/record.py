"""``select``'s record: ``select.json``, the card's Selection section and ``select.md``,
``select.png``, and the lines the terminal gets."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from mergekit_seed.card import CARD_NAME
from mergekit_seed.finite import report_json
from mergekit_seed.output import (
    MANIFEST_NAME,
    move,
    staged_path,
    write_text,
)
from mergekit_seed.reader import read_text
from mergekit_seed.tools.compare import (
    run_record,
)
from mergekit_seed.tools.selection.sweep import Plan, Sweep


SELECTION_HEADING = "## Selection"


def selection_record(plan: Plan, sweep: Sweep, test: dict, bootstrap: Tuple[float, int, int]) -> dict:
    """select.json: the splits and their hashes, every candidate (recipe, validation score or
    failure), the seeds on validation, what was chosen and the verdict on test."""
    means = {**sweep.means(sweep.seeds), **{c.name: v for c, v in sweep.means(sweep.candidates).items()}}
    entries = []
    for candidate, recipe in plan.recipes.items():
        entry = {
            "name": candidate.name,
            "method": candidate.method,
            "parameters": dict(candidate.parameters),
            "recipe": recipe.source,
        }
        if candidate in sweep.candidates:
            entry["validation"] = {"score": sweep.candidates[candidate][0], "compared": means[candidate.name]}
        else:
            entry["failed"] = sweep.failures[candidate]
        entries.append(entry)
    metric, higher_is_better, compared_on = plan.scorer.describe()
    return {
        "seeds_kind": plan.kind,
        "base": plan.base,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "compared_on": compared_on,
        "validation": plan.validation.record(),
        "test": plan.test.record(),
        "seeds": {seed: {"score": figure, "compared": means[seed]} for seed, (figure, _) in sweep.seeds.items()},
        "candidates": entries,
        "failures": [entry["name"] for entry in entries if "failed" in entry],
        "chosen": {"candidate": test["winner"], "seed": test["best_seed"]},
        "on_test": test,
        "test_scored_once_for": test["scored"],
        **run_record(*bootstrap),
    }


def _difference(difference: dict) -> str:
    return f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]: {difference['verdict']}"


def selection_markdown(record: dict) -> str:
    """The "Selection" section of the card, and select.md: the candidates on validation, the
    chosen pair, the verdict on test and the hashes of both splits."""
    metric, test = record["metric"], record["on_test"]
    lines = [
        SELECTION_HEADING,
        "",
        f"Chosen by `mergekit-seed select` among {len(record['candidates'])} candidates on the validation set, "
        f"then judged once on the test set (scored only for {' and '.join(f'`{n}`' for n in test['scored'])}, after "
        "the choice). "
        f"Metric: {metric}; the choice and the verdict compare the per-example {record['compared_on']}.",
        "",
        f"- validation: `{record['validation']['name']}`, {record['validation']['examples']} examples, sha256 "
        f"`{record['validation']['sha256']}`",
        f"- test: `{record['test']['name']}`, {record['test']['examples']} examples, sha256 "
        f"`{record['test']['sha256']}`",
        "",
        f"| candidate | validation {metric} | compared value |",
        "|---|---|---|",
    ]
    for entry in record["candidates"]:
        mark = " (chosen)" if entry["name"] == test["winner"] else ""
        if "failed" in entry:
            lines.append(f"| {entry['name']} | failed | {entry['failed'][:120]} |")
        else:
            lines.append(
                f"| {entry['name']}{mark} | {entry['validation']['score']:.4f} | "
                f"{entry['validation']['compared']:.4f} |"
            )
    for seed, entry in record["seeds"].items():
        mark = " (best seed)" if seed == test["best_seed"] else ""
        lines.append(f"| seed `{seed}`{mark} | {entry['score']:.4f} | {entry['compared']:.4f} |")
    confidence = int(100 * record["confidence"])
    lines += [
        "",
        f"On test, `{test['winner']}` minus the best seed, per example ({confidence}% bootstrap interval): "
        f"{_difference(test['versus_best_seed'])}.",
    ]
    if "versus_mean_seed" in test:
        lines.append(
            "Minus the mean seed (every seed scored on test after the choice): "
            f"{_difference(test['versus_mean_seed'])}."
        )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """select.png: validation score per candidate and seed; the test difference with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    test = record["on_test"]
    rows = [
        (e["name"], e["validation"]["compared"], "tab:green" if e["name"] == test["winner"] else "tab:blue")
        for e in record["candidates"]
        if "validation" in e
    ]
    rows += [(f"seed {Path(s).name}", e["compared"], "tab:gray") for s, e in record["seeds"].items()]
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 1.5 + 0.35 * len(rows)), gridspec_kw={"width_ratios": [3, 2]}
    )
    # points, not bars: log-probabilities are negative and candidates differ by little
    left.scatter([value for _, value, _ in rows], range(len(rows)), color=[color for _, _, color in rows], zorder=3)
    left.grid(axis="x", alpha=0.3)
    left.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel(f"validation: per-example {record['compared_on']}")
    left.set_title("candidates on validation (green: chosen)")
    references = [key for key in ("versus_best_seed", "versus_mean_seed") if key in test]
    for position, key in enumerate(references):
        difference = test[key]
        right.errorbar(
            difference["mean"],
            position,
            xerr=[[difference["mean"] - difference["low"]], [difference["high"] - difference["mean"]]],
            fmt="o",
            capsize=4,
            color={"better": "tab:green", "worse": "tab:red"}.get(difference["verdict"], "tab:gray"),
        )
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(range(len(references)), [key.replace("versus_", "vs ").replace("_", " ") for key in references])
    right.set_ylim(-0.5, len(references) - 0.5)
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    right.set_title(f"test: {test['winner']}")
    right.set_xlabel(f"difference ({int(100 * record['confidence'])}% interval, positive is better)")
    figure.tight_layout()
    figure.savefig(staged_path(path), dpi=120)
    plt.close(figure)


def publish_winner(sweep: Sweep, staging: Path, record: dict) -> None:
    """Move the winning merge into ``staging`` (OUT), add the Selection section to its card and
    write select.json, select.md and select.png beside it."""
    for entry in sweep.best_folder.iterdir():
        if entry.name != MANIFEST_NAME:
            move(entry, staging / entry.name)
    section = selection_markdown(record)
    card = staging / CARD_NAME
    if card.is_file():
        write_text(card, read_text(card, "model card", within=staging).rstrip("\n") + "\n\n" + section)
    write_text(staging / "select.json", report_json(record, "select.json"))
    write_text(staging / "select.md", section.replace(SELECTION_HEADING, "# Selection", 1))
    plot(record, staging / "select.png")


def summary_lines(record: dict) -> List[str]:
    test = record["on_test"]
    lines = [
        f"chosen on validation: {test['winner']}; best seed on validation: {test['best_seed']}",
        f"test ({record['test']['examples']} examples, scored once, after the choice): {test['winner']} minus the "
        "best seed "
        f"{_difference(test['versus_best_seed'])}",
    ]
    if "versus_mean_seed" in test:
        lines.append(f"  minus the mean seed {_difference(test['versus_mean_seed'])}")
    if record["failures"]:
        lines.append(
            f"failed to merge or to score ({len(record['failures'])}): {', '.join(record['failures'])} (select.json "
            "says why)"
        )
    return lines

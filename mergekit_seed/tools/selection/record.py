"""``select``'s record: ``select.json``, the card's Selection section and ``select.md``,
``select.png``, and the lines the terminal gets."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Callable, List, Tuple

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
from mergekit_seed.tools.selection.sweep import Plan, Sweep, validation_by_group


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
        elif candidate in sweep.same_merge:
            entry["same_merge_as"] = sweep.same_merge[candidate].name
        else:
            entry["failed"] = sweep.failures[candidate]
        if candidate in sweep.warnings:
            entry["warnings"] = sweep.warnings[candidate]
        entries.append(entry)
    metric, higher_is_better, compared_on = plan.scorer.describe()
    groups = validation_by_group(plan, sweep)
    return {
        "seeds_kind": plan.kind,
        "base": plan.base,
        "metric": metric,
        **({"stop": list(plan.scorer.stop)} if metric == "exact_match" else {}),
        "higher_is_better": higher_is_better,
        "compared_on": compared_on,
        **_backend_record(plan.scorer),
        "validation": plan.validation.record(),
        "test": plan.test.record(),
        "seeds": {seed: {"score": figure, "compared": means[seed]} for seed, (figure, _) in sweep.seeds.items()},
        "candidates": entries,
        "failures": [entry["name"] for entry in entries if "failed" in entry],
        **({"validation_by_group": groups} if groups else {}),
        "chosen": {"candidate": test["winner"], "seed": test["best_seed"]},
        "on_test": test,
        "test_scored_once_for": test["scored"],
        **run_record(*bootstrap),
    }


def _backend_record(scorer) -> dict:
    """lm-eval's backend and its arguments when lm-eval loaded the models ({} for our loader)."""
    backend = getattr(scorer, "backend", None)
    return {} if backend is None else {"lm_eval_model": backend.model, "model_args": backend.model_args}


def _difference(difference: dict) -> str:
    return f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]: {difference['verdict']}"


def selection_markdown(record: dict) -> str:
    """The "Selection" section of the card, and select.md: the candidates on validation, the
    chosen pair and their scores on test, the verdict, per group where the rows have groups,
    and the hashes of both splits."""
    metric, test = record["metric"], record["on_test"]
    lines = [
        SELECTION_HEADING,
        "",
        f"Chosen by `mergekit-seed select` among {len(record['candidates'])} candidates on the validation set, "
        f"then judged once on the test set (scored only for {' and '.join(f'`{n}`' for n in test['scored'])}, after "
        "the choice). "
        f"Metric: {metric}{_stop_note(record)}; the choice and the verdict compare the per-example "
        f"{record['compared_on']}.{_backend_note(record)}",
        "",
        f"- validation: `{record['validation']['name']}`, {record['validation']['examples']} examples, sha256 "
        f"`{record['validation']['sha256']}`",
        f"- test: `{record['test']['name']}`, {record['test']['examples']} examples, sha256 "
        f"`{record['test']['sha256']}`",
        "",
        *_validation_table(record),
        "",
        *_test_lines(record),
        *_group_lines(record),
    ]
    return "\n".join(lines) + "\n"


def _backend_note(record: dict) -> str:
    if "lm_eval_model" not in record:
        return ""
    arguments = f" with `{record['model_args']}`" if record["model_args"] else ""
    return f" lm-eval's `{record['lm_eval_model']}` backend loaded the models{arguments}."


def _stop_note(record: dict) -> str:
    if "stop" not in record:
        return ""
    stops = ", ".join(json.dumps(term) for term in record["stop"]) or "none"
    return f" (the greedy continuation up to the end-of-sequence token or a stop, {stops}, must be the answer)"


def _validation_table(record: dict) -> List[str]:
    """The candidates and seeds on validation: their figure, and the compared value where it is
    not the figure itself (perplexity: the mean log-probability per token)."""
    metric, test = record["metric"], record["on_test"]
    both = metric == "perplexity"
    header = f"| candidate | validation {metric} |" + (" compared value |" if both else "")
    lines = [header, "|---|---|" + ("---|" if both else "")]
    for entry in record["candidates"]:
        mark = " (chosen)" if entry["name"] == test["winner"] else ""
        if "failed" in entry:
            lines.append(f"| {entry['name']} | failed: {entry['failed'][:120]} |" + (" |" if both else ""))
            continue
        if "same_merge_as" in entry:
            lines.append(
                f"| {entry['name']} | the same merge as `{entry['same_merge_as']}` |" + (" |" if both else "")
            )
            continue
        compared = f" {entry['validation']['compared']:.4f} |" if both else ""
        lines.append(f"| {entry['name']}{mark} | {entry['validation']['score']:.4f} |{compared}")
    for seed, entry in record["seeds"].items():
        mark = " (best seed)" if seed == test["best_seed"] else ""
        compared = f" {entry['compared']:.4f} |" if both else ""
        lines.append(f"| seed `{seed}`{mark} | {entry['score']:.4f} |{compared}")
    return lines


def scores_on_test_line(record: dict) -> str:
    """The chosen merge's, the best seed's (and the mean seed's) scores on test, as figures."""
    test, metric = record["on_test"], record["metric"]
    scores = [
        f"`{test['winner']}` {test['scores'][test['winner']]:.4f}",
        f"best seed `{test['best_seed']}` {test['scores'][test['best_seed']]:.4f}",
    ]
    if "mean seed" in test["scores"]:
        scores.append(f"mean seed {test['scores']['mean seed']:.4f}")
    return f"On test, {metric}: " + ", ".join(scores) + "."


def _test_lines(record: dict) -> List[str]:
    test = record["on_test"]
    confidence = int(100 * record["confidence"])
    lines = [
        scores_on_test_line(record),
        f"`{test['winner']}` minus the best seed, per example ({confidence}% bootstrap interval): "
        f"{_difference(test['versus_best_seed'])}.",
    ]
    if "versus_mean_seed" in test:
        lines.append(
            "Minus the mean seed (every seed scored on test after the choice): "
            f"{_difference(test['versus_mean_seed'])}."
        )
    return lines


def _group_lines(record: dict) -> List[str]:
    """Per group: the seeds and the chosen merge on validation, the oracle (the best seed on
    each group), and the chosen merge minus the best seed on test."""
    groups = record.get("validation_by_group")
    if not groups:
        return []
    test, names = record["on_test"], list(next(iter(groups["per_group"].values())))
    shown = [name for name in names if name in record["seeds"] or name == test["winner"]]
    lines = ["", f"Per group, validation {record['compared_on']}:", ""]
    lines += ["| group | " + " | ".join(f"`{name}`" for name in shown) + " | best seed here |"]
    lines += ["|---|" + "---|" * (len(shown) + 1)]
    for group, means in groups["per_group"].items():
        best = groups["oracle"]["best_seed_per_group"][group]
        lines.append(f"| {group} | " + " | ".join(f"{means[name]:.4f}" for name in shown) + f" | `{best}` |")
    lines += [
        "",
        f"Oracle (the best seed on each group, on validation): {groups['oracle']['compared']:.4f}, what "
        "merging the seeds could win.",
    ]
    for group, difference in test.get("versus_best_seed_per_group", {}).items():
        lines.append(f"- test, group {group}: `{test['winner']}` minus the best seed {_difference(difference)}")
    return lines


def plot(record: dict, path: Path, public: Callable[[str], str]) -> None:
    """select.png: validation score per candidate and seed; the test difference with its interval,
    under the scores on test. A picture is not a text file the provenance gate reads: every text
    drawn goes through ``public`` (:meth:`~mergekit_seed.output.OutputFolder.public`) first."""
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
    rows += [(public(f"seed {s}"), e["compared"], "tab:gray") for s, e in record["seeds"].items()]
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
    right.set_title("\n".join(textwrap.wrap(public(scores_on_test_line(record).replace("`", "")), 60)), fontsize=8)
    right.set_xlabel(f"difference ({int(100 * record['confidence'])}% interval, positive is better)")
    figure.tight_layout()
    figure.savefig(staged_path(path), dpi=120)
    plt.close(figure)


def publish_winner(sweep: Sweep, staging: Path, record: dict, public: Callable[[str], str]) -> None:
    """Move the winning merge into ``staging`` (OUT), add the Selection section to its card and
    write select.json, select.md and select.png (its texts through ``public``) beside it."""
    for entry in sweep.best_folder.iterdir():
        if entry.name != MANIFEST_NAME:
            move(entry, staging / entry.name)
    section = selection_markdown(record)
    card = staging / CARD_NAME
    if card.is_file():
        write_text(card, read_text(card, "model card", within=staging).rstrip("\n") + "\n\n" + section)
    write_text(staging / "select.json", report_json(record, "select.json"))
    write_text(staging / "select.md", section.replace(SELECTION_HEADING, "# Selection", 1))
    plot(record, staging / "select.png", public)


def summary_lines(record: dict) -> List[str]:
    test = record["on_test"]
    lines = [
        f"chosen on validation: {test['winner']}; best seed on validation: {test['best_seed']}",
        scores_on_test_line(record).replace("`", ""),
        f"test ({record['test']['examples']} examples, scored once, after the choice): {test['winner']} minus the "
        "best seed "
        f"{_difference(test['versus_best_seed'])}",
    ]
    if "versus_mean_seed" in test:
        lines.append(f"  minus the mean seed {_difference(test['versus_mean_seed'])}")
    for group, difference in test.get("versus_best_seed_per_group", {}).items():
        lines.append(f"  group {group}: minus the best seed {_difference(difference)}")
    same = [entry for entry in record["candidates"] if "same_merge_as" in entry]
    if same:
        lines.append(
            f"the same merge as an earlier candidate, scored once ({len(same)}): "
            + ", ".join(f"{entry['name']} = {entry['same_merge_as']}" for entry in same)
        )
    if record["failures"]:
        lines.append(
            f"failed to merge or to score ({len(record['failures'])}): {', '.join(record['failures'])} (select.json "
            "says why)"
        )
    return lines

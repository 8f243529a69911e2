"""The demo's shipped numbers, and how a fresh run compares with them.

The docs ship one full run per torch CPU kernel setting (``ATEN_CPU_CAPABILITY``), as
``docs/demo-results-<capability>.json``. Float kernels round differently, so the same seeds
train to different models under different kernels: the docs give ranges across those runs and
the one verdict that holds under all of them. ``shipped.json`` beside this module carries that
summary inside the package, so that a user's ``mergekit-seed demo`` can say whether its own
numbers fall inside the range and whether its verdict agrees (a test holds the summary equal to
the shipped files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from mergekit_seed.maths.stats import BETTER
from mergekit_seed.reader import read_json_object, read_text
from mergekit_seed.tools.demo.pipeline import best_seed, render_markdown


SUMMARY_FILE = Path(__file__).with_name("shipped.json")


def beaten_by(results: dict) -> List[str]:
    """ "SETTING METHOD vs best|mean seed" for every merge whose test verdict is "better"."""
    return [
        f"{setting} {method} vs {reference} seed"
        for setting, entry in results["settings"].items()
        for reference in ("best", "mean")
        for method, difference in entry[f"versus_{reference}_seed"].items()
        if difference["verdict"] == BETTER
    ]


def verdict(results: dict) -> str:
    """The run's verdict in one sentence: whether any merge beats the best or the mean seed."""
    beaten = beaten_by(results)
    if not beaten:
        return "no merge of any method beats the best or the mean seed"
    return "better than the seeds on test: " + ", ".join(beaten)


def run_summary(results: dict) -> dict:
    """What a fresh run is compared on: per setting, the mean seed's and the best of ours'
    test accuracy and the best of ours against the best seed; and the verdict."""
    settings = {}
    for setting, entry in results["settings"].items():
        ours = entry["best_of_ours_by_validation"]
        settings[setting] = {
            "mean_seed": entry["mean_seed"],
            "best_seed": best_seed(entry),
            "best_of_ours": ours,
            "best_of_ours_accuracy": entry["methods"][ours],
            "best_of_ours_vs_best_seed": entry["versus_best_seed"][ours]["mean"],
        }
    environment = results["environment"]
    return {
        "capability": environment["cpu_capability"],
        "cpu": environment["cpu"],
        "seconds": results.get("seconds"),
        "settings": settings,
        "verdict": verdict(results),
    }


def summarise_files(files: Sequence[Path]) -> dict:
    """shipped.json: every shipped run's summary, in the order given."""
    return {"runs": [run_summary(read_json_object(Path(file), "demo results file")) for file in files]}


def write_summary(files: Sequence[Path], path: Path = SUMMARY_FILE) -> None:
    path.write_text(json.dumps(summarise_files(files), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def shipped() -> dict:
    return read_json_object(SUMMARY_FILE, "the demo's shipped summary")


def ranges(summary: dict) -> Dict[str, Dict[str, tuple]]:
    """Per setting and quantity: (lowest, highest) across the shipped runs."""
    runs = summary["runs"]
    return {
        setting: {
            key: (
                min(run["settings"][setting][key] for run in runs),
                max(run["settings"][setting][key] for run in runs),
            )
            for key in ("mean_seed", "best_seed", "best_of_ours_accuracy", "best_of_ours_vs_best_seed")
        }
        for setting in runs[0]["settings"]
    }


def shared_verdict(summary: dict) -> str:
    """The verdict every shipped run gives, or what separates them."""
    verdicts = {run["verdict"] for run in summary["runs"]}
    if len(verdicts) == 1:
        return verdicts.pop()
    return "the shipped runs disagree: " + "; ".join(
        f"{run['capability']}: {run['verdict']}" for run in summary["runs"]
    )


def explain(results: dict, summary: dict) -> List[str]:
    """The demo's closing lines: its kernels, and where its numbers fall against the shipped ones."""
    capability = results["environment"]["cpu_capability"]
    shipped_kernels = ", ".join(run["capability"] for run in summary["runs"])
    lines = [f"torch CPU capability: {capability} (shipped runs: {shipped_kernels})"]
    if results["config"]["quick"]:
        lines.append(
            "--quick trains less than the shipped full runs: its numbers are not comparable with docs/demo.md"
        )
        return lines
    mine, known = run_summary(results), ranges(summary)
    outside = [
        f"{setting} {100 * entry['mean_seed']:.1f}% (shipped "
        f"{100 * known[setting]['mean_seed'][0]:.1f}-{100 * known[setting]['mean_seed'][1]:.1f}%)"
        for setting, entry in mine["settings"].items()
        if not known[setting]["mean_seed"][0] <= entry["mean_seed"] <= known[setting]["mean_seed"][1]
    ]
    agreement = "agrees with" if mine["verdict"] == shared_verdict(summary) else "differs from"
    if outside:
        lines.append(
            "mean seed accuracy outside the shipped range: "
            + ", ".join(outside)
            + "; float kernels (CPU, ATEN_CPU_CAPABILITY, torch build) change how the same seeds train"
        )
    else:
        lines.append("mean seed accuracy inside the shipped range in every setting")
    lines.append(f"this run's verdict ({mine['verdict']}) {agreement} the shipped one ({shared_verdict(summary)})")
    return lines


def readme_sentence(summary: dict) -> str:
    """The README's outcome: the verdict every shipped run gives, with ranges across them."""
    known = ranges(summary)

    def span(low: float, high: float, unit: str, signed: bool = False) -> str:
        form = "{:+.1f}" if signed else "{:.1f}"
        return (
            form.format(100 * low)
            + (f" to {form.format(100 * high)}" if round(100 * low, 1) != round(100 * high, 1) else "")
            + unit
        )

    kernels = ", ".join(run["capability"] for run in summary["runs"])
    seeds = "; ".join(f"{setting} {span(*values['mean_seed'], '%')}" for setting, values in known.items())
    ours = "; ".join(
        f"{setting} {span(*values['best_of_ours_vs_best_seed'], ' pt', signed=True)}"
        for setting, values in known.items()
    )
    return (
        f"Across {len(summary['runs'])} full runs under torch's {kernels} CPU kernels: {shared_verdict(summary)}. "
        f"Mean seed accuracy on test: {seeds}. Best of ours (chosen on validation) against the best seed: {ours}."
    )


def results_section(files: Sequence[Path]) -> str:
    """docs/demo.md's generated section: every shipped run's tables, headed by its kernels."""
    sections = []
    for file in files:
        results = read_json_object(Path(file), "demo results file")
        heading = f"### {results['environment']['cpu_capability']} kernels ([{Path(file).name}]({Path(file).name}))"
        sections.append(heading + "\n\n" + render_markdown(results))
    return "\n".join(sections)


def update_docs(files: Sequence[Path], page: Path, readme: Path) -> None:
    """After shipping full runs (``docs/demo-results-<capability>.json``): write shipped.json,
    put :func:`results_section` into ``page`` (docs/demo.md) and :func:`readme_sentence` into
    ``readme`` between their markers; tests/test_demo.py checks all three."""
    write_summary(files)
    write_between_markers(page, "results", results_section(files))
    write_between_markers(readme, "demo", readme_sentence(summarise_files(files)) + "\n")


def write_between_markers(path: Path, name: str, content: str) -> None:
    """Replace what ``path`` holds between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    text = read_text(path, "page")
    before, rest = text.split(f"<!-- {name}:begin -->\n", 1)
    _, after = rest.split(f"<!-- {name}:end -->", 1)
    Path(path).write_text(
        before + f"<!-- {name}:begin -->\n" + content + f"<!-- {name}:end -->" + after, encoding="utf-8"
    )

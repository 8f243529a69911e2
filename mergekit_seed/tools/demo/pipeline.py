"""``mergekit-seed demo``: does merging seeds beat the best seed, on a model a laptop can train?

1. A tiny LLaMA base (character vocabulary) is pre-trained on a synthetic corpus and cached
   under the user cache folder, keyed by its configuration. It half-knows the five-skill task
   (``demo/task.py``), as a pre-trained LLM half-knows a fine-tuning task.
2. Each experiment draws three disjoint splits: train, validation (to choose) and test (to
   judge). For each setting (LoRA, SeRA, full fine-tuning), three seeds are fine-tuned on
   train, differing only in the random seed (init, data order), on one thread with torch's
   deterministic algorithms.
3. Every seed, our four methods and mergekit's ``linear`` (Model Soup), ``ties`` and
   ``dare_ties`` are scored by greedy exact match on validation and on test, per skill.
   Merges run through the real engines: ``mergekit-seed run`` (mergekit's pipeline for full
   checkpoints and ``BASE+ADAPTER``, our adapter engine for adapter folders).
4. On test, each merge is compared with the best seed (the one with the highest validation
   accuracy) and with the mean seed, example by example: the mean difference and a 95%
   bootstrap interval over experiments and examples (:mod:`mergekit_seed.maths.stats`), and a
   verdict that says better or worse only when the interval excludes zero. The seed oracle
   and the seeds' disagreement say how much there was to fuse; the regime (each skill's mean
   seed accuracy, the disagreement) is reported on validation.
5. A table in the papers' layout, ``results.json`` (with the library versions, the CPU and its
   kernel capability, threads and full configuration) and a chart are written to ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from mergekit_seed.errors import UserError
from mergekit_seed.installed import package_version
from mergekit_seed.methods import our_methods
from mergekit_seed.output import OutputFolder, copy_tree, read_manifest, staged_path, write_text
from mergekit_seed.quiet import quiet_libraries
from mergekit_seed.reader import read_lines, read_text
from mergekit_seed.references.sera_files import load_sera
from mergekit_seed.references.sera_layer import merge_sera
from mergekit_seed.runner import merge
from mergekit_seed.tools.compare import compare
from mergekit_seed.tools.demo.task import SKILLS, CharVocabulary, accuracy_by_skill, exact_matches, make_examples
from mergekit_seed.tools.demo.train import (
    BaseConfig,
    FinetuneConfig,
    build_base,
    finetune,
    load_for_eval,
    pretraining_prompts,
    save_checkpoint,
    seed_names,
)
from mergekit_seed.tools.selection.candidates import MERGEKIT_METHODS, Candidate, recipe_text
from mergekit_seed.tools.selection.sweep import choose, judge, mean_seed


LOG = logging.getLogger("mergekit_seed")
SETTINGS = ("lora", "sera", "full")
SEED_COUNT = 3


def ours() -> Tuple[str, ...]:
    """Our methods the demo merges with: those of methods.METHODS whose spec says ``in_demo``."""
    return tuple(method.spec.name for method in our_methods() if method.in_demo)


def candidates() -> Dict[str, Candidate]:
    """What the demo merges: each method at its defaults, mergekit's sparsifying methods at
    density 0.5 (selection.candidates.recipe_text gives mergekit's methods their per-model weights)."""
    return {
        method: Candidate(method, (("density", 0.5),) if method in ("ties", "dare_ties") else ())
        for method in ours() + MERGEKIT_METHODS
    }


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the demo's numbers."""

    quick: bool = False
    # 2: every experiment pre-trains its own base (issue 38); 1 shared one base across experiments
    protocol: int = 2
    experiments: int = 3
    # a model this small trains fastest on one thread, and a busy machine slows more threads down
    threads: int = 1
    train_per_skill: int = 400
    eval_per_skill: int = 60
    data_seed: int = 1234
    base: BaseConfig = field(default_factory=BaseConfig)
    finetune: Dict[str, FinetuneConfig] = field(
        default_factory=lambda: {
            "lora": FinetuneConfig("lora", steps=400, lr=1e-2),
            "sera": FinetuneConfig("sera", steps=400, lr=1e-2, rank=16, split=4),
            "full": FinetuneConfig("full", steps=400, lr=3e-3),
        }
    )

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoConfig":
        if not quick:
            return cls()
        return cls(
            quick=True,
            experiments=1,
            eval_per_skill=30,
            finetune={
                "lora": FinetuneConfig("lora", steps=250, lr=1e-2),
                "sera": FinetuneConfig("sera", steps=250, lr=1e-2, rank=16, split=4),
                "full": FinetuneConfig("full", steps=250, lr=3e-3),
            },
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def base_for(self, experiment: int) -> BaseConfig:
        """Experiment ``experiment``'s base: pre-trained with its own seed, so that the
        experiments are independent draws of the whole pipeline (base, data, fine-tunes)."""
        return replace(self.base, seed=self.base.seed + experiment)


def cache_dir() -> Path:
    root = os.environ.get("MERGEKIT_SEED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-seed"
    )
    return Path(root)


def cached_base(config: BaseConfig, vocabulary: CharVocabulary, quiet: bool) -> Path:
    """The pre-trained base for ``config``, built once and kept under the cache folder
    (published through the output protocol: a run killed while building it leaves nothing
    half-built, and two runs building it at once wait for each other)."""
    import torch

    # keyed by everything that shapes the base: its configuration (its seed included), the
    # alphabet, the code that builds the corpus and trains it, and the float kernels torch
    # trains it with (ATEN_CPU_CAPABILITY: another rounding trains another base)
    code = "".join(read_text(Path(__file__).with_name(name), "Python source") for name in ("task.py", "train.py"))
    capability = torch.backends.cpu.get_cpu_capability()
    key = hashlib.sha256(
        json.dumps([asdict(config), vocabulary.alphabet, code, capability], sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"demo-base-{key}"
    if (path / "model.safetensors").is_file():
        return path
    return build_base(path, config, vocabulary, quiet)


def experiment_data(config: DemoConfig, experiment: int):
    """The training, validation and test examples of one experiment: three disjoint sets, and
    no validation or test prompt was seen in training or pre-training."""
    train = make_examples(config.train_per_skill, config.data_seed + experiment)
    seen = {e.prompt for e in train} | pretraining_prompts(config.base_for(experiment))
    validation = make_examples(config.eval_per_skill, config.data_seed + 10_000 + experiment, frozenset(seen))
    seen |= {e.prompt for e in validation}
    test = make_examples(config.eval_per_skill, config.data_seed + 20_000 + experiment, frozenset(seen))
    return train, validation, test


def seed_regime(examples: List, correct_per_seed: List[List[bool]]) -> dict:
    """What the seeds of one experiment are like on ``examples``: each skill's mean seed
    accuracy, the share of examples on which the seeds disagree (some solve it, some do not),
    and the seed oracle (an example counts when any seed solves it: the ceiling for fusion)."""
    seeds = len(correct_per_seed)
    per_example = list(zip(*correct_per_seed))
    mean_seed = {
        skill: statistics.fmean(accuracy_by_skill(examples, correct)[skill] for correct in correct_per_seed)
        for skill in SKILLS
    }
    return {
        "mean_seed_per_skill": mean_seed,
        "disagreement": statistics.fmean(0 < sum(row) < seeds for row in per_example),
        "oracle": statistics.fmean(any(row) for row in per_example),
    }


def compare_full_setting(config: DemoConfig, work: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> None:
    """The last step: `mergekit-seed compare` on the first experiment's full fine-tunes and our
    merges of them, scoring each held-out answer's log-probability (no generation), pooled and
    per skill (each row's group), with the oracle (the best seed on each skill). ``work`` is
    the demo's staging folder, published as ``out``: the report names every model as ``out``
    will hold it, relative to the folder the demo was started in, as --out was typed."""
    _, _, held_out = experiment_data(config, 0)
    data = write_text(
        work / "compare-data.jsonl",
        "".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "group": e.skill}) + "\n" for e in held_out),
    )
    models = [work / "models" / "full" / name for name in seed_names(SEED_COUNT)]
    models += [work / "merges" / "full" / method for method in ours()]

    def shown(path: Path) -> str:
        published = out / path.relative_to(work)
        return os.path.relpath(published) if published.is_relative_to(Path.cwd()) else str(published)

    echo("")
    echo("mergekit-seed compare, full setting of experiment 1, answer log-probability:")
    compare(
        [str(m) for m in models],
        data,
        work / "compare",
        metric="answer_logprob",
        quiet=quiet,
        echo=echo,
        labels={str(path): shown(path) for path in [*models, data]},
    )


def run_experiment(
    experiment: int,
    config: DemoConfig,
    out: Path,
    vocabulary: CharVocabulary,
    quiet: bool,
    echo: Callable[[str], None],
) -> Dict[str, dict]:
    """Pre-train this experiment's base, then train, merge and evaluate every setting once;
    returns accuracies per setting."""
    from mergekit.options import MergeOptions

    base = cached_base(config.base_for(experiment), vocabulary, quiet)
    echo(f"  base model: {base}")
    train, validation, test = experiment_data(config, experiment)
    models = out / "models" if experiment == 0 else out / f"experiment{experiment}" / "models"
    merges = models.parent / "merges"
    if not (models / "base").exists():
        copy_tree(base, models / "base")
    options = MergeOptions(quiet=True, random_seed=experiment)  # DARE's drops are random

    def score(model) -> dict:
        return _score(model, validation, test, vocabulary)

    results: Dict[str, dict] = {}
    for setting in SETTINGS:
        seeds = [
            _finetuned(models, setting, index, train, config, 1000 * experiment + index, vocabulary, quiet)
            for index in range(SEED_COUNT)
        ]
        accuracy = {
            name: score(load_for_eval(models / "base", seed, setting))
            for name, seed in zip(seed_names(SEED_COUNT), seeds)
        }
        mergekit_kind, mergekit_inputs = _mergekit_baseline_inputs(models, setting, seeds, vocabulary)
        for method, candidate in candidates().items():
            is_ours = method in ours()
            kind, inputs = (setting, seeds) if is_ours else (mergekit_kind, mergekit_inputs)
            recipe = write_text(
                merges / setting / f"{method}.yml",
                recipe_text(candidate, str(models / "base"), [str(i) for i in inputs], kind),
            )
            merged = merges / setting / method
            # the demo keeps two-stage and LoRE adapters exact, whatever their size: no size warning
            merge(recipe, merged, options, overwrite=True, echo=echo, warn=lambda message: LOG.info(message))
            accuracy[method] = score(
                load_for_eval(models / "base", merged, "lora" if is_ours and setting != "full" else "full")
            )
        results[setting] = accuracy
        echo(_setting_line(setting, accuracy))
    return results


def _finetuned(
    models: Path,
    setting: str,
    index: int,
    train,
    config: DemoConfig,
    seed: int,
    vocabulary: CharVocabulary,
    quiet: bool,
) -> Path:
    """The fine-tune of seed ``index`` for ``setting`` (trained now unless the cache holds it)."""
    seed_path = models / setting / f"seed{index}"
    if not seed_path.exists():
        finetune(models / "base", seed_path, train, config.finetune[setting], seed, vocabulary, quiet)
    return seed_path


def _score(model, validation, test, vocabulary: CharVocabulary) -> dict:
    """Exact-match accuracy per skill on validation and test, and which examples were right."""
    scores = {}
    for split, examples in (("validation", validation), ("test", test)):
        correct = exact_matches(model, examples, vocabulary)
        scores[split] = {**accuracy_by_skill(examples, correct), "correct": [int(c) for c in correct]}
    return scores


def _mergekit_baseline_inputs(models: Path, setting: str, seeds: List[Path], vocabulary: CharVocabulary):
    """The seed kind and inputs that mergekit's own methods merge for ``setting``: the seeds
    themselves (LoRA through mergekit's ``BASE+ADAPTER``), and for SeRA, which PEFT cannot
    load, the seeds merged into full checkpoints."""
    if setting in ("full", "lora"):
        return setting, seeds
    inputs = []
    for index, seed_path in enumerate(seeds):
        full_path = models / "sera-as-full" / f"seed{index}"
        if not full_path.exists():
            model = merge_sera(load_sera(load_for_eval(models / "base", models / "base", "full"), seed_path))
            save_checkpoint(model, full_path, vocabulary)
        inputs.append(full_path)
    return "full", inputs


def _setting_line(setting: str, accuracy: Dict[str, dict]) -> str:
    names = seed_names(SEED_COUNT)
    best = max(names, key=lambda n: accuracy[n]["validation"]["all"])
    return (
        f"  {setting} (test): seeds "
        + " / ".join(f"{100 * accuracy[n]['test']['all']:.1f}" for n in names)
        + f" (best on validation: {best}); "
        + ", ".join(f"{m} {100 * accuracy[m]['test']['all']:.1f}" for m in ours() + MERGEKIT_METHODS)
    )


def summarise(runs: List[Dict[str, dict]], config: DemoConfig) -> dict:
    """results.json: test accuracies (means over experiments), the seeds' regime on validation,
    and every merge against the validation-chosen best seed and the mean seed, on test."""
    seed_columns = seed_names(SEED_COUNT)
    splits = [dict(zip(("validation", "test"), experiment_data(config, index)[1:])) for index in range(len(runs))]
    settings = {}
    for setting in SETTINGS:
        experiments = [run[setting] for run in runs]
        names = list(experiments[0])
        methods = [n for n in names if n not in seed_columns]

        def mean_of(name: str, split: str, key: str = "all") -> float:
            return statistics.fmean(e[name][split][key] for e in experiments)

        regimes = {
            split: [
                seed_regime(splits[index][split], [e[n][split]["correct"] for n in seed_columns])
                for index, e in enumerate(experiments)
            ]
            for split in ("validation", "test")
        }
        validation_regime = _regime_on_validation(regimes["validation"])
        best_seeds = [choose({n: e[n]["validation"]["all"] for n in seed_columns}) for e in experiments]
        ours_on_validation = {m: mean_of(m, "validation") for m in ours()}
        entry = {
            "seeds": {n: mean_of(n, "test") for n in seed_columns},
            "methods": {n: mean_of(n, "test") for n in methods},
            "validation": {n: mean_of(n, "validation") for n in names},
            "per_skill": {n: {skill: mean_of(n, "test", skill) for skill in SKILLS} for n in names},
            "mean_seed": statistics.fmean(mean_of(n, "test") for n in seed_columns),
            "best_seed_by_validation": best_seeds,
            "best_seed_per_experiment": [e[best]["test"]["all"] for e, best in zip(experiments, best_seeds)],
            "oracle": statistics.fmean(r["oracle"] for r in regimes["test"]),
            "disagreement": statistics.fmean(r["disagreement"] for r in regimes["test"]),
            "regime_on_validation": validation_regime,
            "versus_best_seed": versus_best_seed(experiments, methods, best_seeds),
            "versus_mean_seed": versus_mean_seed(experiments, methods),
            "best_of_ours_by_validation": choose(ours_on_validation),
        }
        if len(runs) > 1:
            entry["std"] = {n: statistics.stdev(e[n]["test"]["all"] for e in experiments) for n in names}
        settings[setting] = entry
    return {
        "task": {
            "description": "op:input=output string and arithmetic transformations, exact match under greedy decoding",
            "skills": list(SKILLS),
            "eval_examples_per_skill": config.eval_per_skill,
            "splits": "train / validation (choose) / test (judge), disjoint prompts",
        },
        "settings": settings,
        "config": config.to_dict(),
        "experiments": len(runs),
        "environment": environment(config),
    }


def _regime_on_validation(regimes: List[dict]) -> dict:
    """The seeds' regime on validation, averaged over experiments, with the papers' criteria
    (every skill's mean seed accuracy between 20% and 90%, the seeds disagreeing on 10% or more)."""
    regime = {
        "mean_seed_per_skill": {
            skill: statistics.fmean(r["mean_seed_per_skill"][skill] for r in regimes) for skill in SKILLS
        },
        "disagreement": statistics.fmean(r["disagreement"] for r in regimes),
        "oracle": statistics.fmean(r["oracle"] for r in regimes),
    }
    regime["criteria"] = {
        "every_skill_between_20_and_90": all(0.2 <= v <= 0.9 for v in regime["mean_seed_per_skill"].values()),
        "disagreement_at_least_10": regime["disagreement"] >= 0.1,
    }
    return regime


def versus_best_seed(experiments: List[dict], methods: List[str], best_seeds: List[str]) -> Dict[str, dict]:
    """Per method: the paired test difference to each experiment's best seed, the one chosen
    by its validation accuracy, with a 95% bootstrap interval and a verdict."""
    return {
        method: judge(
            [e[method]["test"]["correct"] for e in experiments],
            [e[best]["test"]["correct"] for e, best in zip(experiments, best_seeds)],
        )
        for method in methods
    }


def versus_mean_seed(experiments: List[dict], methods: List[str]) -> Dict[str, dict]:
    """Per method: the paired test difference to the mean seed (per example, the share of
    seeds that solve it: what one fine-tuning run gives on average), interval and verdict."""
    seed_columns = seed_names(SEED_COUNT)
    average = [mean_seed([e[n]["test"]["correct"] for n in seed_columns]) for e in experiments]
    return {method: judge([e[method]["test"]["correct"] for e in experiments], average) for method in methods}


def environment(config: DemoConfig) -> dict:
    """What the numbers were measured with: library versions, device, threads, the CPU and the
    kernels torch dispatches to on it (``ATEN_CPU_CAPABILITY`` overrides them)."""
    import torch

    packages = ("torch", "transformers", "peft", "mergekit", "mergekit-seed", "numpy", "safetensors", "tokenizers")
    return {
        "versions": {name: package_version(name) for name in packages},
        "python": platform.python_version(),
        "device": "cpu",
        "threads": config.threads,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        for line in read_lines("/proc/cpuinfo", "CPU description", 1 << 20):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except UserError:
        pass
    return platform.processor() or "unknown"


def best_seed(entry: dict) -> float:
    """The validation-chosen best seed's test accuracy, averaged over experiments."""
    return statistics.fmean(entry["best_seed_per_experiment"])


LEGEND = (
    "Exact match on the test split in %, mean ± standard deviation over experiments. Each "
    "experiment has three disjoint splits: train, validation and test. Best seed = the seed with "
    "the highest validation accuracy in each experiment, scored on test; mean seed = the average "
    "seed (what one fine-tuning run gives); oracle = an example counts when any seed solves it "
    "(the ceiling for fusing the seeds); disagreement = test examples some seeds solve and others "
    "do not. Versus best / mean seed: the mean difference on test in percentage points, example by "
    "example, with a 95% bootstrap interval over experiments and examples; better or worse only "
    "when the interval excludes 0."
)


def format_table(results: dict) -> str:
    """The papers' layout: one row per setting, seeds then methods, then the reference points."""
    columns = seed_names(SEED_COUNT) + list(ours()) + list(MERGEKIT_METHODS)
    header = "| setting | " + " | ".join(columns) + " | mean seed | best seed | oracle | disagreement |"
    lines = [header, "|" + "---|" * (len(columns) + 5)]
    for setting, entry in results["settings"].items():
        values = {**entry["seeds"], **entry["methods"]}
        spread = entry.get("std", {})
        cells = [f"{100 * values[c]:.1f}" + (f" ± {100 * spread[c]:.1f}" if c in spread else "") for c in columns]
        references = [entry["mean_seed"], best_seed(entry), entry["oracle"], entry["disagreement"]]
        lines.append(
            f"| {setting} | " + " | ".join(cells) + " | " + " | ".join(f"{100 * v:.1f}" for v in references) + " |"
        )
    return "\n".join(lines)


def format_regime(results: dict) -> str:
    """The seeds on validation, where the configuration was chosen: each skill's mean seed
    accuracy (the regime wants 20-90%) and the disagreement (at least 10%)."""
    lines = [
        "| seeds on validation | " + " | ".join(SKILLS) + " | disagreement | oracle | criteria met |",
        "|" + "---|" * (len(SKILLS) + 4),
    ]
    for setting, entry in results["settings"].items():
        regime = entry["regime_on_validation"]
        cells = [f"{100 * regime['mean_seed_per_skill'][skill]:.1f}" for skill in SKILLS]
        met = (
            "yes"
            if all(regime["criteria"].values())
            else "no: " + ", ".join(k for k, v in regime["criteria"].items() if not v)
        )
        lines.append(
            f"| {setting} | "
            + " | ".join(cells)
            + f" | {100 * regime['disagreement']:.1f} | {100 * regime['oracle']:.1f} | {met} |"
        )
    return "\n".join(lines)


def format_verdicts(results: dict) -> str:
    """Per setting and reference (best seed, mean seed): each merge's difference, interval and verdict."""
    columns = list(ours()) + list(MERGEKIT_METHODS)
    lines = ["| versus | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for reference in ("best seed", "mean seed"):
        key = "versus_" + reference.replace(" ", "_")
        for setting, entry in results["settings"].items():
            cells = []
            for method in columns:
                difference = entry[key][method]
                cells.append(
                    f"{100 * difference['mean']:+.1f} [{100 * difference['low']:+.1f}, "
                    f"{100 * difference['high']:+.1f}] {difference['verdict']}"
                )
            lines.append(f"| {reference}, {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(difference: dict) -> str:
    return f"{100 * difference['mean']:+.1f} pt [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"


def verdict_lines(results: dict) -> List[str]:
    """Per setting: the best of our methods on validation against the best and the mean seed on test."""
    lines = []
    for setting, entry in results["settings"].items():
        ours = entry["best_of_ours_by_validation"]
        lines.append(
            f"{setting}: {ours} (best of ours on validation) vs best seed "
            f"{_interval(entry['versus_best_seed'][ours])}, "
            f"vs mean seed {_interval(entry['versus_mean_seed'][ours])}; seeds {100 * entry['mean_seed']:.1f}% on "
            "average, "
            f"oracle {100 * entry['oracle']:.1f}%"
        )
    return lines


def render_markdown(results: dict) -> str:
    """results.md, and the results section of docs/demo.md: the tables, the legend, the verdicts."""
    return (
        "\n\n".join(
            [
                format_table(results),
                format_verdicts(results),
                LEGEND,
                "\n".join(f"- {line}" for line in verdict_lines(results)),
                format_regime(results),
            ]
        )
        + "\n"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = seed_names(SEED_COUNT) + list(ours()) + list(MERGEKIT_METHODS)
    methods = list(ours()) + list(MERGEKIT_METHODS)
    settings = list(results["settings"])
    figure, axes = plt.subplots(3, 1, figsize=(11, 10.5))
    bars = axes[0]
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        values = [100 * {**e["seeds"], **e["methods"]}[column] for e in results["settings"].values()]
        bars.bar([s + index * width for s in range(len(settings))], values, width, label=column)
    for position, entry in enumerate(results["settings"].values()):
        span = (position - width / 2, position + 0.8 - width / 2)
        for value, style, label in ((entry["oracle"], "--", "oracle"), (entry["mean_seed"], ":", "mean seed")):
            bars.hlines(100 * value, *span, colors="black", linestyles=style, label=label if position == 0 else None)
    bars.set_xticks([s + 0.4 - width / 2 for s in range(len(settings))], settings)
    bars.set_ylabel("exact match on test (%)")
    bars.set_title("Seeds vs merges on the demo task (test split)")
    bars.legend(ncol=6, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    width = 0.8 / len(methods)
    colors = {"better": "tab:green", "worse": "tab:red"}
    for axis, reference in zip(axes[1:], ("best seed", "mean seed")):
        key = "versus_" + reference.replace(" ", "_")
        for index, method in enumerate(methods):
            for position, setting in enumerate(settings):
                difference = results["settings"][setting][key][method]
                x = position + index * width
                mean, low, high = (100 * difference[k] for k in ("mean", "low", "high"))
                axis.errorbar(
                    x,
                    mean,
                    yerr=[[mean - low], [high - mean]],
                    fmt="o",
                    capsize=3,
                    color=colors.get(difference["verdict"], "tab:gray"),
                )
                if position == 0:
                    axis.annotate(method, (x, high), fontsize=6, rotation=60, ha="left", va="bottom")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks([s + 0.4 - width / 2 for s in range(len(settings))], settings)
        axis.set_ylabel(f"versus {reference} (points, 95% CI)")
        axis.set_title(f"versus the {reference} on test: green better, red worse, gray no detectable difference")
    figure.tight_layout()
    figure.savefig(staged_path(path), dpi=120)
    plt.close(figure)


STAMP = "demo-config.json"


def reuse_trained_models(out: Path, work: Path, trained_under: str, echo: Callable[[str], None]) -> None:
    """Copy the models an earlier demo in ``out`` trained into ``work`` (the new run's staging
    folder), if it trained them under the same configuration and float kernels
    (``trained_under``); models trained otherwise must not be reused."""
    earlier = read_manifest(out) if out.is_dir() else None
    if earlier is None or earlier.command != "demo":
        return
    if not (out / STAMP).is_file() or read_text(out / STAMP, "demo configuration", within=out) != trained_under:
        echo("the models in --out were trained under another configuration or other float kernels: training again")
        return
    for models in [out / "models", *sorted(out.glob("experiment*/models"))]:
        if models.is_dir():
            copy_tree(models, work / models.relative_to(out))


def run_demo(out: Path, quick: bool, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out`` (:class:`~mergekit_seed.output.OutputFolder`: published when
    finished; an earlier demo there is replaced, and the seeds it trained under the same
    configuration are reused)."""
    import torch

    config = DemoConfig.for_mode(quick)
    torch.set_num_threads(config.threads)
    quiet_libraries()
    vocabulary = CharVocabulary()
    started, cpu_started = time.perf_counter(), time.process_time()
    trained_under = json.dumps(
        {**config.to_dict(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}, sort_keys=True
    )
    with OutputFolder(out, command="demo", report=True) as output:
        work = output.staging
        reuse_trained_models(out, work, trained_under, echo)
        write_text(work / STAMP, trained_under)
        runs = []
        for experiment in range(config.experiments):
            echo(f"experiment {experiment + 1}/{config.experiments}")
            runs.append(run_experiment(experiment, config, work, vocabulary, quiet, echo))
        results = summarise(runs, config)
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["cpu_seconds"] = round(time.process_time() - cpu_started, 1)  # every thread of this process
        write_text(work / "results.json", json.dumps(results, indent=2) + "\n")
        plot(results, work / "results.png")
        write_text(work / "results.md", render_markdown(results))
        echo("")
        echo(render_markdown(results))
        compare_full_setting(config, work, out, quiet, echo)
        output.publish()
    echo(
        f"wrote {out / 'results.json'}, {out / 'results.png'} and {out / 'results.md'} in {results['seconds']} s "
        f"({results['cpu_seconds']} s of CPU time)"
    )
    return results

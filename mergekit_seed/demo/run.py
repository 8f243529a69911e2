"""``mergekit-seed demo``: does merging seeds beat the best seed, on a model a laptop can train?

1. A tiny LLaMA base (character vocabulary) is pre-trained on a synthetic corpus and cached
   under the user cache folder, keyed by its configuration.
2. For each setting (LoRA r=8, SeRA, full fine-tuning), three seeds are fine-tuned on the
   five-skill task (``demo/task.py``), differing only in the random seed (init, data order).
3. Every seed, our four methods and mergekit's ``linear`` (Model Soup), ``ties`` and
   ``dare_ties`` are evaluated by greedy exact match on held-out examples, per skill.
   Merges run through the real engines: ``mergekit-seed run`` (mergekit's pipeline for full
   checkpoints and ``BASE+ADAPTER``, our adapter engine for adapter folders).
4. A table in the papers' layout, ``results.json`` and a bar chart are written to ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

from mergekit_seed.demo.task import SKILLS, CharVocabulary, evaluate, make_examples, save_tokenizer
from mergekit_seed.demo.train import BaseConfig, FinetuneConfig, build_base, finetune, load_for_eval, pretraining_prompts, seed_names

OUR_METHODS = ("seedft", "seedlora_dm", "seedlora_twostage", "lore")
MERGEKIT_METHODS = ("linear", "ties", "dare_ties")
SETTINGS = ("lora", "sera", "full")
SEED_COUNT = 3
# mergekit's required per-model `weight` and a density of 0.5 for TIES and DARE. dare_ties
# sums the weighted deltas (its `normalize` defaults to false), so its weights are 1/N to
# average the seeds like the other methods instead of adding them up.
MERGEKIT_PARAMETERS = {
    "linear": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": round(1 / SEED_COUNT, 6), "density": 0.5},
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the demo's numbers."""

    quick: bool = False
    experiments: int = 3
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


def cache_dir() -> Path:
    root = os.environ.get("MERGEKIT_SEED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergekit-seed"
    )
    return Path(root)


def cached_base(config: BaseConfig, vocabulary: CharVocabulary, quiet: bool) -> Path:
    """The pre-trained base for ``config``, built once and kept under the cache folder."""
    key = hashlib.sha256(json.dumps([asdict(config), vocabulary.alphabet], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"demo-base-{key}"
    if (path / "model.safetensors").is_file():
        return path
    staging = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build_base(staging, config, vocabulary, quiet)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def write_recipe(path: Path, method: str, base: Path, seeds: List[Path], kind: str) -> Path:
    """One merge recipe for a setting; adapter seeds of mergekit's methods use ``BASE+ADAPTER``."""
    lines = [f"merge_method: {method}"]
    # Model Soup averages the seeds alone; LoRE needs no base (adapters' deltas are relative to it)
    if method not in ("linear", "lore") or kind == "adapter":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    per_model = MERGEKIT_PARAMETERS.get(method, {})
    for seed in seeds:
        reference = f"{base}+{seed}" if kind == "lora-via-mergekit" else str(seed)
        lines.append(f"  - model: {reference}")
        if per_model:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in per_model.items()]
    lines.append("dtype: float32")
    if kind == "adapter":
        lines += ["output:", "  format: lora"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_experiment(
    experiment: int, config: DemoConfig, base: Path, out: Path, vocabulary: CharVocabulary, quiet: bool, echo: Callable[[str], None]
) -> Dict[str, dict]:
    """Train, merge and evaluate every setting once; returns accuracies per setting."""
    from mergekit.options import MergeOptions

    from mergekit_seed.runner import merge
    from mergekit_seed.sera import load_sera, merge_sera

    train = make_examples(config.train_per_skill, config.data_seed + experiment)
    seen = {e.prompt for e in train} | pretraining_prompts(config.base)
    held_out = make_examples(config.eval_per_skill, config.data_seed + 10_000 + experiment, frozenset(seen))
    models = out / "models" if experiment == 0 else out / f"experiment{experiment}" / "models"
    merges = models.parent / "merges"
    if not (models / "base").exists():
        shutil.copytree(base, models / "base")
    options = MergeOptions(quiet=True, random_seed=experiment)  # DARE's drops are random
    results: Dict[str, dict] = {}
    for setting in SETTINGS:
        finetune_config = config.finetune[setting]
        seeds = []
        for index in range(SEED_COUNT):
            seed_path = models / setting / f"seed{index}"
            seed_value = 1000 * experiment + index
            if not seed_path.exists():
                finetune(models / "base", seed_path, train, finetune_config, seed_value, vocabulary, quiet)
            seeds.append(seed_path)
        accuracy: Dict[str, Dict[str, float]] = {}
        for index, seed_path in enumerate(seeds):
            accuracy[seed_names(SEED_COUNT)[index]] = evaluate(
                load_for_eval(models / "base", seed_path, setting), held_out, vocabulary
            )

        mergekit_inputs = seeds
        mergekit_kind = "full"
        if setting == "lora":
            mergekit_kind = "lora-via-mergekit"
        elif setting == "sera":
            # PEFT cannot load SeRA, so mergekit's baselines get the seeds merged into full checkpoints
            mergekit_inputs = []
            for index, seed_path in enumerate(seeds):
                full_path = models / "sera-as-full" / f"seed{index}"
                if not full_path.exists():
                    model = merge_sera(load_sera(load_for_eval(models / "base", models / "base", "full"), seed_path))
                    model.save_pretrained(full_path, safe_serialization=True)
                    save_tokenizer(full_path, vocabulary)
                mergekit_inputs.append(full_path)
        for method in OUR_METHODS + MERGEKIT_METHODS:
            ours = method in OUR_METHODS
            kind = ("adapter" if setting != "full" else "full") if ours else mergekit_kind
            recipe = write_recipe(merges / setting / f"{method}.yml", method, models / "base", seeds if ours else mergekit_inputs, kind)
            merged = merges / setting / method
            merge(recipe, merged, options, overwrite=True, echo=echo)
            eval_kind = "lora" if kind == "adapter" else "full"
            accuracy[method] = evaluate(load_for_eval(models / "base", merged, eval_kind), held_out, vocabulary)
        results[setting] = accuracy
        best = max(accuracy[n]["all"] for n in seed_names(SEED_COUNT))
        echo(
            f"[{setting}] best seed {best:.3f}; "
            + ", ".join(f"{m} {accuracy[m]['all']:.3f}" for m in OUR_METHODS + MERGEKIT_METHODS)
        )
    return results


def summarise(runs: List[Dict[str, dict]], config: DemoConfig) -> dict:
    """results.json: means over experiments (and spreads when there are several)."""
    settings = {}
    for setting in SETTINGS:
        names = list(runs[0][setting])
        seed_columns = seed_names(SEED_COUNT)
        mean = {name: statistics.fmean(run[setting][name]["all"] for run in runs) for name in names}
        entry = {
            "seeds": {n: mean[n] for n in names if n in seed_columns},
            "methods": {n: mean[n] for n in names if n not in seed_columns},
            "per_skill": {
                n: {skill: statistics.fmean(run[setting][n][skill] for run in runs) for skill in SKILLS} for n in names
            },
        }
        if len(runs) > 1:
            entry["std"] = {n: statistics.stdev(run[setting][n]["all"] for run in runs) for n in names}
            entry["best_seed_per_experiment"] = [max(run[setting][n]["all"] for n in seed_columns) for run in runs]
        settings[setting] = entry
    return {
        "task": {
            "description": "op:input=output string and arithmetic transformations, exact match under greedy decoding",
            "skills": list(SKILLS),
            "eval_examples_per_skill": config.eval_per_skill,
        },
        "settings": settings,
        "config": config.to_dict(),
        "experiments": len(runs),
    }


def best_seed(entry: dict) -> float:
    """The best seed's accuracy: per experiment, then averaged (the fair bar for a merge)."""
    per_experiment = entry.get("best_seed_per_experiment")
    return statistics.fmean(per_experiment) if per_experiment else max(entry["seeds"].values())


def format_table(results: dict) -> str:
    """The papers' layout: one row per setting, seeds then methods; best-seed margin per method."""
    columns = seed_names(SEED_COUNT) + list(OUR_METHODS) + list(MERGEKIT_METHODS)
    header = "| setting | " + " | ".join(columns) + " | best seed |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for setting, entry in results["settings"].items():
        values = {**entry["seeds"], **entry["methods"]}
        spread = entry.get("std", {})
        cells = [
            f"{100 * values[c]:.1f}" + (f" ± {100 * spread[c]:.1f}" if c in spread else "") for c in columns
        ]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {100 * best_seed(entry):.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = seed_names(SEED_COUNT) + list(OUR_METHODS) + list(MERGEKIT_METHODS)
    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        values = [100 * {**e["seeds"], **e["methods"]}[column] for e in results["settings"].values()]
        axis.bar([s + index * width for s in range(len(SETTINGS))], values, width, label=column)
    axis.set_xticks([s + 0.4 - width / 2 for s in range(len(SETTINGS))], list(results["settings"]))
    axis.set_ylabel("exact match (%)")
    axis.set_title("Seeds vs merges on the demo task")
    axis.legend(ncol=5, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(out: Path, quick: bool, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = DemoConfig.for_mode(quick)
    vocabulary = CharVocabulary()
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo-config.json"
    if stamp.is_file() and stamp.read_text() != json.dumps(config.to_dict(), sort_keys=True):
        # models trained under another configuration must not be reused
        for stale in [out / "models", out / "merges", *out.glob("experiment*")]:
            shutil.rmtree(stale, ignore_errors=True)
    stamp.write_text(json.dumps(config.to_dict(), sort_keys=True))
    base = cached_base(config.base, vocabulary, quiet)
    echo(f"base model: {base}")
    runs = [run_experiment(e, config, base, out, vocabulary, quiet, echo) for e in range(config.experiments)]
    results = summarise(runs, config)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out / "results.png")
    table = format_table(results)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    echo("")
    echo(table)
    echo("")
    for setting, entry in results["settings"].items():
        best = best_seed(entry)
        winners = [m for m, v in entry["methods"].items() if v > best]
        echo(f"{setting}: best seed {100 * best:.1f}; beating it: {', '.join(winners) if winners else 'none'}")
    echo(f"wrote {out / 'results.json'}, {out / 'results.png'} and {out / 'results.md'} in {results['seconds']} s")
    return results

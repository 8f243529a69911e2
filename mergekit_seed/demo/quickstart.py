"""``mergekit-seed quickstart``: a bundled merge of tiny generated models, end to end.

Builds a tiny LLaMA base and three seed checkpoints (base + a shared update + seed
noise), writes a recipe, merges it through mergekit's engine exactly as ``run`` does,
and reports how the merged delta relates to the seeds' deltas.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from mergekit_seed.demo.tiny import derive_seeds, save_tiny_llama
from mergekit_seed.weights import load_weights

SEED_COUNT = 3


def write_recipe(path: Path, method: str, base: Path, seeds) -> None:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    lines += [f"  - model: {seed}" for seed in seeds]
    lines += ["dtype: float32", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def run_quickstart(out: Path, method: str, echo: Callable[[str], None] = print) -> None:
    from mergekit.options import MergeOptions

    from mergekit_seed.cli import run_recipe

    models = out / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    base = save_tiny_llama(models / "base")
    seeds = derive_seeds(base, models, SEED_COUNT)
    recipe = out / "recipe.yml"
    write_recipe(recipe, method, base, seeds)
    echo(f"generated a tiny LLaMA base and {SEED_COUNT} seeds under {models}")
    echo(f"recipe: {recipe}")

    merged = out / "merged"
    run_recipe(str(recipe), str(merged), MergeOptions(quiet=True), overwrite=True)

    base_weights = load_weights(base)
    seed_weights = [load_weights(seed) for seed in seeds]
    merged_weights = load_weights(merged)
    merged_norm = seed_norm = 0.0
    for name, base_tensor in base_weights.items():
        merged_norm += (merged_weights[name] - base_tensor).norm().item() ** 2
        seed_norm += sum((w[name] - base_tensor).norm().item() ** 2 for w in seed_weights) / SEED_COUNT
    seed_mean = {
        name: torch.stack([w[name] for w in seed_weights]).mean(0) for name in base_weights
    }
    gap = sum((merged_weights[n] - seed_mean[n]).norm().item() ** 2 for n in base_weights) ** 0.5
    echo(f"merged {len(merged_weights)} tensors with {method} into {merged}")
    echo(f"  ||merged delta|| = {merged_norm ** 0.5:.4f}   mean ||seed delta|| = {seed_norm ** 0.5:.4f}")
    echo(f"  ||merged - seed average (Model Soup)|| = {gap:.4f}")
    echo(f"  model card: {merged / 'README.md'}")

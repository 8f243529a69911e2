"""The ``mergekit-seed`` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import List, Optional

import click
from mergekit.options import MergeOptions, add_merge_options

from mergekit_seed.errors import UserError
from mergekit_seed.recipe import check_recipe, load_recipe


def fail(message: str) -> None:
    """Print one error line and exit with status 1 (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergekit-seed")
def main() -> None:
    """Multi-seed model merging for mergekit: SeedFT, SeedLoRA, LoRE-Merging."""


def _prepare_output(out_path: Path, overwrite: bool) -> Path:
    """Refuse to mix with an existing non-empty OUT; return the temporary sibling to write into."""
    if out_path.exists() and not out_path.is_dir():
        fail(f"{out_path}: exists and is not a folder; choose another output path")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        fail(f"{out_path}: output folder is not empty; pass --overwrite to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _publish(staging: Path, out_path: Path) -> None:
    if out_path.exists():
        shutil.rmtree(out_path)
    staging.rename(out_path)


def _terminate_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def run_recipe(recipe_path: str, out: str, merge_options: MergeOptions, overwrite: bool) -> None:
    """Validate a recipe, merge into a temporary sibling of ``out``, then rename it into place.

    Recipes whose models are adapter folders go to the adapter-native engine; all others to
    mergekit's ``run_merge``.
    """
    try:
        recipe = load_recipe(recipe_path)
    except UserError as error:
        fail(str(error))
    problems: List[str] = check_recipe(recipe, recipe_path)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)

    out_path = Path(out).absolute()
    staging = _prepare_output(out_path, overwrite)
    previous = signal.signal(signal.SIGTERM, _terminate_on_signal)
    try:
        merge_options.apply_global_options()
        if recipe.is_adapter_recipe:
            from mergekit_seed.adapters.engine import run_adapter_merge

            run_adapter_merge(recipe.config, recipe.raw, staging, quiet=merge_options.quiet, echo=click.echo)
        else:
            from mergekit.merge import run_merge

            run_merge(recipe.config, str(staging), options=merge_options, config_source=recipe.source)
        _publish(staging, out_path)
    except (UserError, ValueError) as error:
        fail(f"{recipe_path}: {str(error).splitlines()[0]}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(staging, ignore_errors=True)


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT folder.")
@add_merge_options
def run_command(merge_options: MergeOptions, recipe: str, out: str, overwrite: bool) -> None:
    """Merge RECIPE (a mergekit YAML file) into the folder OUT.

    Accepts every mergekit-yaml option. The recipe is validated before any tensor is
    loaded, and OUT only appears once the merge has finished.
    """
    run_recipe(recipe, out, merge_options, overwrite)


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def methods_command(as_json: bool) -> None:
    """List mergekit-seed's merge methods with their papers and parameters."""
    from mergekit_seed.methods import METHODS, describe

    described = [describe(method) for method in METHODS]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        click.echo(f"{entry['name']}  ({entry['pretty_name']})")
        click.echo(f"  paper: {entry['paper']}")
        click.echo(f"  inputs: base model {entry['base_model']}, at least {entry['min_seeds']} seeds")
        for parameter in entry["parameters"]:
            click.echo(
                f"  {parameter['name']:<20} {parameter['type']:<22} default {parameter['default']!s:<8}"
                f" {parameter['description']}"
            )
        click.echo("")


@main.command("quickstart")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="quickstart-out",
    show_default=True,
    help="Folder for the generated models, recipe and merge.",
)
@click.option("--method", default="seedft", show_default=True, help="Which of our methods to run.")
def quickstart_command(out: str, method: str) -> None:
    """Generate a tiny base model and three seeds, merge them, and report what happened."""
    from mergekit_seed.demo.quickstart import run_quickstart

    run_quickstart(Path(out).absolute(), method, echo=click.echo)


if __name__ == "__main__":
    main()

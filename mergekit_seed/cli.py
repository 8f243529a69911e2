"""The ``mergekit-seed`` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import click
from pydantic import BaseModel, model_validator

from mergekit_seed.errors import UserError
from mergekit_seed.recipe import check_recipe, load_recipe

if TYPE_CHECKING:  # importing mergekit.options costs seconds; see LazyGroup
    from mergekit.options import MergeOptions


def fail(message: str) -> None:
    """Print one error line and exit with status 1 (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class LazyGroup(click.Group):
    """A group whose heavy commands are built on first use.

    ``run`` takes mergekit's merge options, and importing ``mergekit.options`` costs seconds
    (it imports transformers and peft); the other commands should not pay for it, and neither
    should an adapter merge that uses only the options of :class:`AdapterRunOptions`: such a
    ``run`` is parsed by a command that declares just those.
    """

    lazy_commands: dict = {}

    def list_commands(self, context):
        return sorted(set(super().list_commands(context)) | set(self.lazy_commands))

    def get_command(self, context, name):
        if name in self.lazy_commands and name not in self.commands:
            self.add_command(self.lazy_commands[name](), name)
        return super().get_command(context, name)

    def resolve_command(self, context, args):
        if args and args[0] == "run":
            command = _build_adapter_run_command()
            if _parses_as_adapter_run(command, context, args[1:]):
                return "run", command, args[1:]
        return super().resolve_command(context, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


class AdapterRunOptions(BaseModel, frozen=True):
    """The mergekit options an adapter merge uses, under mergekit's names and meanings.

    ``random_seed`` seeds the global generators as mergekit does (through transformers'
    ``set_seed``: Python's, numpy's and torch's): DARE fusion without its own ``seed`` draws
    from them.
    """

    cuda: bool = False
    device: Optional[str] = None
    quiet: bool = False
    verbosity: int = 0
    num_threads: Optional[int] = None
    random_seed: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _default_device(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("device") is None:  # as mergekit: --cuda means the GPU
            values = {**values, "device": "cuda" if values.get("cuda") else "cpu"}
        return values

    def apply_global_options(self) -> None:
        import logging

        logging.basicConfig(level=logging.DEBUG if self.verbosity > 1 else logging.INFO if self.verbosity else logging.WARNING)
        import torch

        if self.random_seed is not None:
            import random

            import numpy

            random.seed(self.random_seed)
            numpy.random.seed(self.random_seed)
            torch.manual_seed(self.random_seed)  # every device's generator
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
            torch.set_num_interop_threads(self.num_threads)


def run_recipe(recipe_path: str, out: str, merge_options: "MergeOptions | AdapterRunOptions", overwrite: bool) -> None:
    """Validate a recipe, merge into a temporary sibling of ``out``, write the model card,
    then rename the folder into place.

    Recipes whose models are adapter folders go to the adapter-native engine; all others to
    mergekit's ``run_merge``.
    """
    try:
        recipe = load_recipe(recipe_path)
    except UserError as error:
        fail(str(error))
    from mergekit_seed.recipe import check_files, recipe_warnings

    problems: List[str] = check_recipe(recipe, recipe_path)
    if not problems:
        problems = check_files(recipe, recipe_path)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    for warning in recipe_warnings(recipe):
        click.echo(f"warning: {warning}", err=True)

    from mergekit import merge_methods

    from mergekit_seed.card import CARD_NAME, render_card

    method = merge_methods.get(recipe.config.merge_method)
    output_kind = recipe.config.output.format if recipe.is_adapter_recipe else "full"
    # rendered first: the inputs are hashed as they are when the merge reads them, and
    # mergekit's planner rewrites the configuration object while it runs
    card = render_card(recipe, method, merge_options.model_dump(exclude_defaults=True), output_kind)
    out_path = Path(out).absolute()
    staging = _prepare_output(out_path, overwrite)
    previous = signal.signal(signal.SIGTERM, _terminate_on_signal)
    try:
        merge_options.apply_global_options()
        if recipe.is_adapter_recipe:
            from mergekit_seed.adapters.engine import run_adapter_merge

            run_adapter_merge(
                recipe.config,
                staging,
                quiet=merge_options.quiet,
                echo=click.echo,
                warn=lambda message: click.echo(f"warning: {message}", err=True),
                device=merge_options.device or "cpu",
            )
        else:
            from mergekit.merge import run_merge

            if merge_options.lora_merge_cache is None and any(
                m.lora is not None for m in recipe.config.referenced_models()
            ):
                # mergekit needs a folder for the BASE+ADAPTER copies it merges first
                merge_options = merge_options.model_copy(update={"lora_merge_cache": str(staging / ".lora-merge-cache")})
            run_merge(recipe.config, str(staging), options=merge_options, config_source=recipe.source)
            shutil.rmtree(staging / ".lora-merge-cache", ignore_errors=True)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        _publish(staging, out_path)
        if not merge_options.quiet:
            click.echo(f"merged into {out_path}")
    except (UserError, ValueError) as error:
        fail(f"{recipe_path}: {str(error).splitlines()[0]}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(staging, ignore_errors=True)


def _build_run_command() -> click.Command:
    from mergekit.options import add_merge_options

    @click.command("run")
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

    return run_command


def _build_adapter_run_command() -> click.Command:
    """``run`` for adapter recipes: mergekit's options that adapter merges use, nothing imported."""

    @click.command("run")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.argument("out", type=click.Path(file_okay=False))
    @click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT folder.")
    @click.option("--cuda/--no-cuda", default=False, help="Perform matrix arithmetic on GPU")
    @click.option("--device", default=None, help="Perform matrix arithmetic on specified device")
    @click.option("--quiet/--no-quiet", default=False, help="Suppress progress bars and other non-essential output")
    @click.option("-v", "verbosity", count=True, help="Verbose logging (repeat for more verbosity)")
    @click.option("--num-threads", "-j", type=int, default=None, help="Number of threads to use for parallel CPU operations")
    @click.option("--random-seed", type=int, default=None, help="Seed for reproducible use of randomized merge methods")
    def adapter_run_command(recipe: str, out: str, overwrite: bool, **options) -> None:
        run_recipe(recipe, out, AdapterRunOptions(**options), overwrite)

    return adapter_run_command


def _parses_as_adapter_run(command: click.Command, context: click.Context, args: List[str]) -> bool:
    """Whether ``args`` name an adapter recipe and use only the adapter ``run``'s options."""
    from mergekit_seed.recipe import is_adapter_recipe_file

    try:
        parsed, extra, _ = command.make_parser(click.Context(command, parent=context, info_name="run")).parse_args(list(args))
    except click.UsageError:  # a mergekit option the adapter command does not declare
        return False
    recipe = parsed.get("recipe")  # click leaves a sentinel, not None, for a missing argument
    return not extra and "help" not in parsed and isinstance(recipe, str) and is_adapter_recipe_file(recipe)


LazyGroup.lazy_commands = {"run": _build_run_command}


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


@main.command("validate")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--offline", is_flag=True, help="Skip the checks that read the inputs on disk.")
def validate_command(recipes: tuple, offline: bool) -> None:
    """Check RECIPES before anything is loaded; list every problem, one line each.

    Checks YAML syntax, mergekit's schema, the method, every parameter's type and range,
    unknown parameters, input counts and the base model and, unless --offline, that local
    paths exist and that every shared tensor has one shape across inputs (file headers only).
    """
    from mergekit_seed.recipe import check_files

    problems: List[str] = []
    for path in recipes:
        try:
            recipe = load_recipe(path)
        except UserError as error:
            problems.append(str(error))
            continue
        problems += check_recipe(recipe, path)
        if not offline:
            problems += check_files(recipe, path)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{len(recipes)} recipe(s) valid")


@main.group("recipes", invoke_without_command=True)
@click.pass_context
def recipes_group(context: click.Context) -> None:
    """List the shipped recipes (paper settings and demo settings)."""
    if context.invoked_subcommand is not None:
        return
    from mergekit_seed.recipe import recipe_summary, shipped_recipes

    for name, path in shipped_recipes().items():
        click.echo(f"{name:<42} {recipe_summary(path)}")


@recipes_group.command("show")
@click.argument("name")
@click.option("--models", type=click.Path(file_okay=False), help="Fill ${DEMO_MODELS} with this folder.")
def recipes_show_command(name: str, models: Optional[str]) -> None:
    """Print the shipped recipe NAME."""
    from mergekit_seed.recipe import shipped_recipe_text

    try:
        click.echo(shipped_recipe_text(name, models), nl=False)
    except UserError as error:
        fail(str(error))


@main.command("reproduce")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--check", "check_dir", type=click.Path(file_okay=False, exists=True), help="Compare every tensor with this folder.")
@click.option("--atol", type=float, default=1e-6, show_default=True, help="Largest absolute difference --check accepts.")
@click.option("--no-verify-inputs", is_flag=True, help="Warn instead of failing when an input's sha256 differs.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT folder.")
def reproduce_command(source: str, out: str, check_dir: Optional[str], atol: float, no_verify_inputs: bool, overwrite: bool) -> None:
    """Re-run the merge described by SOURCE (a model card README.md or an output folder) into OUT."""
    import tempfile

    from mergekit_seed.card import compare_weights, package_version, read_card, verify_inputs

    try:
        card = read_card(Path(source))
    except UserError as error:
        fail(str(error))
    provenance = card["provenance"]
    for package, key in (("mergekit-seed", "version"), ("mergekit", "mergekit_version")):
        recorded, installed = provenance.get(key), package_version(package)
        if recorded and recorded != installed:
            click.echo(f"warning: the merge was made with {package} {recorded}; {installed} is installed", err=True)
    mismatches = verify_inputs(provenance.get("inputs") or {})
    for mismatch in mismatches:
        click.echo(f"{'warning' if no_verify_inputs else 'error'}: {mismatch}", err=True)
    if mismatches and not no_verify_inputs:
        click.echo("error: inputs differ from the ones the card records; pass --no-verify-inputs to merge anyway", err=True)
        sys.exit(1)
    from mergekit.options import MergeOptions

    options = MergeOptions(**(provenance.get("options") or {}))
    with tempfile.TemporaryDirectory() as scratch:
        recipe_path = Path(scratch) / "recipe.yml"
        recipe_path.write_text(card["recipe"], encoding="utf-8")
        run_recipe(str(recipe_path), out, options, overwrite)
    if check_dir is None:
        click.echo(f"reproduced the merge into {out}")
        return
    try:
        worst_name, worst, problems = compare_weights(Path(out), Path(check_dir))
    except UserError as error:
        fail(str(error))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(f"largest difference: {worst:.3g} in {worst_name}")
    if problems or worst > atol:
        if worst > atol:
            click.echo(f"error: {worst_name} differs by {worst:.3g} > --atol {atol:g}", err=True)
        sys.exit(1)
    click.echo(f"every tensor matches {check_dir} within {atol:g}")


@main.command("analyze")
@click.argument("models", nargs=-1, required=True)
@click.option("--base", help="The base model (needed for full checkpoints, not for adapter folders).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for analysis.json, plots and summary.md.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze_command(models: tuple, base: Optional[str], out: str, quiet: bool) -> None:
    """Compare seed MODELS: delta similarity, spectra, energy, subspace similarity."""
    from mergekit_seed.analysis import analyze

    try:
        analyze(list(models), base, Path(out), quiet=quiet)
    except UserError as error:
        fail(str(error))
    click.echo((Path(out) / "summary.md").read_text(encoding="utf-8"))


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True, help="Folder for models, merges and results.")
@click.option("--quick", is_flag=True, help="One experiment, shorter training (under 3 minutes on 2 CPU cores).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out: str, quick: bool, quiet: bool) -> None:
    """Train three seeds of a tiny LLaMA per setting (LoRA, SeRA, full), merge them with every
    method, and report accuracy per seed and per merge."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit_seed.demo.run import run_demo

    run_demo(Path(out).absolute(), quick=quick, quiet=quiet, echo=click.echo)


def console_main() -> None:
    """The ``mergekit-seed`` console script: :func:`main`, then a prompt end of the process.

    Once torch is imported, the interpreter's own teardown (freeing thousands of modules and
    their objects) takes about 0.4 s on our 2-core machines: a sixth of a small adapter merge.
    When the command has finished, every output file is closed, so this flushes the standard
    streams, runs the ``atexit`` handlers (logging's flush among them) and ends the process
    with the command's exit status. A crash (any exception but a clean exit) is not caught
    and ends the usual way, with its traceback.
    """
    import atexit

    try:
        main()
    except SystemExit as exit:
        code = exit.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):
        click.echo(code, err=True)  # sys.exit("message") prints the message and exits 1
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    console_main()

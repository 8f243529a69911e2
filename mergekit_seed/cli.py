"""The ``mergekit-seed`` command."""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import click
from click.core import ParameterSource

from mergekit_seed.catalogue import recipe_summary, shipped_recipe_text, shipped_recipes
from mergekit_seed.errors import UserError, show_tracebacks
from mergekit_seed.quiet import quiet_libraries
from mergekit_seed.reader import read_text
from mergekit_seed.recipe import is_adapter_recipe_file, load_recipe
from mergekit_seed.version import SUPPORTED_MERGEKIT


# Commands import what they use when they run: `mergekit-seed recipes` or `validate --offline`
# must not pay for torch, mergekit's options (transformers, peft) or the kernels. Every import
# of this package inside a function below is there for that start-up cost, none for a circle.

if TYPE_CHECKING:  # importing mergekit.options costs seconds; see LazyGroup
    from mergekit.options import MergeOptions

    from mergekit_seed.recipe import Recipe
    from mergekit_seed.runner import AdapterRunOptions


class LazyGroup(click.Group):
    """A group whose heavy commands are built on first use.

    ``run`` takes mergekit's merge options, and importing ``mergekit.options`` costs seconds
    (it imports transformers and peft); the other commands should not pay for it, and neither
    should an adapter merge that uses only the options of :class:`AdapterRunOptions`: such a
    ``run`` is parsed by a command that declares just those (the start-up it saves is measured
    in ``benchmarks/startup.json`` and quoted in docs/architecture.md).
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


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def run_recipe(
    recipe_path: "str | Recipe",
    out: str,
    merge_options: "MergeOptions | AdapterRunOptions",
    overwrite: bool,
    revisions: Optional[dict] = None,
    protected: Sequence[Path] = (),
    command: str = "run",
) -> None:
    """``run``: :func:`mergekit_seed.runner.merge`; a refusal is a ``UserError``, which click
    prints as one line (every problem of a recipe, one line each); ``-v`` adds its traceback."""
    if merge_options.quiet:
        quiet_libraries()
    if merge_options.verbosity:
        show_tracebacks()
    from mergekit_seed.runner import merge  # here: it imports the methods, and so torch

    merge(
        recipe_path,
        out,
        merge_options,
        overwrite=overwrite,
        echo=click.echo,
        warn=_warn,
        revisions=revisions,
        protected=protected,
        command=command,
    )
    if not merge_options.quiet:
        click.echo(f"merged into {Path(out).absolute()}")


def _build_run_command() -> click.Command:
    from mergekit.options import add_merge_options

    @click.command("run")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.argument("out", type=click.Path(file_okay=False))
    @click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a previous mergekit-seed merge.")
    @add_merge_options
    def run_command(merge_options: MergeOptions, recipe: str, out: str, overwrite: bool) -> None:
        """Merge RECIPE (a mergekit YAML file) into the folder OUT.

        Accepts every mergekit-yaml option. The recipe is validated before any tensor is
        loaded, and OUT only appears once the merge has finished.
        """
        run_recipe(recipe, out, merge_options, overwrite)

    for parameter in run_command.params:
        if type(parameter.type).__module__.startswith("mergekit."):  # one instance per option: safe to wrap
            parameter.type.convert = _failing_in_one_line(parameter.type)
    return run_command


def _failing_in_one_line(param_type: click.ParamType):
    """``param_type.convert`` for one of mergekit's option types, whose bad values (``--out-shard-size
    -1``) raise a bare ValueError: as click's own "Invalid value" line instead."""
    convert = param_type.convert

    def checked(value, parameter, context):
        try:
            return convert(value, parameter, context)
        except (ValueError, TypeError, IndexError):
            param_type.fail(f"{value!r} is not a {param_type.name} (such as 5B or 500M)", parameter, context)

    return checked


def _build_adapter_run_command() -> click.Command:
    """``run`` for adapter recipes: mergekit's options that adapter merges use, nothing imported."""

    @click.command("run")
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @click.argument("out", type=click.Path(file_okay=False))
    @click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a previous mergekit-seed merge.")
    @click.option("--cuda/--no-cuda", default=False, help="Perform matrix arithmetic on GPU")
    @click.option("--device", default=None, help="Perform matrix arithmetic on specified device")
    @click.option("--quiet/--no-quiet", default=False, help="Suppress progress bars and other non-essential output")
    @click.option("-v", "verbosity", count=True, help="Verbose logging (repeat for more verbosity)")
    @click.option(
        "--num-threads", "-j", type=int, default=None, help="Number of threads to use for parallel CPU operations"
    )
    @click.option(
        "--random-seed", type=int, default=None, help="Seed for reproducible use of randomized merge methods"
    )
    def adapter_run_command(recipe: str, out: str, overwrite: bool, **options) -> None:
        from mergekit_seed.runner import AdapterRunOptions  # (same: torch)

        run_recipe(recipe, out, AdapterRunOptions(**options), overwrite)

    return adapter_run_command


def _parses_as_adapter_run(command: click.Command, context: click.Context, args: List[str]) -> bool:
    """Whether ``args`` name an adapter recipe and use only the adapter ``run``'s options."""
    try:
        parsed, extra, _ = command.make_parser(click.Context(command, parent=context, info_name="run")).parse_args(
            list(args)
        )
    except click.UsageError:  # a mergekit option the adapter command does not declare
        return False
    recipe = parsed.get("recipe")  # click leaves a sentinel, not None, for a missing argument
    return not extra and "help" not in parsed and isinstance(recipe, str) and is_adapter_recipe_file(recipe)


LazyGroup.lazy_commands = {"run": _build_run_command}


def _options(*decorators):
    """One decorator applying ``decorators`` in order: options two commands share."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _finite(_context: click.Context, parameter: click.Parameter, value: Optional[float]) -> Optional[float]:
    """A float option's value, refused (as click refuses a bad value) when it is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=parameter)
    return value


bootstrap_options = _options(
    click.option(
        "--confidence",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=0.95,
        show_default=True,
        callback=_finite,
    ),
    click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap random seed."),
    click.option(
        "--resamples", type=click.IntRange(min=100), default=10_000, show_default=True, help="Bootstrap resamples."
    ),
)
lm_eval_options = _options(
    click.option("--num-fewshot", type=click.IntRange(min=0), help="lm-eval tasks: lm-eval's --num_fewshot."),
    click.option(
        "--limit",
        type=float,
        callback=_finite,
        help="lm-eval tasks: lm-eval's --limit (documents per task, or a fraction).",
    ),
    click.option(
        "--include-path", type=click.Path(exists=True), help="lm-eval tasks: a folder of your own task YAML files."
    ),
    click.option(
        "--lm-eval-model",
        metavar="NAME",
        help="lm-eval tasks: lm-eval's own backend loads each model (its --model: hf, vllm, ...) instead of our "
        "loader (default).",
    ),
    click.option(
        "--model-args",
        metavar="K=V,...",
        help="lm-eval tasks: lm-eval's --model_args for that backend (default hf), e.g. dtype=bfloat16; each "
        "model's folder, adapter and tokenizer are set for it.",
    ),
)


JSONL_METRICS_HELP = (
    "perplexity, answer_logprob, exact_match (the greedy continuation, up to the end-of-sequence token or a "
    "--stop string, must be the answer, surrounding whitespace aside: lm-eval's exact_match) or prefix_match (its "
    "first tokens, as many as the answer's, must be the answer)."
)

jsonl_options = _options(
    click.option(
        "--stop",
        multiple=True,
        metavar="TEXT",
        help="exact_match: a string that ends the generated answer, as lm-eval's until (repeat for more; default "
        'a newline; --stop "" for none). Backslash escapes such as \\n are read.',
    ),
    click.option(
        "--group-by",
        metavar="FIELD",
        help='JSONL: the field naming each row\'s group (default "group", used when the rows have it): every '
        "model is also compared per group, with the best seed on each group (the oracle).",
    ),
)


def _stop_strings(given: Sequence[str]):
    """``--stop``'s strings, backslash escapes read; the default (a newline) when none is given."""
    from mergekit_seed.tools.compare import DEFAULT_STOP  # here: it imports torch

    if not given:
        return DEFAULT_STOP
    return tuple(term for term in (codecs.decode(text, "unicode_escape") for text in given) if term)


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def methods_command(as_json: bool) -> None:
    """List mergekit-seed's merge methods with their papers and parameters, and any problem
    registering them with mergekit."""
    try:
        from mergekit_seed.plugin import register

        register()  # prints a warning line per name another package holds
    except Exception as error:  # the import hook's soft failure, reported here as an error
        reason = (str(error).splitlines() or [""])[0]
        raise UserError(
            f"mergekit-seed could not register its merge methods with mergekit ({type(error).__name__}: {reason}); "
            f"reinstall it (pip install -e .) or check the mergekit version ({SUPPORTED_MERGEKIT} is supported)"
        ) from error
    from mergekit_seed.methods import METHODS, describe

    described = [describe(method) for method in METHODS]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        click.echo(f"{entry['name']}  ({entry['pretty_name']})")
        click.echo(f"  paper: {entry['paper']} ({entry['reference_url']})")
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
@click.option("--allow-crimes", is_flag=True, help="Accept models of different architectures (as mergekit's option).")
def validate_command(recipes: tuple, offline: bool, allow_crimes: bool) -> None:
    """Check RECIPES before anything is loaded; list every problem, one line each.

    Checks YAML syntax, mergekit's schema, the method, every parameter's type and range,
    unknown parameters, input counts and the base model and, unless --offline, that local
    paths exist, that Hub ids exist, and that every shared tensor has one shape across inputs
    (file headers only). Exit 0: valid (with --offline: the inputs were not checked, and the
    last line says so); 1: problems, one line each; 2: no problem found, but some inputs could
    not be checked (the Hub could not be asked), each named.
    """
    from mergekit_seed.validation import check_files, check_recipe, recipe_warnings  # here: it imports torch

    problems: List[str] = []
    not_checked: List[str] = []
    for path in recipes:
        try:
            recipe = load_recipe(path)
        except UserError as error:
            problems.append(str(error))
            continue
        problems += check_recipe(recipe, path)
        if not offline:
            problems += check_files(recipe, path, allow_crimes=allow_crimes, not_checked=not_checked)
        for warning in recipe_warnings(recipe):
            click.echo(f"warning: {path}: {warning}", err=True)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(1)
    if offline:
        # --offline reads nothing: a recipe whose folders do not exist passes these checks
        click.echo(
            f"{len(recipes)} recipe(s) pass the checks that read nothing (schema, method, parameters); "
            "not checked: the inputs (paths, Hub ids, tensor shapes): run without --offline to check them"
        )
        return
    if not_checked:
        for line in not_checked:
            click.echo(f"warning: not checked: {line}", err=True)
        click.echo(
            f"{len(recipes)} recipe(s) have no problem found, but {len(not_checked)} input(s) could not be checked "
            "(above)"
        )
        sys.exit(2)
    click.echo(f"{len(recipes)} recipe(s) valid")


@main.group("recipes", invoke_without_command=True)
@click.pass_context
def recipes_group(context: click.Context) -> None:
    """List the shipped recipes (paper settings and demo settings)."""
    if context.invoked_subcommand is not None:
        return

    for name, path in shipped_recipes().items():
        click.echo(f"{name:<42} {recipe_summary(path)}")


@recipes_group.command("show")
@click.argument("name")
@click.option("--models", type=click.Path(file_okay=False), help="Fill ${DEMO_MODELS} with this folder.")
def recipes_show_command(name: str, models: Optional[str]) -> None:
    """Print the shipped recipe NAME."""
    click.echo(shipped_recipe_text(name, models), nl=False)


CHECK_SOURCE = "\0source"  # --check given without a folder: compare with the source's own weights


@main.command("reproduce")
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--check",
    "check_dir",
    is_flag=False,
    flag_value=CHECK_SOURCE,
    default=None,
    metavar="[DIR]",
    help="Compare every tensor with DIR; without DIR, with the source's own weights (the Hub repository's or the "
    "card's folder).",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=1e-6,
    show_default=True,
    callback=_finite,
    help="Largest absolute difference --check accepts.",
)
@click.option("--no-verify-inputs", is_flag=True, help="Warn instead of failing when an input's sha256 differs.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a previous mergekit-seed merge.")
@click.option(
    "--input",
    "given_inputs",
    multiple=True,
    metavar="inputN=PATH",
    help="The folder on this machine of the local input the card labels inputN (repeat for each).",
)
@click.option(
    "--recipe",
    "user_recipe",
    type=click.Path(dir_okay=False),
    help="Your copy of the card's recipe, with your folders in place of inputN (instead of --input).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let the models' own Python code run (mergekit's option); never taken from the card.",
)
@click.option("--quiet", is_flag=True, help="No progress bars and no non-essential output.")
def reproduce_command(
    source: str,
    out: str,
    check_dir: Optional[str],
    atol: float,
    no_verify_inputs: bool,
    overwrite: bool,
    given_inputs: tuple,
    user_recipe: Optional[str],
    trust_remote_code: bool,
    quiet: bool,
) -> None:
    """Re-run the merge described by SOURCE into OUT: a model card (README.md), an output
    folder, or a Hub repository ORG/NAME[@REVISION] (its card, through the Hugging Face cache).
    Hub inputs are read at the commits the card records; the card names local inputs inputN,
    whose folders come from --input or --recipe."""
    if quiet:
        quiet_libraries()
    from mergekit_seed.reproduce import compare_weights, prepare_reproduction  # here: torch, via the methods

    plan = prepare_reproduction(source, list(given_inputs), user_recipe, trust_remote_code, check_dir, CHECK_SOURCE)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    for mismatch in plan.mismatches:
        click.echo(f"{'warning' if no_verify_inputs else 'error'}: {mismatch}", err=True)
    if plan.mismatches and not no_verify_inputs:
        click.echo(
            "error: inputs differ from the ones the card records; pass --no-verify-inputs to merge anyway", err=True
        )
        sys.exit(1)
    from mergekit.options import MergeOptions

    options = MergeOptions(**{**plan.options, "quiet": quiet})
    run_recipe(
        plan.recipe, out, options, overwrite, revisions=plan.revisions, protected=plan.protected, command="reproduce"
    )
    check_dir = None if plan.check_dir is None else str(plan.check_dir)
    if check_dir is None:
        click.echo(f"reproduced the merge into {out}")
        return
    worst_name, worst, problems = compare_weights(Path(out), Path(check_dir))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(f"largest difference: {worst:.3g} in {worst_name}")
    if problems or worst > atol:
        if worst > atol:
            click.echo(f"error: {worst_name} differs by {worst:.3g} > --atol {atol:g}", err=True)
        sys.exit(1)
    click.echo(f"every tensor matches {check_dir} within {atol:g}")


@main.command("analyze")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "--base", type=click.Path(), help="The base model (needed for full checkpoints, not for adapter folders)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for analysis.json, plots and summary.md."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze_command(models: tuple, base: Optional[str], out: str, quiet: bool) -> None:
    """Compare seed MODELS before merging: delta similarity, spectra, energy in the top
    directions, subspace similarity (analysis.json, cosine.png, spectra.png, summary.md in --out)."""
    from mergekit_seed.tools.analysis import analyze

    if quiet:
        quiet_libraries()
    analyze(list(models), base, Path(out), quiet=quiet)
    click.echo(read_text(Path(out) / "summary.md", "analysis summary"))


@main.command("compare")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help='JSONL to score MODELS on: {"text"} rows, or {"prompt", "answer"} rows.',
)
@click.option(
    "--tasks",
    help="Score MODELS with lm-evaluation-harness on these tasks (T1,T2); with --lm-eval, compare only these.",
)
@click.option(
    "--lm-eval",
    "lm_eval_runs",
    is_flag=True,
    help="MODELS are lm-eval output folders (--output_path, --log_samples): compare those runs.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for compare.json, compare.md, compare.png."
)
@click.option("--base", type=click.Path(), help="Base model for adapters whose config names none (or to override it).")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer folder or Hub id for models that ship none.")
@click.option(
    "--metric",
    help="--data: " + JSONL_METRICS_HELP + " lm-eval: the metric pooled over tasks (default: each task's first).",
)
@click.option(
    "--reference", help="The model the others are compared with (default: the best model that is not a merge)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@jsonl_options
@lm_eval_options
@click.option("--cuda", is_flag=True, help="Score on the GPU (as --device cuda).")
@click.option("--device", default=None, help="torch device to score on (default cpu).")
@bootstrap_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compare_command(models: tuple, **options: Any) -> None:
    """Compare MODELS (full models or adapters, folders or Hub ids) with the best seed: paired
    per-example differences, a bootstrap interval, and a verdict. They are scored on --data, or
    by lm-evaluation-harness on --tasks; with --lm-eval, MODELS are lm-eval runs already made."""
    if options["quiet"]:
        quiet_libraries()
    context = click.get_current_context()
    given = {name for name in SCORING_OPTIONS if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    tasks = None if options["tasks"] is None else _names(options["tasks"])
    if tasks == []:
        raise UserError("--tasks: give task names separated by commas (T1,T2)")
    bootstrap = {key: options[key] for key in ("reference", "metric", "confidence", "seed", "resamples")}
    if options["lm_eval_runs"]:
        _compare_runs(list(models), Path(options["out"]), tasks, given, bootstrap)
    elif (options["data"] is None) == (tasks is None):
        raise UserError(
            "give --data FILE (score on your JSONL) or --tasks T1,T2 (score with lm-eval), one of them; or "
            "--lm-eval with lm-eval output folders"
        )
    elif options["data"] is not None:
        _compare_on_data(list(models), given, options, bootstrap)
    else:
        _compare_on_tasks(list(models), tasks, options, bootstrap)


# the options that only apply when compare scores the models itself (not with --lm-eval)
SCORING_OPTIONS = ("base", "tokenizer", "num_fewshot", "limit", "include_path", "cuda", "device", "batch_size")
SCORING_OPTIONS += ("data", "stop", "group_by", "lm_eval_model", "model_args")


def _compare_runs(runs: List[str], out: Path, tasks: Optional[List[str]], given: set, bootstrap: dict) -> None:
    """``compare --lm-eval``: lm-eval runs already made."""
    from mergekit_seed.tools.lm_eval_report import compare_runs

    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
        raise UserError(
            f"--lm-eval compares runs already made; {flags} apply only when compare scores the models itself"
        )
    compare_runs(runs, out, tasks=tasks, echo=click.echo, **bootstrap)


def _scoring_device(options: dict, work: str) -> str:
    from mergekit_seed.runner import AdapterRunOptions, check_device  # here: torch, via the methods

    device_options = AdapterRunOptions(cuda=options["cuda"], device=options["device"])
    check_device(device_options, work=work)
    return device_options.device


def _compare_on_data(models: List[str], given: set, options: dict, bootstrap: dict) -> None:
    """``compare --data``: every model scored on the JSONL file."""
    from mergekit_seed.tools.compare import METRICS, compare

    device = _scoring_device(options, "score")
    unused = sorted(given & {"num_fewshot", "limit", "include_path", "lm_eval_model", "model_args"})
    if unused:
        raise UserError(f"--{unused[0].replace('_', '-')} applies to --tasks, not to --data")
    if bootstrap["metric"] is not None and bootstrap["metric"] not in METRICS:
        raise UserError(f"--metric {bootstrap['metric']}: --data gives {', '.join(METRICS)}")
    scoring = {key: options[key] for key in ("base", "batch_size", "tokenizer", "quiet", "group_by")}
    scoring["stop"] = _stop_strings(options["stop"])
    compare(
        models, Path(options["data"]), Path(options["out"]), device=device, echo=click.echo, **scoring, **bootstrap
    )


def _compare_on_tasks(models: List[str], tasks: List[str], options: dict, bootstrap: dict) -> None:
    """``compare --tasks``: every model evaluated by lm-eval, then the runs compared."""
    from mergekit_seed.tools.compare import unique_models
    from mergekit_seed.tools.lm_eval_report import compare_tasks

    device = _scoring_device(options, "score")
    for name in ("stop", "group_by"):
        if options[name]:
            raise UserError(
                f"--{name.replace('_', '-')} applies to --data; lm-eval tasks set their own (until; a group per task)"
            )
    names = unique_models(models, click.echo)
    if len(names) < 2:
        raise UserError("compare needs at least two models")
    keys = ("base", "tokenizer", "batch_size", "num_fewshot", "limit", "include_path", "quiet")
    evaluation = {"device": device, "backend": _lm_eval_backend(options), **{key: options[key] for key in keys}}
    compare_tasks(names, tasks, Path(options["out"]), evaluation, echo=click.echo, **bootstrap)


@main.command("select")
@click.argument("seeds", nargs=-1, required=True, type=click.Path())
@click.option(
    "--base", required=True, type=click.Path(), help="The model the seeds were fine-tuned from (folder or Hub id)."
)
@click.option(
    "--validation", type=click.Path(dir_okay=False), help="JSONL the candidates are chosen on (compare's format)."
)
@click.option(
    "--test",
    "test_data",
    type=click.Path(dir_okay=False),
    help="JSONL the choice is judged on, once; no prompt of --validation.",
)
@click.option("--validation-tasks", help="lm-eval tasks to choose on (T1,T2), instead of --validation.")
@click.option(
    "--test-tasks",
    help="lm-eval tasks to judge on, once (T1,T2), instead of --test; no prompt of the validation tasks.",
)
@lm_eval_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the winning merge, its card and select.json/md/png.",
)
@click.option(
    "--methods",
    help="Comma-separated methods to try (default: our methods, as `mergekit-seed methods` lists them, and "
    "mergekit's linear and ties; --dry-run lists the candidates).",
)
@click.option(
    "--grid",
    type=click.Path(dir_okay=False),
    help="YAML of parameter values per method (replaces the default grid, docs/select.md).",
)
@click.option(
    "--metric",
    help="JSONL: " + JSONL_METRICS_HELP + " lm-eval tasks: the metric pooled over them (default: each task's first).",
)
@click.option(
    "--versus-mean-seed",
    is_flag=True,
    help="Also compare with the mean seed: scores every seed on test (after the choice).",
)
@click.option("--dry-run", is_flag=True, help="List the candidates and estimate disk and time; merge nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a previous mergekit-seed output.")
@click.option(
    "--output-rank",
    callback=lambda _context, _parameter, value: _output_rank(value),
    help="Adapter seeds: output.rank of our methods' adapter candidates: an integer, auto or exact (default: exact "
    "for a method that merges LoRA factors exactly, auto for one whose merged delta is dense; docs/select.md).",
)
@click.option("--tokenizer", type=click.Path(), help="Tokenizer folder or Hub id for models that ship none.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@jsonl_options
@click.option("--cuda", is_flag=True, help="Merge and score on the GPU (as --device cuda).")
@click.option("--device", default=None, help="torch device to merge and score on (default cpu).")
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run the seeds' scorings and the candidates as Ray tasks over this machine's CPUs and GPUs, as many at "
    "once as fit (pip install 'mergekit-seed[ray]'; docs/select.md).",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    help="As --ray, on the Ray cluster at ADDRESS (ray.init's address); every node must see the seeds, the base "
    "and OUT's parent folder.",
)
@click.option(
    "--cpus-per-task",
    type=click.FloatRange(min=0, min_open=True),
    help="--ray: CPUs each task asks for (default 1).",
)
@click.option(
    "--gpus-per-task",
    type=click.FloatRange(min=0),
    help="--ray: GPUs each task asks for (default 1 when this machine has CUDA, else 0); a task with a GPU merges "
    "and scores on it.",
)
@bootstrap_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def select_command(seeds: tuple, **options: Any) -> None:
    """Choose the best merge of SEEDS (full models, LoRA or SeRA adapters) on --validation,
    judge it once on --test against the seed chosen on validation, and publish it in --out
    with its record (docs/select.md). lm-eval tasks may stand in for both files."""
    from mergekit_seed.tools.selection import select, workers_for
    from mergekit_seed.tools.selection.sweep import dry_run_lines, plan_selection

    quiet_libraries()  # before the first load: select() says the same
    ray = _ray_settings(options)
    device = _scoring_device(options, "merge and score") if ray is None else _ray_device(options, ray)
    splits = _select_splits(options)
    settings = {
        "methods": None if options["methods"] is None else _names(options["methods"]),
        "grid": None if options["grid"] is None else Path(options["grid"]),
        "metric": options["metric"],
        "tokenizer": options["tokenizer"],
        "batch_size": options["batch_size"],
        "device": device,
        "stop": _stop_strings(options["stop"]),
        "group_by": options["group_by"],
        "output_rank": options["output_rank"],
        "lm_eval_backend": _lm_eval_backend(options),
    }
    if options["dry_run"]:
        plan = plan_selection(list(seeds), options["base"], *splits, **settings)
        with workers_for(ray) as workers:
            lines = dry_run_lines(plan, workers)
        for line in lines:
            click.echo(line)
        return
    keys = ("versus_mean_seed", "confidence", "seed", "resamples", "overwrite", "quiet")
    select(
        list(seeds),
        options["base"],
        *splits,
        Path(options["out"]),
        echo=click.echo,
        warn=_warn,
        ray=ray,
        **{key: options[key] for key in keys},
        **settings,
    )


def _ray_settings(options: dict):
    """``--ray`` and ``--ray-address`` with what each task asks for (None without them)."""
    from mergekit_seed.tools.selection import RaySettings

    if not options["use_ray"] and options["ray_address"] is None:
        given = [name for name in ("cpus_per_task", "gpus_per_task") if options[name] is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to Ray tasks: add --ray or --ray-address")
        return None
    gpus = options["gpus_per_task"]
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return RaySettings(options["ray_address"], options["cpus_per_task"] or 1.0, gpus)


def _ray_device(options: dict, ray) -> str:
    """The device Ray tasks merge and score on: a GPU Ray gives the task (``cuda``, Ray sets
    which), else the CPU."""
    requested = options["device"] or ("cuda" if options["cuda"] else None)
    if ray.gpus_per_task and requested not in (None, "cuda"):
        raise UserError(
            f"--device {requested}: a Ray task with --gpus-per-task {ray.gpus_per_task:g} runs on the GPU Ray gives "
            "it (cuda); give --gpus-per-task 0 to run on CPUs"
        )
    if not ray.gpus_per_task and requested is not None and requested.startswith("cuda"):
        raise UserError(f"--device {requested}: Ray tasks get a GPU only with --gpus-per-task, e.g. 1")
    return "cuda" if ray.gpus_per_task else (requested or "cpu")


def _lm_eval_backend(options: dict):
    """``--lm-eval-model`` and ``--model-args``, checked (None without them: our loader)."""
    if options["lm_eval_model"] is None and options["model_args"] is None:
        return None
    from mergekit_seed.tools.lm_eval_runner import LmEvalBackend

    backend = LmEvalBackend(options["lm_eval_model"] or "hf", options["model_args"] or "")
    backend.check()
    return backend


def _output_rank(value: Optional[str]):
    """``--output-rank``: a positive integer, ``auto`` or ``exact`` (None when not given)."""
    if value is None or value in ("auto", "exact"):
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r}: give a positive integer, auto or exact", param_hint="'--output-rank'")


LM_EVAL_ONLY = ("num_fewshot", "limit", "include_path", "lm_eval_model", "model_args")


def _select_splits(options: dict) -> list:
    """``select``'s validation and test splits: two JSONL files, or two lists of lm-eval tasks."""
    from mergekit_seed.tools.selection.sweep import read_task_split

    files, tasks = (options["validation"], options["test_data"]), (options["validation_tasks"], options["test_tasks"])
    if files.count(None) + tasks.count(None) != 2 or (files[0] is None) != (files[1] is None):
        raise UserError(
            "give --validation FILE and --test FILE (JSONL), or --validation-tasks and --test-tasks (lm-eval)"
        )
    if files[0] is not None:
        given = [name for name in LM_EVAL_ONLY if options[name] is not None]
        if given:
            raise UserError(
                f"--{given[0].replace('_', '-')} applies to lm-eval tasks (--validation-tasks and --test-tasks), "
                "not to JSONL files"
            )
        return [Path(path) for path in files]
    lm_eval = (options["include_path"], options["num_fewshot"], options["limit"])
    return [read_task_split(_names(listing), *lm_eval) for listing in tasks]


def _names(listing: str) -> List[str]:
    """A comma-separated option's names (T1,T2)."""
    return [name.strip() for name in listing.split(",") if name.strip()]


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="demo-out",
    show_default=True,
    help="Folder for models, merges and results.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="One experiment, shorter training (a few minutes of one core from scratch; docs/demo.md has the measured "
    "time).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(out: str, quick: bool, quiet: bool) -> None:
    """Train three seeds of a tiny LLaMA per setting (LoRA, SeRA, full), merge them with every
    method, and report accuracy per seed and per merge."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit_seed.tools.demo.pipeline import run_demo
    from mergekit_seed.tools.demo.shipped import explain, shipped  # here: the demo imports torch and transformers

    results = run_demo(Path(out).absolute(), quick=quick, quiet=quiet, echo=click.echo)
    try:
        lines = explain(results, shipped())
    except UserError as error:  # the package's summary of the shipped runs is missing or unreadable
        lines = [f"warning: cannot compare with the shipped runs ({error})"]
    for line in lines:
        click.echo(line)


if __name__ == "__main__":
    main()

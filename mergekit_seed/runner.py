"""Recipe in, merged folder out: the one merge runner.

:func:`merge` loads and validates a recipe, picks the engine (mergekit's ``run_merge`` for
full models, the adapter-native engine for adapter recipes), writes the model card and
publishes the output atomically. It is the Python API (``mergekit_seed.merge``) and what
``mergekit-seed run``, ``reproduce`` and the demo call; it never exits the process: a
problem is a :class:`~mergekit_seed.errors.UserError` (:class:`RecipeProblems` when
validation finds several), whose message is the one line the CLI prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Union

from pydantic import BaseModel, ValidationError, model_validator
from safetensors import SafetensorError

from mergekit_seed.card import CARD_NAME, input_labels, public_recipe_text, render_card
from mergekit_seed.errors import RecipeProblems, UserError, first_validation_problem
from mergekit_seed.finite import is_finite_tensor
from mergekit_seed.hub_recipes import localize
from mergekit_seed.output import OutputFolder, check_location, remove, staged_path, write_text
from mergekit_seed.reader import safetensors_file
from mergekit_seed.recipe import Recipe, load_recipe, local_inputs
from mergekit_seed.references.hub import hub_provenance, is_hub_id
from mergekit_seed.references.weights import load_weights
from mergekit_seed.validation import check_files, check_recipe, merge_inputs, recipe_warnings


if TYPE_CHECKING:  # importing mergekit.options costs seconds (transformers, peft)
    from mergekit.options import MergeOptions


def in_recipe_order(config: Any) -> Any:
    """``config`` (a mergekit ``MergeConfiguration``) whose ``referenced_models()`` follows the
    recipe: base_model, then models (or slices' and modules' sources) in order.

    Stock mergekit returns them from a set, and takes the output's config.json from the first
    one when the recipe has no base_model, so which input's config (``tie_word_embeddings``,
    ``rope_theta``, ...) the merge gets depends on PYTHONHASHSEED. A deliberate difference from
    stock: ``mergekit-seed run`` writes the first model's config, every time."""
    from mergekit.config import MergeConfiguration

    class RecipeOrderConfiguration(MergeConfiguration):
        def referenced_models(self):  # noqa: D102 - same contract as mergekit's, in recipe order
            ordered: list = []

            def add(reference) -> None:
                if reference is not None and reference not in ordered:
                    ordered.append(reference)

            add(self.base_model)
            for entry in self.models or []:
                add(entry.model)
            for piece in self.slices or []:
                for source in piece.sources:
                    add(source.model)
            for module in (self.modules or {}).values():
                for entry in module.models or []:
                    add(entry.model)
                for piece in module.slices or []:
                    for source in piece.sources:
                        add(source.model)
            return ordered

    return RecipeOrderConfiguration.model_validate(config.model_dump(exclude_none=True))


@contextlib.contextmanager
def _without_torch_dtype_deprecation():
    """mergekit sets ``config.torch_dtype``, which transformers 5 answers with a deprecation
    warning on every merge: noise the user can do nothing about, even with --quiet."""

    def keep(record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()

    logger = logging.getLogger("transformers.configuration_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


# The fields of mergekit.options.MergeOptions an adapter merge reads, kept because importing
# mergekit.common, .config and .options is most of an adapter merge's start-up
# (benchmarks/startup.json); tests/test_counterparts.py holds them to mergekit's
class AdapterRunOptions(BaseModel, frozen=True):
    """The mergekit options an adapter merge uses, under mergekit's names and meanings.

    ``random_seed`` seeds the global generators as mergekit does (Python's, numpy's and
    torch's): DARE fusion without its own ``seed`` draws from them.
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

        logging.basicConfig(
            level=logging.DEBUG if self.verbosity > 1 else logging.INFO if self.verbosity else logging.WARNING
        )
        import torch

        if self.random_seed is not None:
            import numpy

            random.seed(self.random_seed)
            numpy.random.seed(self.random_seed)
            torch.manual_seed(self.random_seed)  # every device's generator
        if self.num_threads is not None:
            set_num_threads(self.num_threads)


Options = Union["MergeOptions", AdapterRunOptions]


def set_num_threads(count: int) -> None:
    """``--num-threads`` as mergekit applies it, once per process or many times.

    The kernels run on torch's intra-op threads (and scipy's LAPACK on as many, see
    ``linalg._lapack_eigh``). torch accepts an inter-op thread count only once per process,
    before any inter-op work: a later merge in the same process keeps the first one instead
    of failing.
    """
    import torch

    torch.set_num_threads(count)  # refuses a count below 1 itself, so only the refusal below is left
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # already set, or inter-op work has run in this process
        pass


def _apply_global_options(options: Options) -> None:
    """``options.apply_global_options()``, with the thread count set by :func:`set_num_threads`."""
    threads = options.num_threads
    if threads is None:
        options.apply_global_options()
        return
    options.model_copy(update={"num_threads": None}).apply_global_options()
    set_num_threads(threads)


@dataclass
class MergeResult:
    """What :func:`merge` wrote: the output folder, its kind (``full`` or ``lora``), the model
    card (None with ``write_model_card=False``), and for adapter merges one report per LoRA
    module (rank, kept energy)."""

    out: Path
    kind: str
    card: Optional[Path]
    modules: List[Any] = field(default_factory=list)


def make_options(recipe: Recipe, values: dict) -> Options:
    """Options for ``recipe`` from keyword values (mergekit's ``MergeOptions`` field names):
    an adapter recipe whose values are all adapter options gets :class:`AdapterRunOptions`
    (no mergekit import), anything else mergekit's ``MergeOptions``."""
    try:
        if recipe.is_adapter_recipe and set(values) <= set(AdapterRunOptions.model_fields):
            return AdapterRunOptions(**values)
        from mergekit.options import MergeOptions

        return MergeOptions(**values)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(f"option '{location}': {message}") from None


def raised_by_mergekit(error: BaseException) -> bool:
    """Whether ``error`` was raised in mergekit's own code (its refusal of what it was given),
    not in ours or another library's (which would be a bug to report, with its traceback)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    module = frame.tb_frame.f_globals.get("__name__", "")
    return module == "mergekit" or module.startswith("mergekit.")


def check_options(options: Options) -> None:
    """Refuse option values mergekit accepts but fails on mid-merge (one line naming the option)."""
    shard_size = getattr(options, "out_shard_size", 1)
    if shard_size < 1:
        raise UserError(
            f"--out-shard-size {shard_size}: must be at least 1 (parameters per output shard, such as 5B or 500M)"
        )


def check_finite_output(folder: Path) -> None:
    """Refuse a merge that wrote a NaN or Inf: every floating tensor of every weight file under
    ``folder`` is read back (one tensor at a time) and checked before anything is published."""
    for file in sorted(folder.rglob("*.safetensors")):
        with safetensors_file(file, within=folder) as reader:
            non_finite = next((name for name in reader.keys() if not is_finite_tensor(reader.get_tensor(name))), None)
        if non_finite is not None:
            _refuse_non_finite_output(non_finite)
    for bin_folder in sorted({file.parent for file in folder.rglob("*.bin")}):
        for name, tensor in load_weights(bin_folder).items():
            if not is_finite_tensor(tensor):
                _refuse_non_finite_output(name)


def _refuse_non_finite_output(name: str) -> None:
    raise UserError(
        f"tensor {name}: the merge gives NaN or Inf; nothing was published (lower lambda or the weights, "
        "or check the inputs)"
    )


def check_device(options: Options, work: str = "merge") -> None:
    """Refuse ``--cuda``/``--device cuda...`` on a machine where torch sees no CUDA device,
    before anything is loaded; ``work`` is what the command does there (merge, score)."""
    device = str(options.device or ("cuda" if options.cuda else "cpu"))
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        flag = "--cuda" if options.cuda and options.device in (None, "cuda") else f"--device {device}"
        raise UserError(
            f"{flag}: torch sees no CUDA device here (torch {torch.__version__}); leave it out to {work} on the CPU"
        )
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def validate(recipe: Recipe, allow_crimes: bool = False, truncate_embeddings: bool = False) -> None:
    """Every up-front check of a parsed recipe; raises :class:`RecipeProblems` listing them all.
    ``allow_crimes`` and ``truncate_embeddings`` are mergekit's options of those names."""
    problems = check_recipe(recipe, recipe.origin)
    if not problems:
        problems = check_files(
            recipe, recipe.origin, allow_crimes=allow_crimes, truncate_embeddings=truncate_embeddings
        )
    if problems:
        raise RecipeProblems(problems)


def merge(
    recipe: Union[str, os.PathLike, Recipe],
    out: Union[str, os.PathLike],
    options: Optional[Options] = None,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    warn: Optional[Callable[[str], None]] = None,
    revisions: Optional[Dict[str, str]] = None,
    protected: Sequence[Union[str, os.PathLike]] = (),
    command: str = "merge",
    **option_values: Any,
) -> MergeResult:
    """Merge ``recipe`` (a YAML path or a :class:`~mergekit_seed.recipe.Recipe`) into ``out``.

    ``options`` is mergekit's ``MergeOptions`` (or :class:`AdapterRunOptions`); or give
    mergekit's option names as keywords (``cuda=True``, ``random_seed=0``, ``quiet=True``).
    The recipe is validated before anything is loaded; the merge is written into a hidden
    sibling of ``out`` and renamed into place only when complete, model card included, so a
    failed merge leaves no weights behind. ``echo`` gets progress lines, ``warn`` warnings
    (default: ``echo`` with a ``warning:`` prefix). Inputs named by Hub id are resolved through
    the Hugging Face cache (offline with ``HF_HUB_OFFLINE=1``) at the revision they name, or at
    ``revisions[repo_id]`` (a card's pinned commits), and recorded in the card with their
    commits and file hashes. Raises :class:`UserError` (one line) for anything the user can fix.

    ``out`` never overlaps what the merge reads: it may not equal, contain or lie inside an
    input (or ``protected``, more paths to keep safe, such as a card being reproduced), nor
    lie in the Hugging Face cache. ``out`` is locked for the whole run (a second run into it is
    refused); ``overwrite`` replaces only the files a previous mergekit-seed output lists in its
    manifest, and never deletes another file (:class:`~mergekit_seed.output.OutputFolder`).
    A symlinked ``out`` is written at its target. Nothing is published unless every tensor
    written is finite. ``command`` is what the manifest says wrote ``out`` (``run``, ``select``).
    """
    if warn is None:
        warn = lambda message: echo(f"warning: {message}")  # noqa: E731
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(str(recipe))
    if options is None:
        options = make_options(recipe, option_values)
    elif option_values:
        raise TypeError("give options or keyword option values, not both")
    check_options(options)
    inputs = local_inputs(recipe) + [Path(path) for path in protected]
    with OutputFolder(out, inputs, overwrite, command=command, labels=input_labels(recipe), warn=warn) as output:
        modules = _stage_merge(output, recipe, options, echo=echo, warn=warn, revisions=revisions)
        output.publish()
    return MergeResult(
        out=output.path,
        kind=kind_of(recipe),
        card=output.path / CARD_NAME if _writes_card(options) else None,
        modules=modules,
    )


def kind_of(recipe: Recipe) -> str:
    """What a merge of ``recipe`` writes: ``full`` (a model) or ``lora`` (an adapter)."""
    return recipe.config.output.format if recipe.is_adapter_recipe else "full"


def _writes_card(options: Options) -> bool:
    return getattr(options, "write_model_card", True)


def _stage_merge(
    output: OutputFolder,
    recipe: Recipe,
    options: Options,
    *,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    revisions: Optional[Dict[str, str]],
) -> List[Any]:
    """Validate ``recipe``, merge it into ``output``'s staging folder, check that what was
    written is finite and add the card; returns the adapter engine's module reports."""
    allow_crimes = getattr(options, "allow_crimes", False)
    truncate_embeddings = getattr(options, "unsafe_truncate_embeddings", False)
    validate(recipe, allow_crimes=allow_crimes, truncate_embeddings=truncate_embeddings)
    for warning in recipe_warnings(recipe):
        warn(warning)
    check_device(options)

    from mergekit import merge_methods

    method = merge_methods.get(recipe.config.merge_method)
    # the merge reads snapshot folders. A LoRA-out adapter merge reads its base only when the
    # adapters hold more than factors, which shows once they are local: a second pass.
    adapters = [entry.model for entry in recipe.config.models] if recipe.is_adapter_recipe else None
    local, hub_inputs = localize(recipe, revisions, adapters)
    if adapters is not None:
        local, base_inputs = localize(local, revisions, [str(reference) for reference in merge_inputs(local, method)])
        hub_inputs += base_inputs
    if hub_inputs:
        validate(local, allow_crimes=allow_crimes, truncate_embeddings=truncate_embeddings)
        check_location(output.path, local_inputs(local))
    # rendered first: the inputs are hashed as they are when the merge reads them, and
    # mergekit's planner rewrites the configuration object while it runs
    card = render_card(
        recipe,
        method,
        options.model_dump(exclude_defaults=True),
        kind_of(recipe),
        hub_provenance(hub_inputs),
        title=output.path.name,
    )
    try:
        _apply_global_options(options)
        modules = _run_engine(local, recipe, options, output.staging, echo=echo, warn=warn)
        check_finite_output(output.staging)
        if _writes_card(options):
            write_text(output.staging / CARD_NAME, card)
        return modules
    except RecipeProblems:
        raise
    except UserError as error:
        raise type(error)(f"{recipe.origin}: {error}") from error
    except (
        ValueError,
        RuntimeError,
    ) as error:  # mergekit's own refusal of the recipe, mid-merge; anything else is a bug
        if not raised_by_mergekit(error):
            raise
        raise UserError(f"{recipe.origin}: mergekit refused the merge: {str(error).splitlines()[0]}") from error
    except OSError as error:  # a failed write (disk full, file too large, no permission)
        where = f" ({error.filename})" if error.filename else ""
        reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{output.path}: the merge failed: {reason}{where}; nothing was published") from None
    except SafetensorError as error:  # safetensors' own wrapping of a failed write
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{output.path}: the merge failed writing weights ({reason}); nothing was published") from None


def _run_engine(
    local: Recipe,
    recipe: Recipe,
    options: Options,
    staging: Path,
    *,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> List[Any]:
    """Run the adapter engine or mergekit's ``run_merge`` on ``local`` (Hub ids resolved) into
    ``staging``; ``recipe`` is the recipe as the user wrote it."""
    if local.is_adapter_recipe:
        from mergekit_seed.engines.adapter_merge import (
            run_adapter_merge,  # here: it imports torch, which validation need not
        )

        named_base = recipe.config.base_model
        return run_adapter_merge(
            local.config,
            staging,
            quiet=options.quiet,
            echo=echo,
            warn=warn,
            device=options.device or "cpu",
            base_model_name=named_base if named_base and is_hub_id(named_base.partition("@")[0]) else None,
        )
    from mergekit.merge import run_merge

    if options.lora_merge_cache is None and any(m.lora is not None for m in local.config.referenced_models()):
        # mergekit needs a folder for the BASE+ADAPTER copies it merges first
        options = options.model_copy(update={"lora_merge_cache": str(staged_path(staging / ".lora-merge-cache"))})
    # mergekit's own card step is skipped: ours replaces its README.md, and it looks
    # names up on the Hub (a relative local path fails offline, or waits on the network)
    with _without_torch_dtype_deprecation():
        run_merge(
            in_recipe_order(local.config),
            str(staged_path(staging)),
            options=options.model_copy(update={"write_model_card": False}),
        )
    remove(staging / ".lora-merge-cache")
    if _writes_card(options):  # what mergekit's card step writes beside the card: the recipe, without local paths
        write_text(staging / "mergekit_config.yml", public_recipe_text(recipe))
    return []

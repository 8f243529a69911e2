"""The adapter-native engine: adapter seeds in, a merged LoRA adapter (or full model) out.

``seedft`` and ``seedlora_dm`` (methods with a ``factored_kernel``) run on the factors,
exactly, and never form an m x n matrix;
``seedlora_twostage`` and ``lore`` materialise one module's deltas at a time and run the same
mergekit method object that ``mergekit-yaml`` runs (with a zero base, since a LoRA delta is
already the task vector; LoRE is translation-equivariant, so running it on the deltas gives
the merged delta).

Nothing here imports ``mergekit.config``, ``mergekit.common``, ``mergekit.options``,
transformers or peft: importing them is most of the start-up of a small adapter merge, which
uses none of them (measured: ``benchmarks/startup.json``, quoted in docs/architecture.md). That
is why recipe.py and runner.py keep small
counterparts of ``MergeConfiguration``, ``evaluate_setting``, ``dtype_from_name`` and
``MergeOptions`` for adapter recipes (docs/architecture.md). Reading and writing tensors uses
mergekit's own ``mergekit.io``, which is cheap to import.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mergekit.io.tensor_writer import TensorWriter

from mergekit_seed.errors import UserError
from mergekit_seed.finite import FLOAT32_MAX, is_finite_tensor
from mergekit_seed.maths.linalg import LowRank, compress, factor_dense
from mergekit_seed.output import copy_file, make_folder, staged_path
from mergekit_seed.plugin import register
from mergekit_seed.reader import safetensors_file
from mergekit_seed.recipe import AdapterMergeConfig, evaluate_setting, torch_dtype
from mergekit_seed.references.adapter_files import (
    AdapterSeed,
    MergedAdapter,
    TokenRows,
    read_adapter,
    saved_whole_everywhere,
    why_base_is_read,
    write_lora_adapter,
)
from mergekit_seed.references.base_model import BaseWeights, has_conv1d_layers
from mergekit_seed.references.hub import is_hub_id
from mergekit_seed.references.weights import confined_file


LOG = logging.getLogger("mergekit_seed")


@dataclass
class ModuleReport:
    name: str
    rank: int
    kept_energy: float
    shape: Tuple[int, int] = (0, 0)

    @property
    def larger_than_dense(self) -> bool:
        """Whether the factors hold more numbers than the dense (m, n) matrix: r (m + n) > m n."""
        m, n = self.shape
        return self.rank * (m + n) > m * n


def _factor(merged: Union[LowRank, torch.Tensor], output) -> Tuple[LowRank, float]:
    """The LoRA pair written for a merged 2-D delta, and the share of its energy kept.

    ``output.rank`` null: the numerical rank (exact); an int: at most that rank; ``auto``: the
    smallest rank keeping ``output.energy``, at most the break-even rank m n / (m + n).
    """
    m, n = merged.shape
    if output.rank == "auto":
        max_rank, energy = max(1, (m * n) // (m + n)), output.energy
    else:
        max_rank, energy = output.rank, None
    if isinstance(merged, LowRank):
        return compress(merged, max_rank=max_rank, energy=energy)
    return factor_dense(merged, max_rank=max_rank, energy=energy)


def _refuse_non_finite(name: str, merged: Union[LowRank, torch.Tensor]) -> None:
    """Refuse a merged tensor with a NaN or Inf, or a factored delta whose product would have
    one in float32 (its Frobenius norm, NaN for non-finite factors, past float32's range)."""
    if isinstance(merged, LowRank):
        finite = merged.norm() <= FLOAT32_MAX
    else:
        finite = is_finite_tensor(merged)
    if not finite:
        raise UserError(
            f"tensor {name}: the merge gives NaN or Inf (or values past float32's range); nothing was published "
            "(lower lambda or the weights, or check the adapters)"
        )


def _report_ranks(
    modules: List[ModuleReport], output, report: Callable[[str], None], warn: Callable[[str], None]
) -> None:
    if not modules:
        return
    if output.rank is not None:
        lowest = min(modules, key=lambda module: module.kept_energy)
        capped = [m for m in modules if output.rank == "auto" and m.kept_energy < output.energy]
        # rank auto keeps the smallest rank reaching output.energy, so a module below it hit the cap
        cap_note = (
            f"; {len(capped)} module(s) kept less than the {output.energy} asked for because rank auto stops at the "
            "break-even rank m*n/(m+n), past which LoRA factors hold more numbers than the dense weights "
            "(output.format: full keeps everything)"
            if capped
            else ""
        )
        report(
            f"rank {output.rank}: kept energy per module from {lowest.kept_energy:.4f} ({lowest.name}) "
            f"to {max(m.kept_energy for m in modules):.4f}{cap_note}"
        )
        for module in modules:
            LOG.info("%s: rank %d, kept energy %.6f", module.name, module.rank, module.kept_energy)
        return
    larger = [module for module in modules if module.larger_than_dense]
    if larger:
        factors = sum(module.rank * sum(module.shape) for module in larger)
        dense = sum(module.shape[0] * module.shape[1] for module in larger)
        warn(
            f"{len(larger)} of {len(modules)} LoRA modules (e.g. {larger[0].name}) are stored exactly at a rank whose "
            f"factors hold more numbers than the dense weights ({factors:,} vs {dense:,}); set output.rank: auto "
            f"(keeps output.energy of each module, at most the break-even rank) or use output.format: full"
        )


def resolve_module_parameters(
    method, config: AdapterMergeConfig, tensor_name: str
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Global and per-seed parameter values for one module, with mergekit's precedence: a seed's
    own setting, then the recipe's ``parameters``, then the method's default."""

    def resolve(parameter, scopes) -> Any:
        for scope in scopes:
            if scope and parameter.name in scope:
                value = evaluate_setting(scope[parameter.name], tensor_name)
                if value is not None:
                    return parameter.validate(value)
        if parameter.required:
            raise UserError(f"{tensor_name}: parameter '{parameter.name}' is not set for this module")
        return parameter.validate(parameter.default)

    shared = {p.name: resolve(p, [config.parameters]) for p in method.spec.shared_parameters}
    per_seed = [
        {p.name: resolve(p, [entry.parameters, config.parameters]) for p in method.spec.input_parameters}
        for entry in config.models
    ]
    return shared, per_seed


def merge_module(
    method,
    tau: Sequence[Union[LowRank, torch.Tensor]],
    shared: Dict[str, Any],
    per_seed: List[Dict[str, Any]],
    name: str,
    base: Optional[torch.Tensor] = None,
) -> Union[LowRank, torch.Tensor]:
    """Merge one tensor: a factor pair (all seeds low-rank, method exact on factors) or a dense result.

    ``tau`` are the seeds' deltas, or (with ``base``) their full values: then the method runs
    on (base, values) exactly as mergekit runs it on checkpoints and returns the merged value.
    Without ``base`` a dense delta is merged with a zero base (a delta is already the task
    vector; LoRE is translation-equivariant) and the merged delta is returned.
    """
    problems = method.parameter_problems(shared, len(tau), per_seed)
    if problems:
        raise UserError(problems[0])
    if base is None and method.factored_kernel is not None and all(isinstance(t, LowRank) for t in tau):
        merged = method.factored_kernel(list(tau), shared, per_seed)
        scale = method.resolve_lambda(shared["lambda"], len(tau))
        return LowRank(scale * merged.left, merged.right)

    from mergekit.merge_methods.base import TensorGroup

    dense = [t.dense() if isinstance(t, LowRank) else t for t in tau]
    if method.needs_base:
        reference = torch.zeros_like(dense[0]) if base is None else base.to(dense[0])
        group = TensorGroup.from_tensors([reference] + dense, base_index=0, name=name)
        seed_ids = list(range(1, len(dense) + 1))
    else:
        group = TensorGroup.from_tensors(dense, name=name)
        seed_ids = list(range(len(dense)))
    parameters = dict(shared)
    for parameter in method.spec.input_parameters:
        # our per-model parameters are all per seed (mergekit's NON_BASE scope)
        parameters[parameter.name] = {i: values[parameter.name] for i, values in zip(seed_ids, per_seed)}
    (result,) = method([group], parameters=parameters)
    return result


def write_full_model(
    out: Path,
    base: BaseWeights,
    deltas: Dict[str, torch.Tensor],
    values: Dict[str, torch.Tensor],
    dtype: Optional[torch.dtype],
) -> None:
    """Write the base model to ``out`` with each delta added to its tensor and each merged value
    of a tensor saved whole put in place of the base's: the base's other files are copied, its
    tensors go one at a time through mergekit's ``TensorWriter`` (shards and index as a stock
    merge writes them)."""
    make_folder(out)
    for file in sorted(base.folder.iterdir()):
        if (
            not file.is_dir()
            and not file.name.endswith((".safetensors", ".safetensors.index.json"))
            and not file.name.startswith("README")
        ):
            copy_file(confined_file(base.folder, file.name), out / file.name, within=base.folder)
    remaining = set(deltas) | set(values)
    with TensorWriter(str(staged_path(out)), safe_serialization=True) as writer:
        for shard in base.shards:
            with safetensors_file(shard, within=base.folder) as reader:
                for name in reader.keys():
                    tensor = _merged_base_tensor(name, reader.get_tensor(name), deltas, values)
                    remaining.discard(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    writer.save_tensor(name, tensor)
    if remaining:
        raise UserError(_missing_base_tensor(base, sorted(remaining)[0]))


def _missing_base_tensor(base: BaseWeights, name: str) -> str:
    """Why the base has no ``name``: a name the adapter took from the loaded model, which the
    base's files spell otherwise (transformers converts some architectures on load, e.g.
    Mixtral's ``block_sparse_moe.gate`` to ``mlp.gate``), or a base the seeds were not trained on."""
    parts = name.split(".")
    tail = ".".join(parts[-2:])  # module and parameter: gate.weight
    layer = ".".join(parts[: parts.index("layers") + 2]) + "." if "layers" in parts[:-2] else ""  # model.layers.0.
    spelled = sorted(n for n in base.names() if n.startswith(layer) and n.endswith("." + tail) and n != name)
    if spelled:
        return (
            f"base_model {base.reference}: the adapters change {name}, which the base's files hold as {spelled[0]} "
            "(transformers renames this architecture's weights when it loads them, and PEFT names them as loaded); "
            "write output.format: lora, which PEFT applies to the loaded model"
        )
    return (
        f"base_model {base.reference}: has no tensor {name} that the adapters change; give the base the seeds "
        "were trained from"
    )


def _merged_base_tensor(
    name: str, tensor: torch.Tensor, deltas: Dict[str, torch.Tensor], values: Dict[str, torch.Tensor]
) -> torch.Tensor:
    """The base's ``tensor`` plus its delta, or the merged value that replaces it, in its dtype."""
    if name not in deltas and name not in values:
        return tensor
    change = deltas.get(name, values.get(name))
    if tensor.shape != change.shape:
        raise UserError(
            f"{name}: the adapters' tensor has shape {tuple(change.shape)} but the base's has {tuple(tensor.shape)}"
        )
    merged = tensor.float() + change.float() if name in deltas else change
    return merged.to(tensor.dtype)


def _base_model_name(
    seeds: List[AdapterSeed], recipe_base: Optional[str], warn: Callable[[str], None]
) -> Optional[str]:
    names = {seed.base_model for seed in seeds if seed.base_model}
    if len(names) > 1:
        warn(f"the adapters name different base models ({', '.join(sorted(names))}); merging them anyway")
    if recipe_base:
        return recipe_base
    return sorted(names)[0] if names else None


def _open_base(base_name: Optional[str], why: str) -> BaseWeights:
    if not base_name:
        raise UserError(f"{why}: this merge needs the base model's weights; set base_model: in the recipe")
    try:
        return BaseWeights(base_name)
    except UserError as error:
        raise UserError(f"{why}: this merge needs the base model's weights, and {error}") from None


def _one_hot_rows(indices: List[int], rows: int) -> torch.Tensor:
    """The (rows, k) selector whose column j is the unit vector of row ``indices[j]``."""
    selector = torch.zeros(rows, len(indices))
    selector[torch.tensor(indices, dtype=torch.long), torch.arange(len(indices))] = 1.0
    return selector


class _TensorInputs:
    """The seeds' inputs for one base tensor, by role. ``seed_shapes``: each seed's
    :meth:`AdapterSeed.shapes`, computed once per merge."""

    def __init__(
        self, seeds: List[AdapterSeed], name: str, base: Optional[BaseWeights], seed_shapes: List[Dict[str, tuple]]
    ):
        self.name = name
        self.seeds = seeds
        self.base = base
        self.seed_shapes = seed_shapes
        self.whole = any(name in seed.whole for seed in seeds)
        self.dense = any(name in seed.bias_deltas for seed in seeds)

    @property
    def counted_as_where_missing(self) -> str:
        """What a seed that lacks this tensor contributes."""
        return "the base's value" if self.whole else "a zero delta"

    def whole_everywhere(self) -> bool:
        """Every seed saves this tensor whole and nothing else changes it (no base value needed
        by a base-free method)."""
        return saved_whole_everywhere(
            self.name, [(seed.whole, seed.deltas.keys() | seed.bias_deltas.keys()) for seed in self.seeds]
        )

    def shape(self) -> tuple:
        shapes = {shapes[self.name] for shapes in self.seed_shapes if self.name in shapes}
        shapes |= {
            (self.base_shape[0], seed.token_rows[self.name].values.shape[1])
            for seed in self.seeds
            if self.name in seed.token_rows
        }
        if len(shapes) > 1:
            raise UserError(
                f"{self.name}: the adapters have different shapes {sorted(shapes)}; they are not for the same base "
                "model"
            )
        return shapes.pop()

    @cached_property
    def base_shape(self) -> tuple:
        return self.base.shape(self.name, "the trainable tokens replace rows of")

    def delta(self, seed: AdapterSeed, shape: tuple) -> Union[LowRank, torch.Tensor, None]:
        """The seed's delta from the base (None when the seed does not change this tensor)."""
        name = self.name
        parts: List[Union[LowRank, torch.Tensor]] = []
        if name in seed.deltas:
            parts.append(seed.deltas[name])
        if name in seed.token_rows:
            rows = seed.token_rows[name]
            base_rows = self.base.rows(name, rows.indices, "the trainable tokens replace rows of")
            parts.append(LowRank(_one_hot_rows(rows.indices, shape[0]), rows.values - base_rows))
        if name in seed.bias_deltas:
            parts.append(seed.bias_deltas[name])
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return sum(p.dense() if isinstance(p, LowRank) else p for p in parts)

    def value(self, seed: AdapterSeed, base_value: Optional[torch.Tensor], shape: tuple) -> torch.Tensor:
        """The seed's full value of a tensor some seed saves whole."""
        delta = self.delta(seed, shape)
        start = seed.whole.get(self.name, base_value)
        if delta is None:
            return start
        return start + (delta.dense() if isinstance(delta, LowRank) else delta)


def _confined_rows(merged: Union[LowRank, torch.Tensor], rows: List[int], rtol: float = 1e-6) -> bool:
    """Whether a merged (m, n) delta is zero outside ``rows`` (relative to its norm)."""
    outside = torch.ones(merged.shape[0], dtype=torch.bool)
    outside[torch.tensor(rows, dtype=torch.long)] = False
    if isinstance(merged, LowRank):
        left, right = merged.left.double(), merged.right.double()
        gram_right = right @ right.T
        total = ((left.T @ left) * gram_right).sum()
        rest = ((left[outside].T @ left[outside]) * gram_right).sum()
    else:
        total, rest = merged.double().pow(2).sum(), merged[outside].double().pow(2).sum()
    return bool(rest <= (rtol**2) * total)


def _merged_rows(merged: Union[LowRank, torch.Tensor], rows: List[int]) -> torch.Tensor:
    index = torch.tensor(rows, dtype=torch.long)
    if isinstance(merged, LowRank):
        return merged.left[index] @ merged.right
    return merged[index]


@dataclass
class _Merged:
    """Where each merged tensor of an adapter merge goes: the LoRA adapter being built, or the
    deltas and whole values added to the base for a full model; and one report per LoRA module."""

    adapter: MergedAdapter
    full_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)
    full_values: Dict[str, torch.Tensor] = field(default_factory=dict)
    modules: List[ModuleReport] = field(default_factory=list)


def _open_seeds(config: AdapterMergeConfig, method: Any, warn: Callable[[str], None]):
    """(the seeds in the base's layout, the base's name, the base's weights when the merge
    reads them, else None)."""
    if config.output.format == "full" and not config.base_model:
        raise UserError("output.format: full needs base_model (the model the adapters were trained on)")
    seeds = [read_adapter(entry.model) for entry in config.models]
    base_name = _base_model_name(seeds, config.base_model, warn)
    why = why_base_is_read([seed.path for seed in seeds], method.needs_base, config.output.format, base_name)
    base = _open_base(base_name, why) if why else None
    if any(seed.fan_in_fan_out for seed in seeds) or has_conv1d_layers(base_name):
        conv1d = base.conv1d_weights()
        seeds = [seed.in_base_layout(conv1d) for seed in seeds]
    return seeds, base_name, base


def _empty_adapter(seeds: Sequence[AdapterSeed]) -> MergedAdapter:
    adapter = MergedAdapter(
        modules_to_save=sorted(set().union(*(seed.modules_to_save for seed in seeds))),
        token_indices_by_module=any(seed.token_indices_by_module for seed in seeds),
        target_parameters=sorted(set().union(*(seed.target_parameters for seed in seeds))),
    )
    for seed in seeds:
        adapter.module_kinds.update(seed.module_kinds)
    return adapter


def _merge_saved_whole(
    method, inputs: "_TensorInputs", seeds, base, shape, parameters, name: str, device: str
) -> torch.Tensor:
    """A tensor the adapters save whole, merged as the checkpoint route merges its values."""
    shared, per_seed = parameters
    needs_base_value = method.needs_base or not inputs.whole_everywhere()
    base_value = base.tensor(name, "the adapters save whole") if needs_base_value else None
    values = [inputs.value(seed, base_value, shape).to(device) for seed in seeds]
    merged_value = merge_module(method, values, shared, per_seed, name, base=base_value).cpu()
    _refuse_non_finite(name, merged_value)
    return merged_value


def _merge_deltas(method, inputs: "_TensorInputs", seeds, shape, parameters, name: str, device: str):
    """The seeds' deltas of one tensor (a zero delta where a seed lacks it) merged by the method."""
    shared, per_seed = parameters
    tau = [inputs.delta(seed, shape) for seed in seeds]
    tau = [
        (LowRank.zeros(shape) if t is None and len(shape) == 2 else torch.zeros(shape) if t is None else t)
        for t in tau
    ]
    merged = merge_module(method, [t.to(device) for t in tau], shared, per_seed, name).to("cpu")
    _refuse_non_finite(name, merged)
    return merged


def _place_delta(
    merged, name: str, inputs: "_TensorInputs", seeds, shape, base, config: AdapterMergeConfig, result: _Merged
) -> None:
    """Put one merged delta where the output keeps it: the full model's deltas, a bias delta,
    trainable-token rows, or a LoRA pair (factored to the output's rank)."""
    if config.output.format == "full":
        result.full_deltas[name] = merged.dense() if isinstance(merged, LowRank) else merged
    elif inputs.dense:
        result.adapter.bias_deltas[name] = merged
    elif any(name in seed.token_rows for seed in seeds):
        if any(name in seed.deltas for seed in seeds):
            raise UserError(
                f"{name}: some seeds train tokens of it and others a LoRA; PEFT has no adapter for "
                "both at once: merge with output.format: full"
            )
        rows = sorted(set().union(*(seed.token_rows[name].indices for seed in seeds if name in seed.token_rows)))
        if not _confined_rows(merged, rows):
            raise UserError(
                f"{name}: the merged delta changes rows beyond the trainable tokens "
                f"({config.merge_method} spreads it over the whole matrix); merge with output.format: full"
            )
        base_rows = base.rows(name, rows, "the trainable tokens replace rows of")
        result.adapter.token_rows[name] = TokenRows(rows, base_rows + _merged_rows(merged, rows))
    else:
        pair, kept = _factor(merged, config.output)
        result.adapter.pairs[name] = pair
        result.modules.append(ModuleReport(name, pair.rank, kept, tuple(shape)))


def run_adapter_merge(
    config: AdapterMergeConfig,
    out: Path,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = LOG.warning,
    device: str = "cpu",
    base_model_name: Optional[str] = None,
) -> List[ModuleReport]:
    """Merge the adapter seeds of an adapter recipe into ``out`` (which must not exist yet).

    Every tensor of every adapter file is merged: low-rank deltas, ``lora_bias`` deltas,
    trainable-token rows and tensors saved whole, each as the checkpoint route (PEFT's
    ``merge_and_unload`` per seed, then the method) would merge the tensor it changes.
    ``echo`` reports progress (silenced by ``quiet``); ``warn`` reports what is merged anyway
    (different base models, tensors missing in some seeds). Each tensor is merged on
    ``device`` (mergekit's ``--device``/``--cuda``) and brought back to the CPU for writing.
    The written adapter names its base (``base_model_name_or_path``) by ``base_model_name``,
    else by the base's Hub id: never by a local path, which would publish the merging
    machine's directory layout.
    """
    from mergekit import merge_methods

    register()
    report = echo  # results (the kept energy of a truncation) are printed even when quiet
    if quiet:
        echo = lambda _message: None  # noqa: E731
    method = merge_methods.get(config.merge_method)
    seeds, base_name, base = _open_seeds(config, method, warn)
    result = _merge_every_tensor(config, method, seeds, base, device, warn, quiet)
    if config.output.format == "full":
        write_full_model(
            out, base, result.full_deltas, result.full_values, torch_dtype(config.out_dtype or config.dtype)
        )
        echo(f"wrote a full model with {len(result.full_deltas) + len(result.full_values)} merged tensors")
    else:
        if base_model_name is None and base_name and is_hub_id(base_name.partition("@")[0]):
            base_model_name = base_name
        _write_adapter(out, result, seeds, base_model_name, config)
        _report_ranks(result.modules, config.output, report, warn)
        echo(
            f"wrote a LoRA adapter with {len(result.adapter.pairs)} LoRA modules, {len(result.adapter.whole)} tensors "
            "saved whole"
        )
    return result.modules


def _merge_every_tensor(
    config: AdapterMergeConfig,
    method: Any,
    seeds: Sequence[AdapterSeed],
    base: Optional[BaseWeights],
    device: str,
    warn: Callable[[str], None],
    quiet: bool,
) -> _Merged:
    """Every tensor any seed changes, merged by ``method`` on ``device``, into a :class:`_Merged`."""
    from tqdm import tqdm

    names_by_seed = [set(seed.tensor_names()) for seed in seeds]
    seed_shapes = [seed.shapes() for seed in seeds]
    result = _Merged(_empty_adapter(seeds))
    for name in tqdm(sorted(set().union(*names_by_seed)), desc="Merging tensors", disable=quiet):
        inputs = _TensorInputs(seeds, name, base, seed_shapes)
        shape = inputs.shape()
        parameters = resolve_module_parameters(method, config, name)
        unchanged_in = [str(seed.path) for seed, seed_names in zip(seeds, names_by_seed) if name not in seed_names]
        if unchanged_in:
            with tqdm.external_write_mode(file=sys.stderr):  # a line of its own, not inside the bar
                warn(
                    f"{name}: missing in {', '.join(unchanged_in)}; counted as {inputs.counted_as_where_missing} there"
                )
        if not inputs.whole:
            merged = _merge_deltas(method, inputs, seeds, shape, parameters, name, device)
            _place_delta(merged, name, inputs, seeds, shape, base, config, result)
            continue
        value = _merge_saved_whole(method, inputs, seeds, base, shape, parameters, name, device)
        if config.output.format == "full":
            result.full_values[name] = value
        else:
            result.adapter.whole[name] = value
    return result


def _write_adapter(
    out: Path,
    result: _Merged,
    seeds: Sequence[AdapterSeed],
    base_model_name: Optional[str],
    config: AdapterMergeConfig,
) -> None:
    """The merged LoRA adapter, with the seeds' task type and the output dtype."""
    task_type = next((seed.task_type for seed in seeds if seed.task_type), None)
    write_lora_adapter(out, result.adapter, base_model_name, task_type, torch_dtype(config.out_dtype or config.dtype))

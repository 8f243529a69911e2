"""The adapter-native engine: adapter seeds in, a merged LoRA adapter (or full model) out.

``seedft`` and ``seedlora_dm`` (methods with a ``factored_kernel``) run on the factors,
exactly, and never form an m x n matrix;
``seedlora_twostage`` and ``lore`` materialise one module's deltas at a time and run the same
mergekit method object that ``mergekit-yaml`` runs (with a zero base, since a LoRA delta is
already the task vector; LoRE is translation-equivariant, so running it on the deltas gives
the merged delta).

Nothing here imports ``mergekit.config``, ``mergekit.common``, transformers or peft (seconds
of start-up that a LoRA-in, LoRA-out merge does not use); ``output.format: full`` alone
reaches for mergekit's dtype names.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from mergekit_seed.adapters.formats import AdapterSeed, read_adapter, write_lora_adapter
from mergekit_seed.errors import UserError
from mergekit_seed.linalg import LowRank, compress, factor_dense
from mergekit_seed.recipe import AdapterMergeConfig, evaluate_setting

LOG = logging.getLogger("mergekit_seed")


@dataclass
class ModuleReport:
    name: str
    rank: int
    kept_energy: float


def resolve_module_parameters(method, config: AdapterMergeConfig, tensor_name: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
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


def merge_module(method, tau: List[LowRank], shared: Dict[str, Any], per_seed: List[Dict[str, Any]], name: str) -> Union[LowRank, torch.Tensor]:
    """The merged delta of one module: a factor pair (methods exact on factors) or a dense matrix."""
    problems = method.parameter_problems(shared, len(tau))
    if problems:
        raise UserError(problems[0])
    if method.factored_kernel is not None:
        merged = method.factored_kernel(tau, shared, per_seed)
        scale = method.resolve_lambda(shared["lambda"], len(tau))
        return LowRank(scale * merged.left, merged.right)

    from mergekit.merge_methods.base import TensorGroup

    dense = [pair.dense() for pair in tau]
    if method.needs_base:
        group = TensorGroup.from_tensors([torch.zeros_like(dense[0])] + dense, base_index=0, name=name)
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


def _load_base_files(base: str) -> Path:
    folder = Path(base)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:
        raise UserError(f"base_model {base}: not a local folder and not downloadable ({str(error).splitlines()[0]})") from None


def write_full_model(out: Path, base: str, deltas: Dict[str, torch.Tensor], dtype: Optional[str]) -> None:
    """Copy the base model's files to ``out`` with each delta added to its weight."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mergekit.common import dtype_from_name

    folder = _load_base_files(base)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UserError(f"base_model {base}: no .safetensors weights found")
    out.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and not file.name.startswith("README"):
            shutil.copy2(file, out / file.name)
    target_dtype = dtype_from_name(dtype) if dtype else None
    remaining = set(deltas)
    for shard in shards:
        tensors = {}
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                tensor = reader.get_tensor(name)
                if name in deltas:
                    base_weight = tensor.float()
                    if base_weight.shape != deltas[name].shape:
                        raise UserError(
                            f"{name}: the adapters' delta has shape {tuple(deltas[name].shape)} but the base weight has {tuple(base_weight.shape)}"
                        )
                    tensor = (base_weight + deltas[name].float()).to(tensor.dtype)
                    remaining.discard(name)
                if target_dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(target_dtype)
                tensors[name] = tensor.contiguous()
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    if remaining:
        raise UserError(f"base_model {base}: has no weight {sorted(remaining)[0]} that the adapters change")


def _base_model_name(seeds: List[AdapterSeed], recipe_base: Optional[str], warn: Callable[[str], None]) -> Optional[str]:
    names = {seed.base_model for seed in seeds if seed.base_model}
    if len(names) > 1:
        warn(f"the adapters name different base models ({', '.join(sorted(names))}); merging them anyway")
    if recipe_base:
        return recipe_base
    return sorted(names)[0] if names else None


def run_adapter_merge(
    config: AdapterMergeConfig,
    out: Path,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = LOG.warning,
    device: str = "cpu",
) -> List[ModuleReport]:
    """Merge the adapter seeds of an adapter recipe into ``out`` (which must not exist yet).

    ``echo`` reports progress (silenced by ``quiet``); ``warn`` reports what is merged anyway
    (different base models, modules missing in some seeds). Each module is merged on
    ``device`` (mergekit's ``--device``/``--cuda``) and brought back to the CPU for writing.
    """
    from tqdm import tqdm

    from mergekit import merge_methods

    import mergekit_seed

    mergekit_seed.register()
    output = config.output
    report = echo  # results (the kept energy of a truncation) are printed even when quiet
    if quiet:
        echo = lambda _message: None  # noqa: E731
    method = merge_methods.get(config.merge_method)
    recipe_base = config.base_model
    if output.format == "full" and not recipe_base:
        raise UserError("output.format: full needs base_model (the model the adapters were trained on)")
    seeds = [read_adapter(entry.model) for entry in config.models]
    base_name = _base_model_name(seeds, recipe_base, warn)

    names = sorted(set().union(*(seed.deltas for seed in seeds)))
    module_kinds: Dict[str, str] = {}
    for seed in seeds:
        module_kinds.update(seed.module_kinds)
    merged_pairs: Dict[str, LowRank] = {}
    merged_dense: Dict[str, torch.Tensor] = {}
    modules: List[ModuleReport] = []
    for name in tqdm(names, desc="Merging modules", disable=quiet):
        shapes = {tuple(seed.deltas[name].shape) for seed in seeds if name in seed.deltas}
        if len(shapes) > 1:
            raise UserError(f"{name}: the adapters have different shapes {sorted(shapes)}; they are not for the same base model")
        missing = [str(seed.path) for seed in seeds if name not in seed.deltas]
        if missing:
            warn(f"{name}: missing in {', '.join(missing)}; counted as a zero delta there")
        shape = shapes.pop()
        tau = [(seed.deltas.get(name) or LowRank.zeros(shape)).to(device) for seed in seeds]
        shared, per_seed = resolve_module_parameters(method, config, name)
        merged = merge_module(method, tau, shared, per_seed, name)
        if output.format == "full":
            merged_dense[name] = (merged.dense() if isinstance(merged, LowRank) else merged).cpu()
            continue
        if isinstance(merged, LowRank):
            pair, kept = compress(merged, max_rank=output.rank)
        else:
            pair, kept = factor_dense(merged, max_rank=output.rank)
        merged_pairs[name] = pair.to("cpu")
        modules.append(ModuleReport(name, pair.rank, kept))

    if output.format == "full":
        write_full_model(out, recipe_base, merged_dense, config.out_dtype or config.dtype)
        echo(f"wrote a full model with {len(merged_dense)} merged modules")
        return modules
    task_type = next((seed.task_type for seed in seeds if seed.task_type), None)
    write_lora_adapter(out, merged_pairs, module_kinds, base_name, task_type)
    if output.rank is not None:
        lowest = min(modules, key=lambda module: module.kept_energy)
        report(
            f"rank {output.rank}: kept energy per module from {lowest.kept_energy:.4f} ({lowest.name}) "
            f"to {max(m.kept_energy for m in modules):.4f}"
        )
        for module in modules:
            LOG.info("%s: rank %d, kept energy %.6f", module.name, module.rank, module.kept_energy)
    echo(f"wrote a LoRA adapter with {len(merged_pairs)} modules")
    return modules

"""Reading PEFT LoRA and SeRA adapter folders as factored deltas, and writing LoRA adapters.

Every adapter module becomes a :class:`~mergekit_seed.linalg.LowRank` delta keyed by the base
weight it changes (``model.layers.0.self_attn.q_proj.weight``), in PyTorch (out, in) layout
for linear layers and (num_embeddings, dim) for embeddings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_seed.errors import UserError, first_validation_problem
from mergekit_seed.linalg import LowRank
from mergekit_seed.sera import CONFIG_NAME, KEY_PREFIX, PEFT_TYPE as SERA_TYPE, SeraConfig, sera_delta_factors

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
LINEAR, EMBEDDING = "linear", "embedding"


class LoraFolderConfig(BaseModel):
    """The fields of a PEFT LoRA ``adapter_config.json`` that define its delta."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(ge=1)
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Dict[str, int] = Field(default_factory=dict)
    alpha_pattern: Dict[str, float] = Field(default_factory=dict)
    base_model_name_or_path: Optional[str] = None
    task_type: Optional[str] = None


@dataclass
class AdapterSeed:
    """One seed: its folder, format, base model name and factored deltas by weight name."""

    path: Path
    kind: str
    base_model: Optional[str]
    deltas: Dict[str, LowRank]
    module_kinds: Dict[str, str] = field(default_factory=dict)
    task_type: Optional[str] = None


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT LoRA or SeRA adapter folder (it has an ``adapter_config.json``)."""
    return Path(path, CONFIG_NAME).is_file()


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"{folder}: not an adapter folder ({CONFIG_NAME} is missing)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None


def _read_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """The adapter's tensors: safetensors, or a ``.bin`` read with ``weights_only=True`` only."""
    safetensors_path = folder / SAFETENSORS_NAME
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{safetensors_path}: corrupt or truncated safetensors file ({error})") from None
    bin_path = folder / BIN_NAME
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler raises many types; all mean "refused"
            raise UserError(
                f"{bin_path}: refused (only plain tensors load with weights_only=True): "
                f"{str(error).splitlines()[0]}; convert it to {SAFETENSORS_NAME}"
            ) from None
    raise UserError(f"{folder}: no {SAFETENSORS_NAME} (or {BIN_NAME}) with the adapter weights")


def _check_finite(folder: Path, tensors: Dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{folder}: tensor {key} contains NaN or Inf; this adapter cannot be merged")


def _field_error(path: Path, error: ValidationError) -> UserError:
    location, message = first_validation_problem(error)
    return UserError(f"{path / CONFIG_NAME}: field '{location}': {message}")


def _pattern_value(patterns: Dict, module: str, default):
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key  # imported only when needed: peft takes seconds to import

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def read_lora(folder: Path, config: dict) -> AdapterSeed:
    try:
        lora = LoraFolderConfig.model_validate(config)
    except ValidationError as error:
        raise _field_error(folder, error) from None
    if lora.use_dora:
        raise UserError(
            f"{folder / CONFIG_NAME}: DoRA adapters (use_dora) are not a low-rank delta; merge them with model: BASE+ADAPTER"
        )
    tensors = _read_tensors(folder)
    _check_finite(folder, tensors)
    deltas: Dict[str, LowRank] = {}
    kinds: Dict[str, str] = {}
    for key, A in tensors.items():
        for a_suffix, b_suffix, kind in (
            (".lora_A.weight", ".lora_B.weight", LINEAR),
            (".lora_embedding_A", ".lora_embedding_B", EMBEDDING),
        ):
            if not key.endswith(a_suffix):
                continue
            module_key = key[: -len(a_suffix)]
            B = tensors.get(module_key + b_suffix)
            if B is None:
                raise UserError(f"{folder / SAFETENSORS_NAME}: {key} has no matching {b_suffix[1:]}")
            module = module_key[len(KEY_PREFIX) :] if module_key.startswith(KEY_PREFIX) else module_key
            r = _pattern_value(lora.rank_pattern, module, lora.r)
            alpha = _pattern_value(lora.alpha_pattern, module, lora.lora_alpha)
            scaling = alpha / math.sqrt(r) if lora.use_rslora else alpha / r
            A, B = A.float(), B.float()
            if kind == LINEAR:
                pair = LowRank(scaling * B, A)  # delta = scaling * B A, (out, in)
                if lora.fan_in_fan_out:
                    pair = LowRank(pair.right.T, pair.left.T)
            else:
                pair = LowRank(A.T, scaling * B.T)  # weight (num_embeddings, dim) += (B A)^T
            deltas[f"{module}.weight"] = pair
            kinds[f"{module}.weight"] = kind
    if not deltas:
        raise UserError(f"{folder / SAFETENSORS_NAME}: no lora_A/lora_B tensors found")
    return AdapterSeed(folder, "lora", lora.base_model_name_or_path, deltas, kinds, lora.task_type)


def read_sera(folder: Path, config: dict) -> AdapterSeed:
    try:
        sera = SeraConfig.model_validate(config)
    except ValidationError as error:
        location, message = first_validation_problem(error)
        raise UserError(f"{folder / CONFIG_NAME}: {location or 'config'}: {message}") from None
    tensors = _read_tensors(folder)
    _check_finite(folder, tensors)
    deltas: Dict[str, LowRank] = {}
    for key, A in tensors.items():
        if not key.endswith(".sera_A"):
            continue
        module_key = key[: -len(".sera_A")]
        C, B = tensors.get(module_key + ".sera_C"), tensors.get(module_key + ".sera_B")
        if C is None or B is None:
            raise UserError(f"{folder / SAFETENSORS_NAME}: {key} has no matching sera_C/sera_B")
        expected_A = (sera.split, A.shape[1], sera.r // sera.split)
        if tuple(A.shape) != expected_A or tuple(C.shape) != (sera.r, sera.r) or B.shape[:2] != (sera.split, sera.r // sera.split):
            raise UserError(
                f"{folder / SAFETENSORS_NAME}: {module_key} has shapes A {tuple(A.shape)}, C {tuple(C.shape)}, "
                f"B {tuple(B.shape)}, which do not match r={sera.r}, split={sera.split}"
            )
        module = module_key[len(KEY_PREFIX) :] if module_key.startswith(KEY_PREFIX) else module_key
        left, right = sera_delta_factors(A.float(), C.float(), B.float(), sera.scaling)
        deltas[f"{module}.weight"] = LowRank(left, right)
    if not deltas:
        raise UserError(f"{folder / SAFETENSORS_NAME}: no sera_A/sera_C/sera_B tensors found")
    kinds = {name: LINEAR for name in deltas}
    return AdapterSeed(folder, "sera", sera.base_model_name_or_path, deltas, kinds)


def locate_adapter(path: str | Path) -> Path:
    """A local adapter folder, or a Hub adapter repository downloaded to the Hub cache."""
    folder = Path(path)
    if folder.exists() or str(path).startswith(("/", ".", "~")):
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, "adapter_model.*"]))
    except Exception as error:
        raise UserError(f"{path}: not a local folder and not downloadable ({str(error).splitlines()[0]})") from None


def read_adapter(path: str | Path) -> AdapterSeed:
    """Read a PEFT LoRA or SeRA adapter folder; any problem is a one-line :class:`UserError`."""
    folder = locate_adapter(path)
    config = _read_config(folder)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == SERA_TYPE:
        return read_sera(folder, config)
    if peft_type == "LORA":
        return read_lora(folder, config)
    raise UserError(f"{folder / CONFIG_NAME}: peft_type {peft_type!r} is not supported (LORA or SERA)")


def write_lora_adapter(
    folder: Path,
    deltas: Dict[str, LowRank],
    module_kinds: Dict[str, str],
    base_model: Optional[str],
    task_type: Optional[str] = None,
) -> List[str]:
    """Write ``deltas`` as a PEFT LoRA adapter (scaling 1 everywhere); returns the target modules.

    Each module keeps its own rank through ``rank_pattern``/``alpha_pattern``; zero-rank
    deltas are left out. The ``adapter_config.json`` holds the fields of PEFT's
    ``LoraConfig`` that define the delta (PEFT fills in its defaults for the rest when it
    loads the folder); it is written directly because importing peft takes seconds.
    """
    from importlib.metadata import PackageNotFoundError, version

    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    embedding_modules: List[str] = []
    for name, pair in sorted(deltas.items()):
        if pair.rank == 0:
            continue
        module = name[: -len(".weight")]
        ranks[module] = pair.rank
        prefix = f"{KEY_PREFIX}{module}"
        if module_kinds.get(name) == EMBEDDING:
            embedding_modules.append(module)
            tensors[f"{prefix}.lora_embedding_A"] = pair.left.T.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = pair.right.T.contiguous()
        else:
            tensors[f"{prefix}.lora_A.weight"] = pair.right.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = pair.left.contiguous()
    if not ranks:
        raise UserError("every merged delta is zero: there is no adapter to write")
    r = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    try:
        config["peft_version"] = version("peft")
    except PackageNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    return sorted(ranks)

"""The SeRA layer (Eqs. 1-3) as PEFT would have it, so SeRA seeds can be trained and applied:
its config, the ``nn.Module`` and applying or folding it into a model.

A SeRA layer adds ``x A C B`` (row-vector form) to a frozen linear layer ``x W0^T``, where
A (d_in x r) is block-diagonal with ``split`` blocks A_k (d_in/split x r/split), C (r x r) is
dense, and B (r x d_out) is block-diagonal with blocks B_k (r/split x d_out/split):

    h = x W0^T + scaling * x A C B,     scaling = sera_alpha / r           (Eq. 1)

Init per the paper: A and C Kaiming-uniform, B zero (the adapter starts as the identity).
The delta's algebra is :mod:`mergekit_seed.maths.kernels.sera`; a SeRA adapter on disk is
:mod:`mergekit_seed.references.sera_files`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from mergekit_seed.maths.kernels.sera import sera_delta_factors
from mergekit_seed.untrusted import names_module


PEFT_TYPE = "SERA"


class SeraConfig(BaseModel):
    """SeRA hyper-parameters, stored as ``adapter_config.json``."""

    peft_type: str = PEFT_TYPE
    r: int = Field(8, ge=1)
    split: int = Field(8, ge=1)
    sera_alpha: float = Field(8.0, allow_inf_nan=False)
    target_modules: List[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    base_model_name_or_path: Optional[str] = None

    @model_validator(mode="after")
    def _split_divides_rank(self) -> "SeraConfig":
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.r % self.split:
            raise ValueError(f"split ({self.split}) must divide r ({self.r})")
        return self

    @property
    def scaling(self) -> float:
        return self.sera_alpha / self.r


class SeraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable SeRA update (Eqs. 1-3)."""

    def __init__(self, base: nn.Linear, r: int, split: int, scaling: float):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        if r % split or d_in % split or d_out % split:
            raise ValueError(f"SeRA split {split} must divide r ({r}), d_in ({d_in}) and d_out ({d_out})")
        self.base_layer = base
        self.split, self.r, self.scaling = split, r, scaling
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.sera_A = nn.Parameter(torch.empty(split, d_in // split, r // split, **factory))
        self.sera_C = nn.Parameter(torch.empty(r, r, **factory))
        self.sera_B = nn.Parameter(torch.zeros(split, r // split, d_out // split, **factory))
        for block in self.sera_A:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.sera_C, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """scaling * (A C B)^T in the base layer's (d_out, d_in) layout."""
        left, right = sera_delta_factors(self.sera_A, self.sera_C, self.sera_B, self.scaling)
        return left @ right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # Eq. 3: split x into sub-vectors, reduce each with its A_k, concatenate to c_in (r)
        pieces = x.to(self.sera_A.dtype).unflatten(-1, (self.split, -1))
        c_in = torch.einsum("...kd,kdr->...kr", pieces, self.sera_A).flatten(-2)
        # C recombines the reduced sub-vectors; each block of B expands its part again
        c_out = (c_in @ self.sera_C).unflatten(-1, (self.split, -1))
        update = torch.einsum("...kr,kro->...ko", c_out, self.sera_B).flatten(-2)
        return result + self.scaling * update.to(result.dtype)


def _matches(module_name: str, targets: List[str]) -> bool:
    """PEFT's rule for a list of ``target_modules`` (``check_target_module_exists``: the name
    itself or its last dotted parts); importing peft for it would cost seconds
    (``benchmarks/startup.json``), and a property test holds the two equal."""
    return any(names_module(module_name, t) for t in targets)


def apply_sera(model: nn.Module, config: SeraConfig) -> nn.Module:
    """Replace every ``nn.Linear`` named by ``config.target_modules`` with a :class:`SeraLinear`."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, config.target_modules)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear module matches target_modules {config.target_modules}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SeraLinear(module, config.r, config.split, config.scaling))
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_name.rsplit(".", 1)[-1].startswith("sera_"))
    return model


def sera_layers(model: nn.Module) -> Dict[str, SeraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SeraLinear)}


def merge_sera(model: nn.Module) -> nn.Module:
    """Fold every SeRA update into its base weight and put the plain ``nn.Linear`` back."""
    return _put_base_layers_back(model, fold=True)


def unload_sera(model: nn.Module) -> nn.Module:
    """Put every SeRA layer's plain ``nn.Linear`` back, its weight as it was (PEFT's ``unload``)."""
    return _put_base_layers_back(model, fold=False)


def _put_base_layers_back(model: nn.Module, fold: bool) -> nn.Module:
    for name, layer in sera_layers(model).items():
        base = layer.base_layer
        if fold:
            with torch.no_grad():
                base.weight += layer.delta_weight().to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    return model

"""mergekit ``MergeMethod`` specs wrapping the kernels, and their registration.

Importing this module registers the methods with mergekit. Each method is a
:class:`DeltaMergeMethod`: it forms the seed deltas
``tau_i = seed_i - base`` in float32, calls its kernel, and returns
``base + lambda * merged_delta`` in the base's dtype. Parameter names, types, ranges
and defaults here are the recipe format (see DESIGN.md); never rename them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import Field
from typing_extensions import Annotated, Literal

from mergekit_seed.kernels.seedft import seedft
from mergekit_seed.linalg import compute_dtype

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]

Kernel = Callable[[List[torch.Tensor], Dict[str, Any], TensorGroup], torch.Tensor]


@dataclass(frozen=True)
class Parameter:
    """A recipe parameter: its mergekit spec plus a human description for docs and `methods`."""

    name: str
    value_type: Any
    default: Any
    type_label: str
    description: str
    scope: ParameterScope = ParameterScope.SHARED

    def spec(self) -> ParameterSpec:
        return ParameterSpec(
            self.name,
            self.value_type,
            self.scope,
            default=self.default,
            description=self.description,
        )


class DeltaMergeMethod(GroupMergeMethod):
    """A base-required multi-seed method: ``base + lambda * kernel(tau_1..tau_N)``."""

    def __init__(
        self,
        *,
        name: str,
        pretty_name: str,
        paper: str,
        parameters: Tuple[Parameter, ...],
        kernel: Kernel,
        auto_lambda: Optional[Callable[[int], float]] = None,
    ):
        self.paper = paper
        self.parameters = parameters
        self.kernel = kernel
        self.auto_lambda = auto_lambda
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=None,
            parameters=tuple(p.spec() for p in parameters),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
        )

    def resolve_lambda(self, value: Union[float, str], seed_count: int) -> float:
        if value == "auto":
            return self.auto_lambda(seed_count)
        return float(value)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        work_dtype = compute_dtype(base)
        base_work = base.to(work_dtype)
        tau = [entry.tensor.to(work_dtype) - base_work for entry in group.non_base]
        delta = self.kernel(tau, parameters, group)
        scale = self.resolve_lambda(parameters["lambda"], len(tau))
        return (base_work + scale * delta.to(work_dtype)).to(base.dtype)


def _seedft_kernel(tau, parameters, group) -> torch.Tensor:
    return seedft(tau, rank=parameters["rank"], rtol=parameters["rtol"])


SEEDFT = DeltaMergeMethod(
    name="seedft",
    pretty_name="SeedFT",
    paper="SeedFT: Structure-Preserving Fusion for Multi-Seed LLM Fine-Tuning",
    parameters=(
        Parameter(
            "lambda",
            Union[Literal["auto"], float],
            "auto",
            "float | auto",
            "global scale alpha of Eq. 7; auto = 1/sqrt(N)",
        ),
        Parameter(
            "rank",
            Optional[PositiveInt],
            None,
            "int >= 1 | null",
            "cap on the kept rank r = min(r*, n, rank); null keeps the numerical rank",
        ),
        Parameter(
            "rtol",
            PositiveFloat,
            1e-6,
            "float > 0",
            "relative tolerance defining the numerical rank r* of Delta_c",
        ),
    ),
    kernel=_seedft_kernel,
    auto_lambda=lambda seed_count: 1.0 / math.sqrt(seed_count),
)

METHODS: Tuple[DeltaMergeMethod, ...] = (SEEDFT,)


def register_all() -> None:
    """Register every method with mergekit, skipping names already registered."""
    present = {method.spec.name for method in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in present:
            registry.register(method)


# Importing this module registers the methods; register_all() is idempotent.
register_all()


def describe(method: DeltaMergeMethod) -> Dict[str, Any]:
    """JSON-ready description of a method (used by ``mergekit-seed methods``)."""
    return {
        "name": method.spec.name,
        "pretty_name": method.spec.pretty_name,
        "paper": method.paper,
        "base_model": method.spec.contract.base.value,
        "min_seeds": method.spec.contract.min_non_base,
        "parameters": [
            {
                "name": p.name,
                "type": p.type_label,
                "default": p.default,
                "scope": "per-model" if p.scope != ParameterScope.SHARED else "global",
                "description": p.description,
            }
            for p in method.parameters
        ],
    }

"""mergekit ``MergeMethod`` specs wrapping the kernels (registration: plugin.py).

Each method is a :class:`SeedMergeMethod` around one kernel. Parameter names, types, ranges and defaults
here are the recipe format (docs/recipes.md, docs/methods/); never rename them.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
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

import mergekit_seed.kernel_timings as kernel_timings
from mergekit_seed.errors import MergeRefused
from mergekit_seed.finite import FLOAT32_MAX, is_finite_tensor
from mergekit_seed.maths.kernels.lore import DEFAULT_MU_RELATIVE, LoreEstimate, average, lore
from mergekit_seed.maths.kernels.seedft import seedft, seedft_factored
from mergekit_seed.maths.kernels.seedlora import (
    Fusion,
    eq4_weights,
    fuse_dare,
    fuse_mean,
    fuse_ties,
    seedlora_dm,
    seedlora_dm_factored,
    seedlora_twostage,
)
from mergekit_seed.maths.linalg import LowRank, compute_dtype


PositiveInt = Annotated[int, Field(ge=1)]
# no parameter takes NaN or Inf, or a number past float32's range (the kernels compute in
# float32): any of them would make merged tensors non-finite
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
OpenUnitFloat = Annotated[float, Field(gt=0, lt=1)]
UnitFloat = Annotated[float, Field(gt=0, le=1)]

Kernel = Callable[[List[torch.Tensor], Dict[str, Any], TensorGroup], torch.Tensor]
# (factored deltas, global parameters, per-seed parameters) -> merged delta, before lambda
FactoredKernel = Callable[[List[LowRank], Dict[str, Any], List[Dict[str, Any]]], LowRank]

MIN_SEEDS = 2

LOG = logging.getLogger("mergekit_seed")


@dataclass(frozen=True)
class Parameter:
    """A recipe parameter: its mergekit spec plus a human description for docs and `methods`."""

    name: str
    value_type: Any
    default: Any
    type_label: str
    description: str
    scope: ParameterScope = ParameterScope.SHARED
    shown_default: Any = None  # what `methods` shows when the spec default is a placeholder

    def spec(self) -> ParameterSpec:
        return ParameterSpec(
            self.name,
            self.value_type,
            self.scope,
            default=self.default,
            description=self.description,
        )


class SeedMergeMethod(GroupMergeMethod):
    """One of our methods as a mergekit ``GroupMergeMethod``.

    With ``needs_base`` (the default) the kernel receives the seed deltas
    ``tau_i = seed_i - base`` in float32 and returns the merged delta; the result is
    ``base + lambda * delta`` in the base's dtype. Without it, the kernel receives the
    models' weights (a listed base is not an input) and returns the merged weights.
    A method that is exact on low-rank factors also has a ``factored_kernel``, which the
    adapter-native engine uses instead of materialising the deltas; every method merges adapter
    seeds natively (the engine hands the others one module's dense deltas at a time).

    What the rest of the package used to copy about a method lives here too: ``needs_base``
    (recipes, cards, select's recipes), ``select_grid`` (the values ``mergekit-seed select``
    tries by default, {parameter: values}) and ``in_demo`` (whether the demo merges with it).
    Adding a method is one kernel, one entry in :data:`METHODS` and one docs page.
    """

    def __init__(
        self,
        *,
        name: str,
        pretty_name: str,
        paper: str,
        reference_url: str,
        parameters: Tuple[Parameter, ...],
        kernel: Kernel,
        needs_base: bool = True,
        factored_kernel: Optional[FactoredKernel] = None,
        auto_lambda: Optional[Callable[[int], float]] = None,
        seed_bounded: Tuple[str, ...] = (),
        exclusive: Tuple[Tuple[str, str], ...] = (),
        weighted_mean: bool = False,
        select_grid: Optional[Dict[str, Tuple[Any, ...]]] = None,
        in_demo: bool = True,
    ):
        self.paper = paper
        self.parameters = parameters
        self.kernel = kernel
        self.needs_base = needs_base
        self.factored_kernel = factored_kernel
        self.auto_lambda = auto_lambda
        self.seed_bounded = seed_bounded
        self.exclusive = exclusive
        self.weighted_mean = weighted_mean
        self.select_grid = dict(select_grid or {})
        self.in_demo = in_demo
        contract = (
            InputContract(base=BasePolicy.REQUIRED, min_non_base=MIN_SEEDS)
            if needs_base
            else InputContract(base=BasePolicy.IGNORED, min_inputs=MIN_SEEDS)
        )
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=reference_url,
            parameters=tuple(p.spec() for p in parameters),
            contract=contract,
        )

    def resolve_lambda(self, value: Union[float, str], seed_count: int) -> float:
        if value == "auto":
            return self.auto_lambda(seed_count)
        return float(value)

    def parameter_problems(
        self, values: Dict[str, Any], seed_count: int, seed_values: Optional[List[Dict[str, Any]]] = None
    ) -> List[str]:
        """Problems between parameters or with the seed count (e.g. ``min_agree`` <= N).

        ``seed_values`` are the seeds' own parameter values, where known: a method with
        ``weighted_mean`` checks their ``weight``s with its kernel's rule (Eq. 4 of
        ``seedlora_dm``: weights that sum to zero cannot be normalised by their sum).
        """
        problems = []
        weights = [entry.get("weight") for entry in seed_values or []]
        if (
            self.weighted_mean
            and weights
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
        ):
            try:
                eq4_weights(weights, values.get("normalize", True) is True, len(weights))
            except ValueError as error:
                problems.append(str(error))
        for first, second in self.exclusive:
            if values.get(first) is not None and values.get(second) is not None:
                problems.append(f"parameters '{first}' and '{second}' exclude each other; give one")
        for name in self.seed_bounded:
            value = values.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > seed_count:
                problems.append(f"parameter '{name}' = {value} exceeds the number of seeds ({seed_count})")
        return problems

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        with kernel_timings.method_time(self.spec.name):
            return self._checked_merge(group, parameters)

    def _checked_merge(self, group: TensorGroup, parameters: Dict[str, Any]) -> torch.Tensor:
        # A NaN or Inf in any input shows up in the result or fails a decomposition (the rank
        # tests of linalg refuse non-finite singular values rather than dropping them), so the
        # inputs are only scanned, to name the culprit, when one of those happens
        try:
            result = self._merge(group, parameters)
        except (RuntimeError, ValueError, torch.linalg.LinAlgError):
            self._refuse_non_finite(group)  # a decomposition failed: name the culprit if any
            raise
        if not is_finite_tensor(result):
            self._refuse_non_finite(group)
            raise MergeRefused(
                f"tensor {group.metadata.name}: {self.spec.name} gives NaN or Inf from finite inputs; "
                f"lower lambda or the weights (the result must fit in {result.dtype})"
            )
        return result

    @staticmethod
    def _refuse_non_finite(group: TensorGroup) -> None:
        for entry in group.entries:
            if not is_finite_tensor(entry.tensor):
                raise MergeRefused(
                    f"{entry.id}: tensor {group.metadata.name} contains NaN or Inf; "
                    "re-export that checkpoint or leave it out"
                )

    def _merge(self, group: TensorGroup, parameters: Dict[str, Any]) -> torch.Tensor:
        inputs = [entry.tensor for entry in group.entries if not entry.is_base]
        if len(inputs) < MIN_SEEDS:
            raise MergeRefused(
                f"{self.spec.name} needs at least {MIN_SEEDS} models for {group.metadata.name}, got {len(inputs)}"
            )
        problems = self.parameter_problems(parameters, len(inputs))
        if problems:
            raise MergeRefused(problems[0])
        if not self.needs_base:
            return self.kernel(inputs, parameters, group).to(inputs[0].dtype)
        base = group.base.tensor
        work_dtype = compute_dtype(base)
        scale = self.resolve_lambda(parameters["lambda"], len(inputs))
        if not math.isfinite(scale) or abs(scale) > torch.finfo(work_dtype).max:
            raise MergeRefused(f"parameter 'lambda' = {scale!r}: must be a finite number within {work_dtype}'s range")
        base_work = base.to(work_dtype)
        tau = [_minus(tensor, base_work) for tensor in inputs]
        delta = self.kernel(tau, parameters, group)
        if base_work is base:  # mergekit's tensor: leave it alone
            return torch.add(base, delta.to(work_dtype), alpha=scale)
        return base_work.add_(delta.to(work_dtype), alpha=scale).to(base.dtype)


def _minus(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``tensor - base`` in ``base``'s dtype. A converted copy is reused for the result: a
    subtraction across dtypes (bf16 - float32) takes torch's slow path, about 3x a conversion."""
    if tensor.dtype == base.dtype:
        return tensor - base
    return tensor.to(base.dtype).sub_(base)


def _seedft_kernel(tau, parameters, group) -> torch.Tensor:
    return seedft(tau, rank=parameters["rank"], rtol=parameters["rtol"], profile=kernel_timings.SEEDFT)


def _seedft_factored_kernel(tau, shared, per_seed) -> LowRank:
    return seedft_factored(tau, rank=shared["rank"], rtol=shared["rtol"])


SEEDFT = SeedMergeMethod(
    name="seedft",
    reference_url="https://openreview.net/forum?id=XPxfT3ttAi",
    pretty_name="SeedFT",
    paper="SeedFT: Structure-Preserving Fusion for Multi-Seed LLM Fine-Tuning",
    parameters=(
        Parameter(
            "lambda",
            Union[Literal["auto"], FiniteFloat],
            "auto",
            "float | auto",
            "global scale alpha (Eqs. 2 and 7); auto = 1/sqrt(N)",
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
    factored_kernel=_seedft_factored_kernel,
    auto_lambda=lambda seed_count: 1.0 / math.sqrt(seed_count),
    select_grid={"lambda": ("auto", 1.0)},
)

LAMBDA = Parameter("lambda", FiniteFloat, 1.0, "float", "global scale of the merged delta")


def _seedlora_dm_kernel(tau, parameters, group) -> torch.Tensor:
    weights = parameters["weight"].values_for(group.non_base)
    return seedlora_dm(tau, weights=weights, normalize=parameters["normalize"])


def _seedlora_dm_factored_kernel(tau, shared, per_seed) -> LowRank:
    weights = [values["weight"] for values in per_seed]
    return seedlora_dm_factored(tau, weights=weights, normalize=shared["normalize"])


SEEDLORA_DM = SeedMergeMethod(
    name="seedlora_dm",
    reference_url="https://openreview.net/forum?id=jkCvAAcSDa",
    pretty_name="SeedLoRA (distribution matching)",
    paper="SeedLoRA: A Fusion Approach to Efficient LLM Fine-Tuning (weight distribution matching, Sec. 3.4)",
    parameters=(
        Parameter(
            "weight",
            FiniteFloat,
            1.0,
            "float",
            "importance weight w_i of a seed (Eq. 4)",
            scope=ParameterScope.NON_BASE,
        ),
        Parameter("normalize", bool, True, "bool", "divide the weighted sum by sum(w_i); false: by N"),
        LAMBDA,
    ),
    kernel=_seedlora_dm_kernel,
    factored_kernel=_seedlora_dm_factored_kernel,
    weighted_mean=True,
)


def make_fusion(name: str, density: float, seed: Optional[int], tensor_name: Optional[str]) -> Fusion:
    """The stage-2 fusion of the coordinates Z (N, r, r): the kernel's rule bound to mergekit's
    sparsification with the recipe's ``density`` (and, for DARE, its random stream)."""
    if name == "mean":
        return fuse_mean
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    if name == "ties":
        return partial(fuse_ties, trim=lambda z: sparsify(z, density, SparsificationMethod.magnitude))

    def drop(z: torch.Tensor) -> torch.Tensor:
        return sparsify(z, density, SparsificationMethod.random, rescale_norm=RescaleNorm.l1)

    def fuse_dare_seeded(Z: torch.Tensor) -> torch.Tensor:
        if seed is None:
            return fuse_dare(Z, drop)  # global RNG: mergekit's --random-seed makes it reproducible
        devices = [Z.device] if Z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # one stream per tensor, so equal-shaped tensors do not share a mask
            torch.manual_seed(seed ^ zlib.crc32((tensor_name or "").encode()))
            return fuse_dare(Z, drop)

    return fuse_dare_seeded


def _seedlora_twostage_kernel(tau, parameters, group) -> torch.Tensor:
    fusion = make_fusion(parameters["fusion"], parameters["density"], parameters["seed"], group.metadata.name)
    return seedlora_twostage(
        tau,
        threshold=parameters["threshold"],
        threshold_quantile=parameters["threshold_quantile"],
        min_agree=parameters["min_agree"],
        rank=parameters["rank"],
        energy=parameters["energy"],
        fusion=fusion,
    )


SEEDLORA_TWOSTAGE = SeedMergeMethod(
    name="seedlora_twostage",
    reference_url="https://openreview.net/forum?id=7QH48TtFZX",
    pretty_name="SeedLoRA (two-stage)",
    paper="SeedLoRA: A Fusion Approach to Efficient LLM Fine-Tuning (robust/conflict + subspace fusion, Sec. 3.4)",
    parameters=(
        Parameter(
            "threshold",
            Optional[NonNegativeFloat],
            None,
            "float >= 0 | null",
            "absolute magnitude threshold sigma; overrides threshold_quantile",
        ),
        Parameter(
            "threshold_quantile",
            OpenUnitFloat,
            0.5,
            "0 < float < 1",
            "sigma = this quantile of |tau_i(j)| over all seeds' entries (0.5 = median)",
        ),
        Parameter(
            "min_agree",
            Optional[PositiveInt],
            None,
            "int >= 1 | null",
            "large same-sign entries needed for a robust entry; null = ceil(N/2)",
        ),
        Parameter("rank", Optional[PositiveInt], None, "int >= 1 | null", "stage-2 SVD rank; null: use energy"),
        Parameter(
            "energy",
            UnitFloat,
            0.99,
            "0 < float <= 1",
            "share of ||M_avg||_F^2 the stage-2 rank keeps when rank is null",
        ),
        Parameter(
            "fusion",
            Literal["mean", "ties", "dare"],
            "mean",
            "mean | ties | dare",
            "how the projected coordinates Z_i are fused",
        ),
        Parameter("density", UnitFloat, 0.5, "0 < float <= 1", "kept share for ties/dare fusion"),
        Parameter("seed", Optional[int], None, "int | null", "random seed for dare fusion"),
        LAMBDA,
    ),
    kernel=_seedlora_twostage_kernel,
    seed_bounded=("min_agree",),
    select_grid={"energy": (0.9, 0.99)},
)


def _lore_kernel(theta, parameters, group) -> torch.Tensor:
    name = group.metadata.name

    def report(estimate: LoreEstimate) -> None:
        LOG.info(
            "lore %s: mu=%.4g, %d iterations, kept ranks %s", name, estimate.mu, estimate.iterations, estimate.ranks
        )

    if parameters["post_merge"] == "average":
        post_merge = average
    else:
        post_merge = make_fusion("ties", parameters["density"], None, name)
    return lore(
        theta,
        mu=parameters["mu"],
        mu_relative=parameters["mu_relative"],
        iterations=parameters["iterations"],
        tol=parameters["tol"],
        post_merge=post_merge,
        lambda_=parameters["lambda"],
        report=report,
        profile=kernel_timings.LORE,
    )


LORE = SeedMergeMethod(
    name="lore",
    reference_url="https://arxiv.org/abs/2502.10749",
    pretty_name="LoRE-Merging",
    paper="LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
    parameters=(
        Parameter(
            "mu",
            Optional[NonNegativeFloat],
            None,
            "float >= 0 | null",
            "absolute nuclear-norm weight mu of Eq. 1 (excludes mu_relative)",
        ),
        Parameter(
            "mu_relative",
            Optional[NonNegativeFloat],
            None,
            "float >= 0 | null",
            "mu = mu_relative * max_i ||theta_i - mean theta||_2 per tensor; used when mu is null",
            shown_default=DEFAULT_MU_RELATIVE,
        ),
        Parameter("iterations", PositiveInt, 10, "int >= 1", "coordinate-descent iterations"),
        Parameter(
            "tol",
            NonNegativeFloat,
            1e-6,
            "float >= 0",
            "stop when ||theta0 change|| <= tol * ||theta0||; 0 runs every iteration",
        ),
        Parameter(
            "post_merge",
            Literal["average", "ties"],
            "average",
            "average | ties",
            "how the low-rank task vectors delta_i are combined",
        ),
        Parameter("density", UnitFloat, 0.5, "0 < float <= 1", "kept share for post_merge: ties"),
        LAMBDA,
    ),
    kernel=_lore_kernel,
    needs_base=False,
    exclusive=(("mu", "mu_relative"),),
    select_grid={"mu_relative": (0.05, 0.1, 0.2)},
)

# The one list of our methods: registration, `methods`, validation, select, the demo and the
# tests read it (through our_methods(), at call time).
METHODS: Tuple[SeedMergeMethod, ...] = (SEEDFT, SEEDLORA_DM, SEEDLORA_TWOSTAGE, LORE)


def our_methods() -> Tuple[SeedMergeMethod, ...]:
    """Every method of this package, in :data:`METHODS`' order."""
    return METHODS


def our_method_names() -> Tuple[str, ...]:
    return tuple(method.spec.name for method in our_methods())


def is_ours(method: Any) -> bool:
    """Whether a registered mergekit method is one of this package's."""
    return isinstance(method, SeedMergeMethod)


def describe(method: SeedMergeMethod) -> Dict[str, Any]:
    """JSON-ready description of a method (used by ``mergekit-seed methods``)."""
    return {
        "name": method.spec.name,
        "pretty_name": method.spec.pretty_name,
        "paper": method.paper,
        "reference_url": method.spec.reference_url,
        "base_model": "required" if method.needs_base else "not used",
        "min_seeds": MIN_SEEDS,
        "parameters": [
            {
                "name": p.name,
                "type": p.type_label,
                "default": p.default if p.shown_default is None else p.shown_default,
                "scope": "per-model" if p.scope != ParameterScope.SHARED else "global",
                "description": p.description,
            }
            for p in method.parameters
        ],
    }

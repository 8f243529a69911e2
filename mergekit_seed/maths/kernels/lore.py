"""LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging (Sec. 3.2).

The extracted paper lost its formulas; docs/methods/lore.md restates them. For models theta_i
(i = 1..N) of one shape, LoRE estimates a base theta0 and low-rank task vectors delta_i:

    min_{theta0, delta_i}  sum_i 1/2 ||theta0 + delta_i - theta_i||_F^2 + mu ||delta_i||_*   (Eq. 1)

by coordinate descent (Eq. 2) from delta_i = 0. One iteration:
    theta0  <- (1/N) sum_i (theta_i - delta_i)
    delta_i <- SVT_mu(theta_i - theta0),   SVT_mu(X) = U max(S - mu, 0) V^T
and the merge is theta0 + lambda * post_merge(delta_1..delta_N).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from mergekit_seed.maths.linalg import (
    LowRank,
    Shifted,
    Thresholded,
    compute_dtype,
    singular_value_threshold,
    spectral_norm,
)
from mergekit_seed.maths.profile import Profile, timed


DEFAULT_MU_RELATIVE = 0.1


@dataclass
class LoreEstimate:
    """The solution of Eq. 1 after the last iteration.

    ``theta0`` (m, n); ``factors`` the delta_i as low-rank pairs (U_i max(S_i - mu, 0), V_i^T);
    ``ranks`` the kept rank of each delta_i; ``objective`` the value of Eq. 1 after each
    iteration (only when tracked).
    """

    theta0: torch.Tensor
    factors: List[LowRank]
    mu: float
    iterations: int
    ranks: List[int]
    objective: List[float] = field(default_factory=list)

    @property
    def deltas(self) -> List[torch.Tensor]:
        """delta_i as (m, n) matrices."""
        return [f.dense() for f in self.factors]


def mean_and_deviations(theta: Sequence[torch.Tensor]):
    """The mean of the models and each one's deviation from it, theta_i - mean (both (m, n)),
    in the compute dtype (:func:`compute_dtype`), without a converted copy of the models."""
    mean = torch.zeros(theta[0].shape, dtype=compute_dtype(theta[0]), device=theta[0].device)
    for t in theta:
        mean += t
    mean /= len(theta)
    return mean, [torch.sub(t, mean) for t in theta]


def relative_mu(theta: Sequence[torch.Tensor], mu_relative: float) -> float:
    """mu = mu_relative * max_i ||theta_i - mean_j theta_j||_2 (spectral norm)."""
    return _mu_of_deviations(mean_and_deviations(theta)[1], mu_relative)


def _mu_of_deviations(deviations: Sequence[torch.Tensor], mu_relative: float) -> float:
    return mu_relative * max(spectral_norm(d).item() for d in deviations)


def objective(theta, theta0, deltas, nuclear_norms, mu: float) -> float:
    """Eq. 1 in float64."""
    fit = sum(0.5 * (theta0 + d - t).double().pow(2).sum().item() for t, d in zip(theta, deltas))
    return fit + mu * sum(nuclear_norms)


def _factored(rank: int, shape) -> bool:
    """Whether a rank-``rank`` sum of deltas stays factored inside the iteration: applying its
    factors to a sketch then costs at most an eighth of a pass over an (m, n) matrix per
    column, and forming it would cost a rank-``rank`` GEMM per iteration."""
    m, n = shape
    return 8 * rank * (m + n) <= m * n


class _MeanDelta:
    """dbar = (1/N) sum_i delta_i of one iteration: factored while its rank is small
    (:func:`_factored`), formed once (``dense``) otherwise; theta0 = mean - dbar."""

    def __init__(self, factors: Sequence[LowRank], mean: torch.Tensor):
        self.low_rank = LowRank.sum(factors)
        self.low_rank.left.div_(len(factors))
        self.factored = _factored(self.low_rank.rank, tuple(mean.shape))
        self.dense = None if self.factored else self.low_rank.dense()
        self._mean = mean
        self._theta0: Optional[torch.Tensor] = None

    def residual_of(self, deviation: torch.Tensor, buffer: Optional[torch.Tensor]):
        """theta_i - theta0 = D_i + dbar: D_i itself, a :class:`Shifted`, or formed in ``buffer``."""
        if not self.low_rank.rank:
            return deviation
        if self.factored:
            return Shifted(deviation, self.low_rank)
        return torch.add(deviation, self.dense, out=buffer)

    def step_from(self, previous: Optional["_MeanDelta"]) -> Optional[LowRank]:
        """dbar_t - dbar_{t-1} = theta0_{t-1} - theta0_t, what every residual gained since the
        last iteration, as factors while both are factored (else None)."""
        if previous is None or not self.factored or previous.dense is not None:
            return None
        return LowRank.sum([self.low_rank, LowRank(-previous.low_rank.left, previous.low_rank.right)])

    def norm(self) -> float:
        return self.low_rank.norm() if self.factored else torch.linalg.vector_norm(self.dense).item()

    def formed(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.low_rank.dense()

    @property
    def theta0(self) -> torch.Tensor:
        """theta0 = mean - dbar (m, n), computed once."""
        if self._theta0 is None:
            if self.dense is not None:
                self._theta0 = self._mean - self.dense
            else:
                self._theta0 = torch.addmm(self._mean, self.low_rank.left, self.low_rank.right, alpha=-1)
        return self._theta0


def _converged(
    mean_norm: float, current: _MeanDelta, previous: _MeanDelta, step: Optional[LowRank], tol: float
) -> bool:
    """||theta0_t - theta0_{t-1}||_F <= tol * ||theta0_t||_F.

    The change equals ||dbar_t - dbar_{t-1}||_F: from the factors while both are factored
    (their Gram matrices cost about as much as applying them once), densely once dbar is
    formed (a noise-dominated spectrum: the factored norm then took 60% of the merge).
    ||theta0_t||_F lies within ||mean||_F -+ ||dbar_t||_F, so theta0 is formed only when the
    test falls between the two.
    """
    if step is not None:
        change = step.norm()
    else:
        change = torch.linalg.vector_norm(current.formed() - previous.formed()).item()
    spread = current.norm()
    if change <= tol * (mean_norm - spread):
        return True
    if change <= tol * (mean_norm + spread):
        return change <= tol * torch.linalg.vector_norm(current.theta0).item()
    return False


def lore_estimate(
    theta: Sequence[torch.Tensor],
    mu: Optional[float] = None,
    mu_relative: Optional[float] = None,
    iterations: int = 10,
    tol: float = 1e-6,
    track_objective: bool = False,
    profile: Optional[Profile] = None,
) -> LoreEstimate:
    """Coordinate descent on Eq. 1 for 2-D ``theta`` (each (m, n)).

    ``mu`` is absolute; otherwise ``mu_relative`` (default 0.1) sets it via
    :func:`relative_mu`. Stops after ``iterations`` or once
    ||theta0_t - theta0_{t-1}||_F <= tol * ||theta0_t||_F (``tol`` = 0: never early).

    With D_i = theta_i - mean_j theta_j and the mean delta dbar = (1/N) sum_j delta_j, the
    theta0 block gives theta0 = mean - dbar, so the delta_i block thresholds the residual
    theta_i - theta0 = D_i + dbar. The D_i are formed once; while dbar's rank is small it stays
    factored (:class:`Shifted`), so an iteration forms no m x n matrix at all, and each SVT is
    warm-started from the same delta's SVT in the previous iteration, whose residual differs
    by the change of dbar (see :func:`singular_value_threshold`). A noise-dominated spectrum
    keeps ranks near min(m, n); dbar is then formed once per iteration. ``profile`` gets the
    thresholdings' seconds ("svt"), counts (iterations, SVTs, full SVDs, sketches), largest rank.
    """
    mean, deviations = mean_and_deviations(theta)
    if mu is None:
        mu = _mu_of_deviations(deviations, DEFAULT_MU_RELATIVE if mu_relative is None else mu_relative)
    mean_norm = torch.linalg.vector_norm(mean).item()
    factors = [LowRank.zeros(tuple(mean.shape), dtype=mean.dtype, device=mean.device) for _ in deviations]
    thresholdings: List[Optional[Thresholded]] = [None] * len(deviations)
    residual: Optional[torch.Tensor] = None  # the residuals' buffer once dbar is formed
    previous: Optional[_MeanDelta] = None
    history: List[float] = []
    mean_delta, done = _MeanDelta(factors, mean), 0
    for done in range(1, iterations + 1):
        mean_delta = _MeanDelta(factors, mean)  # Eq. 2, theta0 block: theta0 = mean - dbar
        step = mean_delta.step_from(previous)
        # Eq. 2, delta_i blocks: singular value thresholding of theta_i - theta0 = D_i + dbar
        nuclear_norms = []
        with timed(profile, "svt"):
            for index, deviation in enumerate(deviations):
                matrix = mean_delta.residual_of(deviation, residual)
                if mean_delta.dense is not None:
                    residual = matrix
                thresholdings[index] = singular_value_threshold(
                    matrix, mu, warm_start=thresholdings[index], change=step
                )
                factors[index] = thresholdings[index].low_rank
                nuclear_norms.append(thresholdings[index].shrunk.sum().item())
        _record_svts(profile, thresholdings)
        if track_objective:
            models = [mean + d for d in deviations]  # theta_i, in the compute dtype
            history.append(objective(models, mean_delta.theta0, [f.dense() for f in factors], nuclear_norms, mu))
        converged = previous is not None and tol > 0 and _converged(mean_norm, mean_delta, previous, step, tol)
        previous = mean_delta
        if converged:
            break
    return LoreEstimate(
        theta0=mean_delta.theta0,
        factors=factors,
        mu=mu,
        iterations=done,
        ranks=[t.rank if t is not None else 0 for t in thresholdings],
        objective=history,
    )


def _record_svts(profile: Optional[Profile], thresholdings: Sequence[Thresholded]) -> None:
    if profile is None:
        return
    profile.count("iterations")
    for thresholded in thresholdings:
        profile.count("svts")
        profile.count("full_svds", thresholded.full_svd)
        profile.count("sketches", thresholded.sketches)
        profile.see("rank", thresholded.rank)


def average(deltas: torch.Tensor) -> torch.Tensor:
    """Average Merging of stacked task vectors (N, ...)."""
    return deltas.mean(0)


def lore(
    theta: Sequence[torch.Tensor],
    mu: Optional[float] = None,
    mu_relative: Optional[float] = None,
    iterations: int = 10,
    tol: float = 1e-6,
    post_merge: Callable[[torch.Tensor], torch.Tensor] = average,
    lambda_: float = 1.0,
    report: Optional[Callable[[LoreEstimate], None]] = None,
    profile: Optional[Profile] = None,
) -> torch.Tensor:
    """The merged weights theta0 + lambda * post_merge(delta_1..delta_N).

    ``theta`` are the models' weights (not deltas: no base is needed). Tensors that are not
    2-D get the mean of the models. ``report`` receives the estimate (iterations, ranks);
    ``profile`` counts the matrices estimated and gets :func:`lore_estimate`'s profile.
    Returns float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(theta[0])
    if theta[0].ndim != 2:
        return torch.stack([t.to(dtype) for t in theta]).mean(0)
    estimate = lore_estimate(theta, mu, mu_relative, iterations, tol, profile=profile)
    if profile is not None:
        profile.count("matrices")
    if report is not None:
        report(estimate)
    if post_merge is average:
        # theta0 + lambda * (1/N) sum_i delta_i, from the factors
        delta_sum = LowRank.sum(estimate.factors)
        return torch.addmm(estimate.theta0, delta_sum.left, delta_sum.right, alpha=lambda_ / len(theta))
    return estimate.theta0 + lambda_ * post_merge(torch.stack(estimate.deltas))

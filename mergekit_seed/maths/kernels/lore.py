"""LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging (Sec. 3.2).

The extracted paper lost its formulas; DESIGN.md restates them. For models theta_i
(i = 1..N) of one shape, LoRE estimates a base theta0 and low-rank task vectors delta_i:

    min_{theta0, delta_i}  sum_i 1/2 ||theta0 + delta_i - theta_i||_F^2 + mu ||delta_i||_*   (Eq. 1)

by coordinate descent (Eq. 2) from delta_i = 0. One iteration:
    theta0  <- (1/N) sum_i (theta_i - delta_i)
    delta_i <- SVT_mu(theta_i - theta0),   SVT_mu(X) = U max(S - mu, 0) V^T
and the merge is theta0 + lambda * post_merge(delta_1..delta_N).
"""

from __future__ import annotations

import time
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
    # how the SVTs went, for profiling: kept ranks per iteration, full SVDs among them (a
    # noise-dominated residual keeps too many singular values for a randomized sketch),
    # randomized sketches tried, and seconds spent thresholding
    rank_history: List[List[int]] = field(default_factory=list)
    full_svds: int = 0
    sketches: int = 0
    svt_seconds: float = 0.0

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
    fit = sum(
        0.5 * (theta0 + d - t).double().pow(2).sum().item() for t, d in zip(theta, deltas)
    )
    return fit + mu * sum(nuclear_norms)


def _factored(rank: int, shape) -> bool:
    """Whether a rank-``rank`` sum of deltas stays factored inside the iteration: applying its
    factors to a sketch then costs at most an eighth of a pass over an (m, n) matrix per
    column, and forming it would cost a rank-``rank`` GEMM per iteration."""
    m, n = shape
    return 8 * rank * (m + n) <= m * n


def lore_estimate(
    theta: Sequence[torch.Tensor],
    mu: Optional[float] = None,
    mu_relative: Optional[float] = None,
    iterations: int = 10,
    tol: float = 1e-6,
    track_objective: bool = False,
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
    keeps ranks near min(m, n); dbar is then formed once per iteration.
    """
    mean, deviations = mean_and_deviations(theta)
    dtype = mean.dtype
    if mu is None:
        mu = _mu_of_deviations(deviations, DEFAULT_MU_RELATIVE if mu_relative is None else mu_relative)
    count = len(deviations)
    shape = tuple(mean.shape)
    mean_norm = torch.linalg.vector_norm(mean).item()
    factors = [LowRank.zeros(shape, dtype=dtype, device=mean.device) for _ in deviations]
    thresholdings: List[Optional[Thresholded]] = [None] * count
    residual: Optional[torch.Tensor] = None  # the residuals' buffer once dbar is formed
    previous: Optional[LowRank] = None  # the previous iteration's dbar
    previous_dense: Optional[torch.Tensor] = None
    history: List[float] = []
    ranks: List[int] = [0] * count
    rank_history: List[List[int]] = []
    full_svds = sketches = 0
    svt_seconds = 0.0
    done = 0
    mean_delta, mean_delta_dense = LowRank.sum(factors), None
    theta0: Optional[torch.Tensor] = None
    for done in range(1, iterations + 1):
        # Eq. 2, theta0 block: theta0 = mean_i (theta_i - delta_i) = mean - dbar
        mean_delta = LowRank.sum(factors)
        mean_delta.left.div_(count)
        factored = _factored(mean_delta.rank, shape)
        mean_delta_dense = None if factored else mean_delta.dense()
        # dbar_t - dbar_{t-1} = theta0_{t-1} - theta0_t: what every residual gained since the
        # last iteration (kept factored while both are)
        step = None
        if previous is not None and factored and previous_dense is None:
            step = LowRank.sum([mean_delta, LowRank(-previous.left, previous.right)])
        # Eq. 2, delta_i blocks: singular value thresholding of theta_i - theta0 = D_i + dbar
        nuclear_norms = []
        started = time.perf_counter()
        for index, d in enumerate(deviations):
            if not mean_delta.rank:
                matrix = d
            elif factored:
                matrix = Shifted(d, mean_delta)
            else:
                residual = matrix = torch.add(d, mean_delta_dense, out=residual)
            thresholded = singular_value_threshold(matrix, mu, warm_start=thresholdings[index], change=step)
            factors[index] = thresholded.low_rank
            thresholdings[index] = thresholded
            ranks[index] = thresholded.rank
            full_svds += thresholded.full_svd
            sketches += thresholded.sketches
            nuclear_norms.append(thresholded.shrunk.sum().item())
        svt_seconds += time.perf_counter() - started
        rank_history.append(list(ranks))
        theta0 = None
        if track_objective:
            theta0 = _theta0(mean, mean_delta, mean_delta_dense)
            models = [mean + d for d in deviations]  # theta_i, in the compute dtype
            history.append(objective(models, theta0, [f.dense() for f in factors], nuclear_norms, mu))
        # ||theta0_t - theta0_{t-1}||_F = ||dbar_t - dbar_{t-1}||_F: from the factors while
        # both are factored (their Gram matrices cost about as much as applying them once),
        # densely once dbar is formed (a noise-dominated spectrum: the factored norm then took
        # 60% of the merge)
        converged = False
        if previous is not None and tol > 0:
            if step is not None:
                change = step.norm()
            else:
                change = torch.linalg.vector_norm(
                    (mean_delta_dense if mean_delta_dense is not None else mean_delta.dense())
                    - (previous_dense if previous_dense is not None else previous.dense())
                ).item()
            # ||theta0_t||_F lies within ||mean||_F -+ ||dbar_t||_F: formed only when the test
            # falls between the two
            spread = mean_delta.norm() if factored else torch.linalg.vector_norm(mean_delta_dense).item()
            if change <= tol * (mean_norm - spread):
                converged = True
            elif change <= tol * (mean_norm + spread):
                if theta0 is None:
                    theta0 = _theta0(mean, mean_delta, mean_delta_dense)
                converged = change <= tol * torch.linalg.vector_norm(theta0).item()
        previous, previous_dense = mean_delta, mean_delta_dense
        if converged:
            break
    if theta0 is None:
        theta0 = _theta0(mean, mean_delta, mean_delta_dense)
    return LoreEstimate(
        theta0=theta0, factors=factors, mu=mu, iterations=done, ranks=ranks, objective=history,
        rank_history=rank_history, full_svds=full_svds, sketches=sketches, svt_seconds=svt_seconds,
    )


def _theta0(mean: torch.Tensor, mean_delta: LowRank, mean_delta_dense: Optional[torch.Tensor]) -> torch.Tensor:
    """theta0 = mean - dbar (m, n), from dbar's factors or its formed matrix."""
    if mean_delta_dense is not None:
        return mean - mean_delta_dense
    return torch.addmm(mean, mean_delta.left, mean_delta.right, alpha=-1)


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
) -> torch.Tensor:
    """The merged weights theta0 + lambda * post_merge(delta_1..delta_N).

    ``theta`` are the models' weights (not deltas: no base is needed). Tensors that are not
    2-D get the mean of the models. ``report`` receives the estimate (iterations, ranks).
    Returns float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(theta[0])
    if theta[0].ndim != 2:
        return torch.stack([t.to(dtype) for t in theta]).mean(0)
    estimate = lore_estimate(theta, mu, mu_relative, iterations, tol)
    if report is not None:
        report(estimate)
    if post_merge is average:
        # theta0 + lambda * (1/N) sum_i delta_i, from the factors
        delta_sum = LowRank.sum(estimate.factors)
        return torch.addmm(estimate.theta0, delta_sum.left, delta_sum.right, alpha=lambda_ / len(theta))
    return estimate.theta0 + lambda_ * post_merge(torch.stack(estimate.deltas))

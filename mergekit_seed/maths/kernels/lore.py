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

from mergekit_seed.maths.linalg import LowRank, Thresholded, compute_dtype, singular_value_threshold, spectral_norm

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


def relative_mu(theta: Sequence[torch.Tensor], mu_relative: float) -> float:
    """mu = mu_relative * max_i ||theta_i - mean_j theta_j||_2 (spectral norm)."""
    mean = torch.stack(list(theta)).mean(0)
    return mu_relative * max(spectral_norm(t - mean).item() for t in theta)


def objective(theta, theta0, deltas, nuclear_norms, mu: float) -> float:
    """Eq. 1 in float64."""
    fit = sum(
        0.5 * (theta0 + d - t).double().pow(2).sum().item() for t, d in zip(theta, deltas)
    )
    return fit + mu * sum(nuclear_norms)


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
    Each SVT is warm-started from the same delta's SVT in the previous iteration (see
    :func:`singular_value_threshold`). The delta_i stay factored (their ranks are small when mu
    does its job), so an iteration reads and writes the m x n matrices only to form theta0 and
    the N residuals theta_i - theta0.
    """
    dtype = compute_dtype(theta[0])
    theta = [t.to(dtype) for t in theta]
    if mu is None:
        mu = relative_mu(theta, DEFAULT_MU_RELATIVE if mu_relative is None else mu_relative)
    count = len(theta)
    factors = [LowRank.zeros(theta[0].shape, dtype=dtype, device=theta[0].device) for _ in theta]
    theta_sum = torch.zeros_like(theta[0])
    for t in theta:
        theta_sum += t
    residual = torch.empty_like(theta[0])
    thresholdings: List[Optional[Thresholded]] = [None] * count
    previous_sum: Optional[LowRank] = None
    previous_theta0: Optional[torch.Tensor] = None
    history: List[float] = []
    ranks: List[int] = [0] * count
    rank_history: List[List[int]] = []
    full_svds = sketches = 0
    svt_seconds = 0.0
    done = 0
    for done in range(1, iterations + 1):
        # Eq. 2, theta0 block: the mean of theta_i - delta_i = (sum theta_i - sum delta_i) / N
        delta_sum = LowRank.sum(factors)
        theta0 = torch.addmm(theta_sum, delta_sum.left, delta_sum.right, beta=1 / count, alpha=-1 / count)
        # theta0_{t-1} - theta0_t = (sum_i delta_i^{t-1} - sum_i delta_i^{t-2}) / N, factored: what
        # every residual theta_i - theta0 gained since the last iteration
        step = None if previous_sum is None else LowRank.sum([delta_sum, LowRank(-previous_sum.left, previous_sum.right)])
        residual_change = None if step is None else LowRank(step.left / count, step.right)
        # Eq. 2, delta_i blocks: singular value thresholding of theta_i - theta0
        nuclear_norms = []
        started = time.perf_counter()
        for index, t in enumerate(theta):
            thresholded = singular_value_threshold(
                torch.sub(t, theta0, out=residual), mu, warm_start=thresholdings[index], change=residual_change
            )
            factors[index] = thresholded.low_rank
            thresholdings[index] = thresholded
            ranks[index] = thresholded.rank
            full_svds += thresholded.full_svd
            sketches += thresholded.sketches
            nuclear_norms.append(thresholded.shrunk.sum().item())
        svt_seconds += time.perf_counter() - started
        rank_history.append(list(ranks))
        if track_objective:
            history.append(objective(theta, theta0, [f.dense() for f in factors], nuclear_norms, mu))
        # ||theta0_t - theta0_{t-1}||_F = ||step||_F / N: from the factors while their Gram
        # matrices (K x K, K the rank of the step) cost less than the m x n difference, densely
        # once they do (a noise-dominated spectrum keeps ranks near min(m, n): the factored
        # norm then took 60% of the merge)
        converged = False
        if step is not None and tol > 0:
            if step.rank * step.rank * sum(theta0.shape) < theta0.numel():
                change = step.norm() / count
            else:
                change = torch.linalg.vector_norm(torch.sub(theta0, previous_theta0, out=residual)).item()
            converged = change <= tol * theta0.norm()
        previous_sum = delta_sum
        previous_theta0 = theta0
        if tol > 0 and converged:
            break
    return LoreEstimate(
        theta0=theta0, factors=factors, mu=mu, iterations=done, ranks=ranks, objective=history,
        rank_history=rank_history, full_svds=full_svds, sketches=sketches, svt_seconds=svt_seconds,
    )


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

"""SeedLoRA: A Fusion Approach to Efficient LLM Fine-Tuning.

Two papers share the name; each section below follows one of them:
- ``seedlora_dm``: weight distribution matching (Sec. 3.4, Eqs. 4-5 of the
  distribution-matching paper);
- ``seedlora_twostage``: robust/conflict dimensions, then subspace fusion of the residual
  (Sec. 3.4, Eqs. 4-9 of the two-stage paper).

``tau`` are the seed deltas tau_i = theta_i - theta_pre, all of one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mergekit_seed.maths.linalg import (
    LowRank,
    compress,
    compute_dtype,
    low_rank_moments,
    mean_and_std,
    quantile,
    truncated_approximation,
    truncated_svd,
)


# ---------------------------------------------------------------- distribution matching


def eq4_weights(weights: Optional[Sequence[float]], normalize: bool, n: int) -> Tuple[List[float], float]:
    """Eq. 4's importance weights w_i (default 1) and its divisor: sum_i w_i with ``normalize``,
    else N. A non-finite weight, or weights that sum to zero under ``normalize``, give no
    weighted mean: ValueError."""
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(
            f"seedlora_dm: weight {next(w for w in weights if not math.isfinite(w))} is not a finite number"
        )
    divisor = math.fsum(weights) if normalize else float(n)
    if divisor == 0:
        raise ValueError(
            "seedlora_dm: the seeds' weights sum to 0, so their normalised mean (Eq. 4) is undefined; change a weight "
            "or set normalize: false"
        )
    return weights, divisor


def seedlora_dm(
    tau: Sequence[torch.Tensor],
    weights: Optional[Sequence[float]] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted mean of the deltas rescaled to the seeds' mean statistics (Eqs. 4-5).

    ``weights`` w_i default to 1; ``normalize`` divides by sum_i w_i, else by N. Statistics
    are per tensor: mu = mean, sigma = population std over all entries. When the merged
    delta has zero spread the rescale is skipped. Returns float32 (float64 for float64).
    """
    dtype = compute_dtype(tau[0])
    weights, divisor = eq4_weights(weights, normalize, len(tau))
    # one pass per seed: accumulate Eq. 4's weighted sum and each tau_i's moments
    tau_m = torch.zeros_like(tau[0], dtype=dtype)
    mu_hat = sigma_hat = 0.0
    for weight, t in zip(weights, tau):
        t = t.to(dtype)
        mu_i, sigma_i = mean_and_std(t)
        mu_hat, sigma_hat = mu_hat + mu_i / len(tau), sigma_hat + sigma_i / len(tau)
        tau_m.add_(t, alpha=weight)
    tau_m /= divisor  # Eq. 4: tau_m = (1/n) sum_i w_i tau_i
    if tau_m.numel() < 2:
        return tau_m
    mu_m, sigma_m = mean_and_std(tau_m)
    if sigma_m == 0:
        return tau_m
    # Eq. 5: tau_m <- sigma_hat * (tau_m - mu(tau_m)) / sigma(tau_m) + mu_hat
    scale = sigma_hat / sigma_m
    return tau_m.mul_(scale).add_(mu_hat - scale * mu_m)


def seedlora_dm_factored(
    tau: Sequence[LowRank],
    weights: Optional[Sequence[float]] = None,
    normalize: bool = True,
) -> LowRank:
    """Eqs. 4-5 on factored deltas tau_i = L_i R_i, exactly, without forming any m x n matrix.

    Eq. 4 stacks the weighted factors; the moments come from the factors
    (:func:`low_rank_moments`); Eq. 5 is an affine map a tau_m + b 1 1^T, so it adds one
    rank (the mean shift). The result is re-factored to its numerical rank (float32).
    """
    weights, divisor = eq4_weights(weights, normalize, len(tau))
    weighted = [LowRank(t.left.double() * (w / divisor), t.right.double()) for t, w in zip(tau, weights)]
    tau_m = LowRank.sum(weighted)  # Eq. 4
    moments = [low_rank_moments(t) for t in tau]
    mu_hat = sum(m for m, _ in moments) / len(tau)
    sigma_hat = sum(s for _, s in moments) / len(tau)
    mu_m, sigma_m = low_rank_moments(tau_m)
    m, n = tau_m.shape
    if sigma_m > 0 and m * n > 1:
        # Eq. 5: sigma_hat (tau_m - mu_m) / sigma_m + mu_hat = a tau_m + b 1 1^T
        a = sigma_hat / sigma_m
        b = mu_hat - a * mu_m
        left = tau_m.left
        ones_left = torch.full((m, 1), 1.0, dtype=left.dtype, device=left.device)
        ones_right = torch.full((1, n), 1.0, dtype=left.dtype, device=left.device)
        tau_m = LowRank.sum([LowRank(a * left, tau_m.right), LowRank(b * ones_left, ones_right)])
    merged, _ = compress(tau_m)
    return merged.to(torch.float32)


# ---------------------------------------------------------------- two-stage fusion

Fusion = Callable[[torch.Tensor], torch.Tensor]
"""Fuses stacked coordinates Z (N, r, r) into one (r, r) (mean, TIES or DARE)."""


Sparsify = Callable[[torch.Tensor], torch.Tensor]
"""Sparsifies one seed's coordinates z (r, r): TIES's magnitude trim or DARE's random drop
with rescaling (the methods layer binds mergekit's ``sparsify`` with the recipe's density)."""


def fuse_mean(Z: torch.Tensor) -> torch.Tensor:
    return Z.mean(0)


def elect_signs(trimmed: torch.Tensor, tie_rtol: float = 1e-6) -> torch.Tensor:
    """TIES sign election over stacked values (N, ...): the sign of their sum.

    In the SVD basis of M_avg the seeds' off-diagonal coordinates sum to exactly zero
    (sum_i Z_i = N U^T M_avg V = N S), so a plain ``sum >= 0`` would elect by rounding noise.
    Sums within ``tie_rtol`` of the total magnitude count as ties and go to the sign of the
    largest-magnitude value, which keeps the election independent of seed order.
    """
    total = trimmed.sum(0)
    tie = total.abs() <= tie_rtol * trimmed.abs().sum(0)
    largest = trimmed.gather(0, trimmed.abs().argmax(0, keepdim=True)).squeeze(0)
    return torch.where(tie, largest.sign(), total.sign())


def fuse_ties(Z: torch.Tensor, trim: Sparsify) -> torch.Tensor:
    """TIES fusion of the coordinates (Sec. 3.4, "ties"): trim each Z_i, elect a sign per
    coordinate, average the trimmed values that agree with it."""
    trimmed = torch.stack([trim(z) for z in Z])
    agree = trimmed.sign() == elect_signs(trimmed)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def fuse_dare(Z: torch.Tensor, drop: Sparsify) -> torch.Tensor:
    """DARE fusion of the coordinates (Sec. 3.4, "dare"): randomly drop and rescale each Z_i,
    then average."""
    return torch.stack([drop(z) for z in Z]).mean(0)


@dataclass
class StageOne:
    """Stage 1 of the two-stage paper, per entry j of the tensor.

    ``robust``/``conflict``: merged values (zero elsewhere); ``residual``: boolean mask R of the
    entries left to stage 2.
    """

    robust: torch.Tensor
    conflict: torch.Tensor
    residual: torch.Tensor


def default_min_agree(seed_count: int) -> int:
    return math.ceil(seed_count / 2)


def robust_and_conflict(tau: torch.Tensor, sigma: torch.Tensor | float, min_agree: int) -> StageOne:
    """Classify entries of stacked deltas ``tau`` (N, ...) with magnitude threshold ``sigma``.

    Entry j is large in seed i when |tau_i(j)| >= sigma and tau_i(j) != 0.
    Conflicting: large entries of both signs; the sign whose large entries have the larger
    total magnitude is elected (ties go to +) and the elected entries are averaged.
    Robust (Eq. 4): large entries of a single sign, at least ``min_agree`` of them, averaged.
    """
    large = torch.where(tau.abs() >= sigma, tau, 0)  # the large entries, zero elsewhere
    positive_mass = large.clamp_min(0).sum(0)
    negative_mass = -large.clamp_max(0).sum(0)
    positive_count = (large > 0).sum(0, dtype=torch.int16 if tau.shape[0] < 2**15 else torch.int64)
    negative_count = (large < 0).sum(0, dtype=positive_count.dtype)

    conflict = (positive_count > 0) & (negative_count > 0)
    elect_positive = positive_mass >= negative_mass
    elected_sum = torch.where(elect_positive, positive_mass, -negative_mass)
    elected_count = torch.where(elect_positive, positive_count, negative_count).clamp_min(1)
    conflict_value = torch.where(conflict, elected_sum / elected_count, 0)

    large_count = positive_count + negative_count
    robust = ~conflict & (large_count >= min_agree) & (large_count > 0)
    robust_value = torch.where(robust, (positive_mass - negative_mass) / large_count.clamp_min(1), 0)
    return StageOne(
        robust=robust_value.to(tau.dtype),
        conflict=conflict_value.to(tau.dtype),
        residual=~(conflict | robust),
    )


# Stage 1 makes about twenty elementwise passes over the stacked deltas; over blocks of rows
# of about this many entries per seed they run in cache instead of from memory
# (docs/performance.md, seedlora_twostage).
_STAGE_ONE_BLOCK = 1 << 16


def _row_blocks(shape: torch.Size, entries: int):
    """Index slices over the first dimension, each holding about ``entries`` entries."""
    if len(shape) == 0:
        yield ...
        return
    row_size = max(1, math.prod(shape[1:]))
    step = max(1, entries // row_size)
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def seedlora_twostage(
    tau: Sequence[torch.Tensor],
    threshold: Optional[float] = None,
    threshold_quantile: float = 0.5,
    min_agree: Optional[int] = None,
    rank: Optional[int] = None,
    energy: float = 0.99,
    fusion: Fusion = fuse_mean,
) -> torch.Tensor:
    """tau_final = tau_robust + tau_conflict + tau_fused (Eq. 9).

    ``threshold`` is the absolute sigma; when None, sigma is the ``threshold_quantile`` of
    |tau_i(j)| over all entries of all seeds. Stage 2 on the residual mask R:
    M_avg = mean_i(tau_i * R) (Eq. 5), M_avg ~ U S V^T truncated to ``rank`` or to the
    smallest rank keeping ``energy`` of ||M_avg||_F^2 (Eq. 6), Z_i = U^T (tau_i * R) V
    (Eq. 7), Z~ = fusion(Z), tau_fused = U Z~ V^T (Eq. 8). Tensors that are not 2-D get
    stage 1 and then the residual mean. Returns float32 (float64 for float64).
    """
    dtype = compute_dtype(tau[0])
    tau = [t.to(dtype) for t in tau]
    if min_agree is None:
        min_agree = default_min_agree(len(tau))
    if threshold is not None:
        sigma = threshold
    else:
        magnitudes = torch.empty((len(tau), *tau[0].shape), dtype=dtype, device=tau[0].device)
        for index, t in enumerate(tau):
            torch.abs(t, out=magnitudes[index])
        sigma = quantile(magnitudes, threshold_quantile)
        del magnitudes

    merged = torch.empty_like(tau[0])  # tau_robust + tau_conflict
    M_avg = torch.empty_like(tau[0])
    residual = torch.empty_like(tau[0], dtype=torch.bool)  # R
    for rows in _row_blocks(tau[0].shape, _STAGE_ONE_BLOCK):
        stacked = torch.stack([t[rows] for t in tau])
        stage_one = robust_and_conflict(stacked, sigma, min_agree)
        merged[rows] = stage_one.robust + stage_one.conflict
        residual[rows] = stage_one.residual
        M_avg[rows] = (stacked * stage_one.residual).mean(0)  # Eq. 5
    if M_avg.ndim != 2:
        return merged + M_avg

    if fusion is fuse_mean:
        # Z~ = (1/N) sum_i U^T (tau_i * R) V = U^T M_avg V = diag(S) for the singular vectors
        # of M_avg, so Eqs. 6-8 give its truncated SVD U S V^T itself; no seed needs projecting
        return merged.add_(truncated_approximation(M_avg, rank=rank, energy=energy))  # Eq. 9
    U, S, V = truncated_svd(M_avg, rank=rank, energy=energy)  # Eq. 6
    if S.numel() == 0:
        return merged
    Z = torch.stack([U.T @ (t * residual) @ V for t in tau])  # Eq. 7: (N, r, r)
    return merged.addmm_(U @ fusion(Z), V.T)  # Eqs. 8-9

"""SeedFT: Structure-Preserving Fusion for Multi-Seed LLM Fine-Tuning (Sec. 3.4, Alg. 1).

Notation follows the paper: ``tau`` are the seed deltas Delta theta_i (m, n) in PyTorch
(out, in) layout, ``Delta_c`` their column concatenation, ``V_i`` the seed coordinates,
``V_bar`` their mean and ``V_star`` its orthogonal polar factor.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mergekit_seed.maths.linalg import (
    LowRank,
    column_block_svd,
    compute_dtype,
    factored_column_block_svd,
    polar_factor,
)
from mergekit_seed.maths.profile import Profile, timed


def seedft(
    tau: Sequence[torch.Tensor],
    rank: Optional[int] = None,
    rtol: float = 1e-6,
    profile: Optional[Profile] = None,
) -> torch.Tensor:
    """Merged delta Delta theta_M (Eq. 7), without the global scale alpha.

    ``tau``: N >= 1 deltas of one shape. 2-D deltas (m, n) go through Alg. 1 with
    r = min(numerical rank of Delta_c at ``rtol``, n, ``rank``); any other shape gets
    the mean of the deltas, in Delta theta_M's units: sqrt(N) * mean, since identical 2-D
    seeds give Delta theta_M = sqrt(N) tau (Delta_c's singular values are sqrt(N) times the
    seed's), so that alpha = 1/sqrt(N) returns the mean for every tensor. Returns float32
    (float64 for float64 inputs) on the inputs' device. ``profile`` gets the (m, n, r) of every
    matrix and the seconds of the Gram of Delta_c, its eigendecomposition, the polar factor
    (Eqs. 5-6) and the product of Eq. 7.
    """
    out_dtype = compute_dtype(tau[0])
    if tau[0].ndim != 2:
        return torch.stack([t.to(out_dtype) for t in tau]).mean(0) * math.sqrt(len(tau))

    m, n = tau[0].shape
    max_rank = n if rank is None else min(n, rank)
    # Steps 1-2: Delta_c = [tau_1 | ... | tau_N] = U Sigma V^T, r = min(rank(Delta_c), n)  (Eq. 3)
    svd = column_block_svd(tau, rtol=rtol, max_rank=max_rank, profile=profile)
    if profile is not None:
        profile.shapes.append((m, n, svd.rank))
    if svd.rank == 0:
        return torch.zeros_like(tau[0], dtype=out_dtype)
    # Step 3: V_bar = (1/N) sum_i V_i  (Eq. 4)
    V_bar = svd.mean_right
    # Step 4: V_bar = P D Q^T, V_star = P Q^T  (Eqs. 5-6, orthogonal Procrustes)
    with timed(profile, "polar"):
        V_star = polar_factor(V_bar, rtol=rtol)
    # Step 5: Delta theta_M = U Sigma V_star^T  (Eq. 7)
    with timed(profile, "product"):
        delta_M = (svd.U * svd.S) @ V_star.T
    return delta_M.to(out_dtype)


def seedft_factored(tau: Sequence[LowRank], rank: Optional[int] = None, rtol: float = 1e-6) -> LowRank:
    """Alg. 1 on factored deltas tau_i = L_i R_i, exactly, without forming any m x n matrix.

    Same result as :func:`seedft` on the dense deltas (without alpha): Delta_c's SVD comes
    from QR factorisations of the stacked factors and an SVD of the small core
    (:func:`factored_column_block_svd`). Returns the merged delta as a rank-r pair (float32).
    """
    n = tau[0].shape[1]
    max_rank = n if rank is None else min(n, rank)
    # Steps 1-2: Delta_c = [tau_1 | ... | tau_N] = U Sigma V^T  (Eq. 3)
    U, S, V_blocks = factored_column_block_svd(tau, rtol=rtol, max_rank=max_rank)
    if S.numel() == 0:
        return LowRank.zeros(tau[0].shape, device=tau[0].left.device)
    # Step 3: V_bar = (1/N) sum_i V_i  (Eq. 4)
    V_bar = torch.stack(V_blocks).mean(0)
    # Step 4: V_star = P Q^T  (Eqs. 5-6)
    V_star = polar_factor(V_bar, rtol=rtol)
    # Step 5: Delta theta_M = (U Sigma) V_star^T  (Eq. 7)
    return LowRank((U * S).float(), V_star.T.float())

"""Shared linear algebra for the merge kernels.

Everything here is pure torch, device-agnostic, and avoids the expensive
decompositions the papers write down literally: the SVD of a wide concatenation is
taken from the eigendecomposition of its Gram matrix on the smaller side, and the
orthogonal polar factor from the eigendecomposition of a small r x r matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

DECOMPOSITION_DTYPE = torch.float64


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _descending_eigh(gram: torch.Tensor):
    """Eigenpairs of a symmetric PSD matrix, largest first, eigenvalues clamped at 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


def _numerical_rank(singular_values: torch.Tensor, rtol: float) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix)."""
    if singular_values.numel() == 0:
        return 0
    largest = singular_values[0]
    if largest <= 0:
        return 0
    return int((singular_values > rtol * largest).sum().item())


@dataclass
class ColumnBlockSVD:
    """Truncated SVD ``U S V^T`` of ``[X_1 | ... | X_N]`` (m x Nn), never formed.

    ``U``: (m, r), ``S``: (r,), both float64. The right singular vectors are kept
    implicitly; ``right_block(i)`` is rows ``i*n:(i+1)*n`` of ``V`` (n, r).
    """

    U: torch.Tensor
    S: torch.Tensor
    _blocks: Sequence[torch.Tensor]
    _right: Optional[List[torch.Tensor]]

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def right_block(self, index: int) -> torch.Tensor:
        if self._right is not None:
            return self._right[index]
        # V_i = X_i^T U S^-1 (from X = U S V^T with orthonormal U)
        return (self._blocks[index].T @ self.U) / self.S

    def mean_right_block(self) -> torch.Tensor:
        """``(1/N) sum_i V_i`` (n, r)."""
        if self._right is not None:
            return torch.stack(self._right).mean(0)
        block_mean = torch.stack(list(self._blocks)).mean(0)
        return (block_mean.T @ self.U) / self.S


def column_block_svd(
    blocks: Sequence[torch.Tensor], rtol: float, max_rank: Optional[int] = None
) -> ColumnBlockSVD:
    """SVD of the column concatenation of ``blocks`` (each (m, n)) via a float64 Gram matrix.

    Keeps the singular values above ``rtol`` times the largest, at most ``max_rank``.
    Cost: O(m^2 Nn + m^3) when m <= Nn (Gram ``sum_i X_i X_i^T``), otherwise
    O((Nn)^2 m + (Nn)^3) (Gram ``[X_i^T X_j]``). ``rtol`` below ~1e-7 is not
    resolvable through a Gram matrix in float64.
    """
    blocks = [b.to(DECOMPOSITION_DTYPE) for b in blocks]
    m, n = blocks[0].shape
    count = len(blocks)
    if m <= count * n:
        gram = sum(b @ b.T for b in blocks)
        eigenvalues, eigenvectors = _descending_eigh(gram)
        singular_values = eigenvalues.sqrt()
        rank = _numerical_rank(singular_values, rtol)
        if max_rank is not None:
            rank = min(rank, max_rank)
        return ColumnBlockSVD(
            U=eigenvectors[:, :rank], S=singular_values[:rank], _blocks=blocks, _right=None
        )

    gram = torch.cat(
        [torch.cat([bi.T @ bj for bj in blocks], dim=1) for bi in blocks], dim=0
    )
    eigenvalues, eigenvectors = _descending_eigh(gram)
    singular_values = eigenvalues.sqrt()
    rank = _numerical_rank(singular_values, rtol)
    if max_rank is not None:
        rank = min(rank, max_rank)
    singular_values = singular_values[:rank]
    right = list(eigenvectors[:, :rank].split(n, dim=0))
    # U S = X V = sum_i X_i V_i
    left_scaled = sum(b @ v for b, v in zip(blocks, right))
    return ColumnBlockSVD(
        U=left_scaled / singular_values, S=singular_values, _blocks=blocks, _right=right
    )


def polar_factor(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``matrix = P D Q^T`` (n, r), computed in float64.

    Uses ``matrix (matrix^T matrix)^{-1/2}`` from the eigendecomposition of the r x r
    Gram matrix. Directions whose singular value is at most ``rtol`` times the largest
    are dropped, so a rank-deficient input gives the unique partial isometry
    (the Moore-Penrose polar factor) instead of an arbitrary completion.
    """
    matrix = matrix.to(DECOMPOSITION_DTYPE)
    squared, vectors = _descending_eigh(matrix.T @ matrix)
    singular_values = squared.sqrt()
    keep = _numerical_rank(singular_values, rtol)
    vectors = vectors[:, :keep]
    inverse_sqrt = (vectors / singular_values[:keep]) @ vectors.T
    return matrix @ inverse_sqrt


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values.flatten(), q)`` (linear interpolation) for tensors of any size.

    torch.quantile refuses inputs above 2**24 elements; two ``kthvalue`` selections are
    O(numel) and have no such limit.
    """
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    lower = int(position)
    upper = min(lower + 1, flat.numel() - 1)
    low_value = flat.kthvalue(lower + 1).values
    if upper == lower:
        return low_value
    high_value = flat.kthvalue(upper + 1).values
    return low_value + (high_value - low_value) * (position - lower)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of the sum of squares."""
    squares = singular_values.to(DECOMPOSITION_DTYPE) ** 2
    total = squares.sum()
    if total <= 0:
        return 0
    cumulative = squares.cumsum(0) / total
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, singular_values.numel())


# Below this many rows/columns a full SVD is cheap; above it, a small wanted rank goes randomized.
_FULL_SVD_SIZE = 512
_RANDOMIZED_OVERSAMPLE = 16


def truncated_svd(
    matrix: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None
):
    """Leading singular triplets ``U (m, r), S (r,), V (n, r)`` of a 2-D float matrix.

    Exactly one of ``rank`` (r = min(rank, min(m, n))) and ``energy`` (smallest r keeping that
    share of ||matrix||_F^2) is used; ``rank`` wins when both are given. A full SVD is used for
    small matrices or large ranks; when the wanted rank is below a quarter of min(m, n) on a
    large matrix, ``torch.svd_lowrank`` (randomized, 4 power iterations) is used, growing the
    sketch for ``energy`` until the kept energy is reached and falling back to a full SVD.
    """
    smaller = min(matrix.shape)
    total = matrix.to(DECOMPOSITION_DTYPE).pow(2).sum()
    randomized_ok = smaller > _FULL_SVD_SIZE
    if rank is not None:
        rank = min(rank, smaller)
        if randomized_ok and rank <= smaller // 4:
            U, S, V = torch.svd_lowrank(matrix, q=min(rank + _RANDOMIZED_OVERSAMPLE, smaller), niter=4)
            return U[:, :rank], S[:rank], V[:, :rank]
    elif randomized_ok and energy is not None and total > 0:
        sketch = 32
        while sketch <= smaller // 4:
            U, S, V = torch.svd_lowrank(matrix, q=sketch + _RANDOMIZED_OVERSAMPLE, niter=4)
            captured = (S.to(DECOMPOSITION_DTYPE) ** 2).cumsum(0) / total
            if captured[-1] >= energy:
                keep = int((captured < energy - 1e-12).sum().item()) + 1
                return U[:, :keep], S[:keep], V[:, :keep]
            sketch *= 2
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        rank = rank_for_energy(S, energy if energy is not None else 1.0)
    return U[:, :rank], S[:rank], Vh[:rank].T

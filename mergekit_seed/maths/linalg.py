"""Shared linear algebra for the merge kernels.

Everything here is torch on the inputs' device (on the CPU, symmetric eigendecompositions go to
LAPACK through scipy, see :func:`_descending_eigh`), and avoids the expensive decompositions the
papers write down literally: the SVD of a wide concatenation is taken from the
eigendecomposition of its Gram matrix on the smaller side, and the orthogonal polar factor from
the eigendecomposition of a small r x r matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
from threadpoolctl import threadpool_limits

from mergekit_seed.maths.profile import Profile, timed


DECOMPOSITION_DTYPE = torch.float64


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# From this size on a CPU, eigendecompositions go to scipy's LAPACK (faster, and no copy of the
# input); below it torch's eigh is as fast, and small merges, adapter merges among them, need
# not import scipy (docs/performance.md, "Threads" and SeedFT).
_LAPACK_EIGH_SIZE = 2048


def _descending_eigh(gram: torch.Tensor, count: Optional[int] = None):
    """The ``count`` (default: all) largest eigenpairs of a symmetric PSD matrix, largest
    first, eigenvalues clamped at 0. ``gram`` may be overwritten.

    On the CPU from 2048 on a side this is LAPACK's ``syevr`` (all eigenpairs by MRRR) through scipy, reducing
    ``gram`` in place, on as many threads as torch uses (``torch.get_num_threads()``): O(size)
    workspace, where torch's ``eigh`` (``syevd``, plus a copy of its input) needs 2 size^2 more,
    and faster than it at these sizes; asking ``syevr`` for the wanted eigenpairs alone switches
    it to inverse iteration, which is slower (docs/performance.md, SeedFT). Elsewhere torch's
    ``eigh``.
    """
    size = gram.shape[0]
    count = size if count is None else min(count, size)
    if gram.device.type == "cpu" and size >= _LAPACK_EIGH_SIZE:
        eigenvalues, eigenvectors = _lapack_eigh(gram)
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvalues[size - count :].flip(0).clamp_min(0), eigenvectors[:, size - count :].flip(1)


def _lapack_eigh(gram: torch.Tensor):
    """Ascending eigenpairs of a symmetric CPU matrix (see :func:`_descending_eigh`)."""
    import scipy.linalg

    if not torch.isfinite(gram).all():
        raise torch.linalg.LinAlgError("the Gram matrix is not finite: the input holds NaN or Inf")
    # symmetric, so the transposed view is the same matrix in the Fortran order LAPACK works in
    array = gram.detach().contiguous().numpy().T
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        eigenvalues, eigenvectors = scipy.linalg.eigh(array, driver="evr", overwrite_a=True, check_finite=False)
    return torch.from_numpy(eigenvalues), torch.from_numpy(eigenvectors)


def _numerical_rank(singular_values: torch.Tensor, rtol: float) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix).

    A NaN or Inf among them (from one in the input) raises ``LinAlgError``: every comparison
    with NaN is false, so it would otherwise count as rank 0 and drop the input silently.
    """
    if singular_values.numel() == 0:
        return 0
    if not torch.isfinite(singular_values).all():
        raise torch.linalg.LinAlgError("singular values are not finite: the input holds NaN or Inf")
    largest = singular_values[0]
    if largest <= 0:
        return 0
    return int((singular_values > rtol * largest).sum().item())


def _gram_singular_pairs(gram: torch.Tensor, wanted: int, rtol: float):
    """The singular values above ``rtol`` times the largest (at most ``wanted``) of a matrix
    whose Gram matrix is ``gram``, and the matching eigenvectors of ``gram`` (one per column)."""
    eigenvalues, eigenvectors = _descending_eigh(gram, wanted)
    singular_values = eigenvalues.sqrt()
    rank = min(_numerical_rank(singular_values, rtol), wanted)
    return singular_values[:rank], eigenvectors[:, :rank]


@dataclass
class ColumnBlockSVD:
    """Truncated SVD ``U S V^T`` of ``[X_1 | ... | X_N]`` (m x Nn), never formed.

    ``U``: (m, r), ``S``: (r,), both float64. Of the right singular vectors only the mean of
    their blocks is kept: ``mean_right`` = (1/N) sum_i V_i (n, r), V_i = rows ``i*n:(i+1)*n``
    of ``V``.
    """

    U: torch.Tensor
    S: torch.Tensor
    mean_right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.numel())


def column_block_svd(
    blocks: Sequence[torch.Tensor],
    rtol: float,
    max_rank: Optional[int] = None,
    profile: Optional[Profile] = None,
) -> ColumnBlockSVD:
    """SVD of the column concatenation of ``blocks`` (each (m, n)) via a float64 Gram matrix.

    Keeps the singular values above ``rtol`` times the largest, at most ``max_rank``.
    Cost: O(m^2 Nn + m^3) when m <= Nn (Gram ``sum_i X_i X_i^T``, each block converted to
    float64 in turn), otherwise O((Nn)^2 m + (Nn)^3) (Gram ``[X_i^T X_j]``). ``rtol`` below
    ~1e-7 is not resolvable through a Gram matrix in float64. ``profile`` gets the seconds of
    the Gram matrix ("gram") and of its eigendecomposition ("eigh").
    """
    m, n = blocks[0].shape
    count = len(blocks)
    wanted = min(m, count * n) if max_rank is None else max_rank
    if m <= count * n:
        with timed(profile, "gram"):
            gram = torch.zeros(m, m, dtype=DECOMPOSITION_DTYPE, device=blocks[0].device)
            for block in blocks:
                block = block.to(DECOMPOSITION_DTYPE)
                gram.addmm_(block, block.T)
            del block
        with timed(profile, "eigh"):
            S, U = _gram_singular_pairs(gram, wanted, rtol)
        del gram
        # V_i = X_i^T U S^-1 (from X = U S V^T with orthonormal U), averaged over i; the blocks'
        # sum is taken only now, so that it is not held through the eigendecomposition
        block_sum = blocks[0].to(DECOMPOSITION_DTYPE, copy=True)
        for block in blocks[1:]:
            block_sum += block
        return ColumnBlockSVD(U=U, S=S, mean_right=(block_sum.T @ U) / (count * S))

    blocks = [b.to(DECOMPOSITION_DTYPE) for b in blocks]
    with timed(profile, "gram"):
        gram = torch.cat([torch.cat([bi.T @ bj for bj in blocks], dim=1) for bi in blocks], dim=0)
    with timed(profile, "eigh"):
        singular_values, eigenvectors = _gram_singular_pairs(gram, wanted, rtol)
    del gram
    right = list(eigenvectors.split(n, dim=0))
    # U S = X V = sum_i X_i V_i
    left_scaled = sum(b @ v for b, v in zip(blocks, right))
    return ColumnBlockSVD(U=left_scaled / singular_values, S=singular_values, mean_right=torch.stack(right).mean(0))


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


# Above this many entries, quantile() selects from a bracket found by sampling.
_SELECT_DIRECTLY = 1 << 20
_SELECT_SAMPLE = 1 << 16


def _kth_smallest(flat: torch.Tensor, positions: Sequence[int]) -> List[torch.Tensor]:
    """The ``positions``-th smallest entries (0-based) of a 1-D tensor, exactly.

    ``kthvalue`` on hundreds of millions of entries is a single-threaded quickselect that slows
    down on the many repeated values of bf16-derived deltas (docs/performance.md,
    seedlora_twostage). Instead (Floyd and Rivest's selection): a seeded sample of 65536
    entries brackets the wanted order statistics, two vectorised passes count the entries below
    the bracket and gather those inside it, and ``kthvalue`` runs on that small remainder. If
    the bracket misses (rare: it spans 8 standard deviations of the sample's rank error) the
    whole tensor is searched, so the result is exact either way.
    """
    count = flat.numel()
    if count <= _SELECT_DIRECTLY:
        return [flat.kthvalue(p + 1).values for p in positions]
    generator = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(count, (_SELECT_SAMPLE,), generator=generator, device=flat.device)].sort().values
    margin = 4 * math.isqrt(_SELECT_SAMPLE)
    low_rank = min(positions) * _SELECT_SAMPLE // count - margin
    high_rank = max(positions) * _SELECT_SAMPLE // count + margin
    # a bracket reaching past the sample's ends is open on that side
    keep = torch.ones_like(flat, dtype=torch.bool)
    below = 0
    if low_rank > 0:
        keep &= flat >= sample[low_rank]
        below = count - int(keep.sum().item())
    if high_rank < _SELECT_SAMPLE - 1:
        keep &= flat <= sample[high_rank]
    inside = flat[keep]
    if all(below <= p < below + inside.numel() for p in positions):
        return [inside.kthvalue(p - below + 1).values for p in positions]
    return [flat.kthvalue(p + 1).values for p in positions]


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values.flatten(), q)`` (linear interpolation) for tensors of any size.

    torch.quantile refuses inputs above 2**24 elements; this selects the two order statistics
    around ``q`` (:func:`_kth_smallest`, O(numel)) and has no such limit.
    """
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    lower = int(position)
    upper = min(lower + 1, flat.numel() - 1)
    low_value, high_value = _kth_smallest(flat, [lower, upper])
    if upper == lower:
        return low_value
    return low_value + (high_value - low_value) * (position - lower)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of the sum of squares."""
    squares = singular_values.to(DECOMPOSITION_DTYPE) ** 2
    total = squares.sum()
    if total <= 0:
        return 0
    cumulative = squares.cumsum(0) / total
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, singular_values.numel())


# Up to this many rows/columns a full SVD is cheap; above it, a small wanted rank goes randomized.
_FULL_SVD_SIZE = 512
# Singular value thresholding keeps few directions and is repeated with warm starts, so the
# randomized path pays off earlier (measured on 2 CPU cores: 4-7x faster for LoRE on 512 x 512
# and 1408 x 512 deltas keeping about a dozen directions).
_SVT_FULL_SVD_SIZE = 128
_RANDOMIZED_OVERSAMPLE = 16


def _sketch_size(rank: int) -> int:
    """Columns sketched to get ``rank`` accurate triplets: at least 16 extra, at most 2x."""
    return rank + max(_RANDOMIZED_OVERSAMPLE, rank)


def _needed_rank(S: torch.Tensor, sketch: int, total: torch.Tensor, energy: float) -> int:
    """A lower bound on the rank keeping ``energy`` of ``total`` (= ||X||_F^2), from the leading
    ``sketch`` singular values ``S``: every further direction holds at most S[sketch-1]^2."""
    S = S[:sketch].to(DECOMPOSITION_DTYPE)
    captured = (S**2).sum()
    deficit = energy * total - captured
    if deficit <= 0:
        return sketch
    smallest = S[-1] ** 2
    if smallest <= 0:
        return sketch  # the matrix has rank below the sketch: it already holds everything
    return sketch + int(math.ceil((deficit / smallest).item()))


def truncated_svd(matrix: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None):
    """Leading singular triplets ``U (m, r), S (r,), V (n, r)`` of a 2-D float matrix.

    ``rank`` gives r = min(rank, min(m, n)); otherwise r is the smallest rank keeping
    ``energy`` (default 1.0) of ||matrix||_F^2. A full SVD is used for small matrices or large
    ranks; when the wanted rank is below a quarter of min(m, n) on a matrix above 512 on both
    sides, a seeded randomized subspace iteration run to convergence
    (:func:`top_singular_triplets`) is used, growing the sketch for ``energy`` until the
    energy is reached.
    """
    U, S, V, keep = _singular_triplets(matrix, rank, energy)
    return U[:, :keep], S[:keep], V[:, :keep]


def truncated_approximation(
    matrix: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None
) -> torch.Tensor:
    """``U S V^T`` of :func:`truncated_svd` (m, n). When a full SVD ran and more than half of
    the directions are kept, it is formed as ``matrix`` minus the dropped directions, which
    costs their number instead of the kept one (the same to rounding: matrix = U S V^T)."""
    U, S, V, keep = _singular_triplets(matrix, rank, energy)
    if S.numel() == min(matrix.shape) and keep > S.numel() // 2:
        return torch.addmm(matrix, U[:, keep:] * S[keep:], V[:, keep:].T, alpha=-1)
    return (U[:, :keep] * S[:keep]) @ V[:, :keep].T


def _singular_triplets(matrix: torch.Tensor, rank: Optional[int], energy: Optional[float]):
    """``(U, S, V, keep)`` for :func:`truncated_svd`: all triplets after a full SVD, the
    sketched ones after a randomized one, and how many of them to keep."""
    smaller = min(matrix.shape)
    randomized_ok = smaller > _FULL_SVD_SIZE
    if rank is not None:
        rank = min(rank, smaller)
        if randomized_ok and _sketch_size(rank) <= smaller // 4:
            U, S, V, _ = top_singular_triplets(matrix, _sketch_size(rank), wanted=rank)
            return U, S, V, rank
    elif randomized_ok and energy is not None:
        total = squared_norm(matrix)
        # A short look first (two power iterations): if even its estimates say that more
        # directions are needed than the randomized path can hold, go straight to the full SVD
        # instead of growing sketches that must all fail (a flat spectrum, as for a masked
        # residual of full-rank deltas). Estimates err low, so this only ever picks the full
        # SVD, which is exact, more often than strictly necessary.
        sketch = 32
        S = top_singular_triplets(matrix, _sketch_size(sketch), wanted=sketch, max_power_iterations=2).S
        needed = _needed_rank(S, sketch, total, energy)
        while total > 0 and _sketch_size(needed) <= smaller // 4:
            sketch = max(sketch, needed)
            U, S, V, _ = top_singular_triplets(matrix, _sketch_size(sketch), wanted=sketch)
            captured = (S[:sketch].to(DECOMPOSITION_DTYPE) ** 2).cumsum(0) / total
            if captured[-1] >= energy:
                return U, S, V, int((captured < energy - 1e-12).sum().item()) + 1
            sketch *= 2
            needed = _needed_rank(S, sketch, total, energy)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if rank is None:
        rank = rank_for_energy(S, energy if energy is not None else 1.0)
    return U, S, Vh.T, rank


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix).Q


def _wide_svd(matrix: torch.Tensor):
    """``U (q, q), S (q,), V (n, q)`` of a wide (q, n) matrix, q <= n, through the QR
    factorisation of its transpose and the SVD of the q x q factor: as accurate as LAPACK's
    SVD of the whole, and faster (docs/performance.md)."""
    Q, R = torch.linalg.qr(matrix.T)
    U, S, Wh = torch.linalg.svd(R.T)
    return U, S, Q @ Wh.T


class SingularTriplets(NamedTuple):
    """``U (m, q), S (q,), V (n, q)``, and ``product`` = matrix @ V (m, q) when the last
    convergence check formed it (None when the iteration stopped before checking)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    product: Optional[torch.Tensor]


def top_singular_triplets(
    matrix,
    sketch: int,
    wanted: Optional[int] = None,
    start: Optional[torch.Tensor] = None,
    start_product: Optional[torch.Tensor] = None,
    seed: int = 0,
    rtol: Optional[float] = None,
    max_power_iterations: int = 32,
    above: Optional[float] = None,
) -> SingularTriplets:
    """Randomized subspace iteration for the leading singular triplets of ``matrix`` (m, n; a
    tensor or a :class:`Shifted`), run to convergence.

    Sketches ``sketch`` columns (``start`` (n, k), for example the previous iterate's right
    singular vectors, warm-starts the subspace and is padded with seeded Gaussian columns;
    ``start_product`` (m, k), when given, is ``matrix @ start`` known without a pass over the
    matrix, for example updated from a nearby matrix's product by a low-rank change),
    then checks every power iteration by Rayleigh-Ritz until the leading ``wanted``
    (default: half the sketch; with ``above``, only those whose singular value exceeds it)
    Ritz triplets satisfy ||X v_j - s_j u_j|| <= rtol * s_1, or ``max_power_iterations`` is
    reached. ``rtol`` defaults to 1e-5, and to 1e-10 for float64 matrices: the thresholded or
    truncated matrix built from the triplets is then off by about rtol / 10 of its norm, and
    float64 inputs are asked for float64 accuracy. With ``above``, it also returns as soon as
    more than ``wanted`` Ritz values exceed it: Ritz values never exceed the singular values
    they estimate, so more than ``wanted`` singular values do, and the caller needs a wider
    sketch, not a converged one.
    Returns :class:`SingularTriplets` with q = min(sketch, min(m, n)); deterministic for a
    given ``seed``.
    """
    m, n = matrix.shape
    if rtol is None:
        rtol = 1e-10 if matrix.dtype == torch.float64 else 1e-5
    sketch = min(sketch, m, n)
    wanted = min(wanted if wanted is not None else max(1, sketch // 2), sketch)
    product = _sketch_product(matrix, sketch, start, start_product, seed)
    iterations = 0
    while True:
        basis = _orthonormal_columns(product)
        small_U, S, V = _wide_svd(basis.T @ matrix)  # Rayleigh-Ritz
        U = basis @ small_U
        if iterations >= max_power_iterations or S[0] == 0:
            return SingularTriplets(U, S, V, None)
        checked = wanted
        if above is not None:
            checked = int((S > above).sum().item())
            if checked > wanted:
                return SingularTriplets(U, S, V, None)
            checked = max(1, checked)
        # X^T u_j = s_j v_j holds by construction; X v_j - s_j u_j measures convergence. V spans
        # X^T basis (the Rayleigh-Ritz product was the power iteration's X^T pass), so X V is
        # its X pass: one power iteration and its check take two passes over X in all
        product = matrix @ V
        if (product[:, :checked] - U[:, :checked] * S[:checked]).norm(dim=0).max() <= rtol * S[0]:
            return SingularTriplets(U, S, V, product)
        iterations += 1


def _sketch_product(matrix, sketch: int, start, start_product, seed: int) -> torch.Tensor:
    """``matrix @ Omega`` (m, sketch) for the starting sketch Omega: ``start``'s columns (their
    product given as ``start_product`` or formed here), padded with seeded Gaussian columns."""
    n = matrix.shape[1]
    products = []
    if start is not None and start.numel():
        start = start[:, :sketch].to(matrix.dtype)
        if start_product is None:
            products.append(matrix @ start)
        else:
            products.append(start_product[:, : start.shape[1]].to(matrix.dtype))
        missing = sketch - start.shape[1]
    else:
        missing = sketch
    if missing > 0:
        generator = torch.Generator(device=matrix.device).manual_seed(seed)
        products.append(
            matrix @ torch.randn(n, missing, generator=generator, device=matrix.device, dtype=matrix.dtype)
        )
    return torch.cat(products, dim=1) if len(products) > 1 else products[0]


# The spectral norm's sketch: on a CPU a pass with up to about 32 columns costs what one with
# 17 does (the pass is memory-bound), and the wider sketch converges in fewer passes.
_SPECTRAL_NORM_SKETCH = 32


def spectral_norm(matrix: torch.Tensor) -> torch.Tensor:
    """Largest singular value (exact for small matrices, randomized with oversampling otherwise)."""
    if min(matrix.shape) <= _SVT_FULL_SVD_SIZE:
        return torch.linalg.matrix_norm(matrix, ord=2)
    return top_singular_triplets(matrix, _SPECTRAL_NORM_SKETCH, wanted=1).S[0]


@dataclass
class Thresholded:
    """``SVT_mu(X) = U max(S - mu, 0) V^T``, kept as its factors.

    ``U`` (m, k) and ``V`` (n, k) the kept singular vectors, ``shrunk`` (k,) the kept, shrunk
    singular values (their sum is the nuclear norm of the result). ``subspace`` (n, q >= k):
    the right singular vectors of everything computed (the whole converged sketch, or all of a
    full SVD), the kept ones first: the next thresholding of a nearby matrix starts from it
    (``warm_start``). ``subspace_product`` (m, q): X @ subspace, when a sketch formed it (None
    after a full SVD).
    """

    U: torch.Tensor
    shrunk: torch.Tensor
    subspace: torch.Tensor
    subspace_product: Optional[torch.Tensor] = None
    full_svd: bool = False  # how it was computed: a full SVD, or randomized sketches (``sketches`` of them)
    sketches: int = 0

    @property
    def rank(self) -> int:
        return int(self.shrunk.numel())

    @property
    def V(self) -> torch.Tensor:
        return self.subspace[:, : self.rank]

    @property
    def low_rank(self) -> "LowRank":
        return LowRank(self.U * self.shrunk, self.V.T)

    @property
    def matrix(self) -> torch.Tensor:
        """The (m, n) matrix SVT_mu(X)."""
        return self.low_rank.dense()


def squared_norm(matrix: torch.Tensor) -> torch.Tensor:
    """||matrix||_F^2 as a float64 scalar, without a float64 copy of the matrix."""
    return torch.linalg.vector_norm(matrix).to(DECOMPOSITION_DTYPE) ** 2


def _count_above_lower_bound(matrix, mu: float) -> int:
    """A lower bound on how many singular values of ``matrix`` exceed ``mu`` (min side > 128).

    Two bounds, the larger wins. The Ritz values of a short randomized sketch never exceed
    the singular values they estimate, so each one above ``mu`` counts. And the singular
    values at most ``mu`` hold at most min(m, n) mu^2 of ||X||_F^2 while each of the others
    holds at most S_1^2, so at least (||X||_F^2 - min(m, n) mu^2) / S_1^2 exceed ``mu``. The
    sketch takes two power iterations: every Ritz value is a lower bound whether converged or
    not, and S_1 estimated from below can only raise the second bound (towards the exact
    full SVD), so converging would buy nothing but time.
    """
    S = top_singular_triplets(matrix, 1 + _RANDOMIZED_OVERSAMPLE, wanted=1, max_power_iterations=2).S
    largest = S[0].to(DECOMPOSITION_DTYPE)
    if largest <= 0:
        return 0
    ritz_count = int((S > mu).sum().item())
    energy_count = math.ceil(((squared_norm(dense(matrix)) - min(matrix.shape) * mu**2) / largest**2).item())
    return max(ritz_count, energy_count, 0)


def singular_value_threshold(
    matrix, mu: float, warm_start: Optional[Thresholded] = None, change: Optional[LowRank] = None
) -> Thresholded:
    """SVT_mu(matrix) for a tensor or a :class:`Shifted` (m, n), computing only the singular
    values above ``mu`` where possible.

    Small matrices (min side <= 128) take a full SVD. Otherwise a rank guess (``warm_start``'s
    rank, at least 8, and without a warm start at least a lower bound from the Frobenius and
    spectral norms) is sketched with oversampling by a randomized subspace iteration run to
    convergence, starting from ``warm_start.subspace`` (the previous thresholding of a nearby
    matrix: its oversampled directions too, which converge with the kept ones), until no more
    than ``guess`` computed singular values exceed ``mu`` (randomized estimates err low, so
    the oversampled tail must lie below ``mu`` too). A sketch in which more than ``guess``
    Ritz values exceed ``mu`` stops there, unconverged; the next guess is that count (twice
    the guess when all of the sketch was above ``mu``) and the next sketch starts from its
    directions. A sketch beyond a quarter of the smaller side falls back to a full SVD.

    ``change``: ``matrix`` minus the matrix ``warm_start`` thresholded, when the caller knows
    it in low-rank form (k, as LoRE's residuals change by the change of their mean). The first
    sketch's product with ``matrix`` is then ``warm_start.subspace_product`` plus ``change``
    applied to the subspace, O((m + n) k q) instead of a pass over the matrix; the iteration
    is the same, and its convergence is checked on ``matrix`` itself.
    """
    smaller = min(matrix.shape)
    sketches = 0
    if warm_start is not None and not warm_start.rank:
        warm_start = None  # it kept nothing: neither a rank nor directions to start from
    if smaller > _SVT_FULL_SVD_SIZE:
        guess = max(8, warm_start.rank if warm_start is not None else 0)
        if warm_start is None:
            # no previous rank to start from: at least this many singular values exceed mu
            # (a noise-dominated matrix needs far more than a sketch holds: full SVD at once)
            guess = max(guess, _count_above_lower_bound(matrix, mu))
        start = warm_start.subspace if warm_start is not None else None
        start_product = None
        if start is not None and warm_start.subspace_product is not None and change is not None:
            if change.rank * sum(matrix.shape) < matrix.shape[0] * matrix.shape[1]:
                start_product = torch.addmm(warm_start.subspace_product, change.left, change.right @ start)
        while _sketch_size(guess) <= smaller // 4:
            sketch = _sketch_size(guess)
            U, S, V, product = top_singular_triplets(
                matrix, sketch, wanted=guess, start=start, start_product=start_product, above=mu
            )
            sketches += 1
            above = int((S > mu).sum().item())
            if above <= guess:
                return _shrink(U, S, V, mu, sketches=sketches, product=product)
            # More than guessed exceed mu. Ritz values err low, so at least ``above`` do: the
            # next sketch wants that many (twice the guess when the whole sketch was above mu)
            # and starts from this one's directions.
            guess = above if above < sketch else 2 * guess
            start, start_product = V, None
    U, S, Vh = torch.linalg.svd(dense(matrix), full_matrices=False)
    return _shrink(U, S, Vh.T, mu, full_svd=True, sketches=sketches)


def _shrink(U, S, V, mu: float, full_svd: bool = False, sketches: int = 0, product=None) -> Thresholded:
    keep = int((S > mu).sum().item())
    return Thresholded(
        U=U[:, :keep],
        shrunk=S[:keep] - mu,
        subspace=V,
        subspace_product=product,
        full_svd=full_svd,
        sketches=sketches,
    )


# ---------------------------------------------------------------- factored (low-rank) deltas


@dataclass
class LowRank:
    """A delta kept as factors: ``left @ right`` with left (m, k) and right (k, n).

    A LoRA module is ``LowRank(scaling * lora_B, lora_A)``; k may be 0 (a zero delta).
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self):
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def norm(self) -> float:
        """||left @ right||_F, in float64 from the k x k Gram matrices of the factors."""
        left, right = self.left.to(DECOMPOSITION_DTYPE), self.right.to(DECOMPOSITION_DTYPE)
        return math.sqrt(max(((left.T @ left) * (right @ right.T)).sum().item(), 0.0))

    @classmethod
    def sum(cls, parts: Sequence["LowRank"]) -> "LowRank":
        """sum_i L_i R_i as one pair ``([L_1 .. L_N], [R_1; ..; R_N])`` (ranks add up)."""
        return cls(torch.cat([p.left for p in parts], dim=1), torch.cat([p.right for p in parts], dim=0))

    def to(self, *args, **kwargs) -> "LowRank":
        """``Tensor.to`` on both factors (dtype and/or device)."""
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    @classmethod
    def zeros(cls, shape, dtype=torch.float32, device=None) -> "LowRank":
        m, n = shape
        return cls(torch.zeros(m, 0, dtype=dtype, device=device), torch.zeros(0, n, dtype=dtype, device=device))


@dataclass
class Shifted:
    """``base + shift.left @ shift.right`` (m, n) with a low-rank ``shift``, never formed.

    ``Shifted @ W`` (W (n, q)) and ``Q @ Shifted`` (Q (q, m)) cost a pass over ``base`` plus
    O((m + n) k q), where forming the sum would cost a rank-k GEMM and a write of m x n entries
    each time it changes. :func:`top_singular_triplets` and :func:`singular_value_threshold`
    take it wherever they take a matrix.
    """

    base: torch.Tensor
    shift: LowRank

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.base @ other, self.shift.left, self.shift.right @ other)

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor:
        return torch.addmm(other @ self.base, other @ self.shift.left, self.shift.right)

    def dense(self) -> torch.Tensor:
        return torch.addmm(self.base, self.shift.left, self.shift.right)


def dense(matrix) -> torch.Tensor:
    """``matrix`` as a tensor (a :class:`Shifted` is formed)."""
    return matrix.dense() if isinstance(matrix, Shifted) else matrix


# mean_and_std streams blocks of this many entries: each is summed twice while in cache.
_MOMENT_BLOCK = 1 << 16


def mean_and_std(tensor: torch.Tensor):
    """Mean and population standard deviation of all entries, as Python floats.

    Each block of 65536 entries gives its mean and sum of squared deviations (two passes while
    the block is in cache, accurate in float32); the blocks combine in float64 (Python floats) as
    M2 = sum_b M2_b + sum_b n_b (mean_b - mean)^2 (Chan, Golub and LeVeque), so a large mean
    does not cancel the spread. About 5x faster than ``torch.std_mean`` on 11008 x 4096
    float32 (2 CPU cores).
    """
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return 0.0, 0.0
    sizes, block_means, block_squares = [], [], []
    for block in flat.split(_MOMENT_BLOCK):
        block_mean = block.mean().item()  # a Python float: subtracting a 0-d tensor is slower
        sizes.append(block.numel())
        block_means.append(block_mean)
        block_squares.append((block - block_mean).square_().sum().item())
    mean = math.fsum(size * block_mean for size, block_mean in zip(sizes, block_means)) / flat.numel()
    squared_deviations = math.fsum(block_squares) + math.fsum(
        size * (block_mean - mean) ** 2 for size, block_mean in zip(sizes, block_means)
    )
    return mean, math.sqrt(squared_deviations / flat.numel())


def low_rank_moments(delta: LowRank):
    """Mean and population standard deviation of the entries of ``left @ right``, unmaterialised.

    sum = (1^T left)(right 1), sum of squares = <left^T left, right right^T>.
    """
    left, right = delta.left.to(DECOMPOSITION_DTYPE), delta.right.to(DECOMPOSITION_DTYPE)
    count = delta.shape[0] * delta.shape[1]
    total = left.sum(0) @ right.sum(1)
    squares = delta.norm() ** 2
    mean = total / count
    variance = (squares / count - mean**2).clamp_min(0)
    return mean, variance.sqrt()


def _truncate(U, S, V, rtol: float, max_rank: Optional[int], energy: Optional[float] = None):
    """Keep the singular triplets above ``rtol`` times the largest, at most ``max_rank`` and,
    with ``energy``, at most the smallest rank keeping that share of sum(S^2); also return
    the kept share of the energy."""
    rank = _numerical_rank(S, rtol)
    if max_rank is not None:
        rank = min(rank, max_rank)
    if energy is not None:
        rank = min(rank, rank_for_energy(S, energy))
    total = (S.to(DECOMPOSITION_DTYPE) ** 2).sum()
    kept = ((S[:rank].to(DECOMPOSITION_DTYPE) ** 2).sum() / total).item() if total > 0 else 1.0
    return U[:, :rank], S[:rank], V[:, :rank], kept


def _balanced_pair(U, S, V, dtype: torch.dtype) -> LowRank:
    root = S.sqrt()
    return LowRank((U * root).to(dtype), (root[:, None] * V.T).to(dtype))


def factored_svd(delta: LowRank, rtol: float = 1e-6, max_rank: Optional[int] = None, energy: Optional[float] = None):
    """SVD ``U S V^T`` of ``left @ right`` through QR of both factors and an SVD of the k x k core.

    Keeps singular values above ``rtol`` times the largest, at most ``max_rank`` (and at most
    the rank keeping ``energy`` of ||delta||_F^2, when given). Returns
    float64 ``U (m, r), S (r,), V (n, r)`` and the kept share of ||delta||_F^2. Cost
    O((m + n) k^2 + k^3); no m x n matrix is formed.
    """
    left, right = delta.left.to(DECOMPOSITION_DTYPE), delta.right.to(DECOMPOSITION_DTYPE)
    Q_left, T_left = torch.linalg.qr(left)
    Q_right, T_right = torch.linalg.qr(right.T)
    core_U, S, core_Vh = torch.linalg.svd(T_left @ T_right.T)
    return _truncate(Q_left @ core_U, S, Q_right @ core_Vh.T, rtol, max_rank, energy)


def compress(delta: LowRank, rtol: float = 1e-6, max_rank: Optional[int] = None, energy: Optional[float] = None):
    """Re-factor ``delta`` to its numerical rank (or ``max_rank``, or the rank keeping
    ``energy``), balanced as ``(U sqrt(S), sqrt(S) V^T)``; returns the new pair and the kept
    energy share."""
    U, S, V, kept = factored_svd(delta, rtol, max_rank, energy)
    return _balanced_pair(U, S, V, delta.left.dtype), kept


def factored_column_block_svd(blocks: Sequence[LowRank], rtol: float, max_rank: Optional[int] = None):
    """SVD of ``[X_1 | ... | X_N]`` for factored blocks X_i = L_i R_i, never formed.

    [X_1 | ... | X_N] = [L_1 .. L_N] blockdiag(R_1 .. R_N). With QR factorisations
    [L_1 .. L_N] = Q T and R_i^T = Q_i T_i, it equals Q core blockdiag(Q_i)^T where
    core = [T_{:,1} T_1^T | ... | T_{:,N} T_N^T] is K x K (K = sum of ranks). Returns float64
    ``U (m, r), S (r,)`` and the right blocks ``V_i (n, r)``.
    """
    lefts = [b.left.to(DECOMPOSITION_DTYPE) for b in blocks]
    rights = [b.right.to(DECOMPOSITION_DTYPE) for b in blocks]
    Q, T = torch.linalg.qr(torch.cat(lefts, dim=1))
    right_bases, core_blocks, start = [], [], 0
    for right in rights:
        Q_i, T_i = torch.linalg.qr(right.T)
        k = right.shape[0]
        core_blocks.append(T[:, start : start + k] @ T_i.T)
        right_bases.append(Q_i)
        start += k
    core_U, S, core_Vh = torch.linalg.svd(torch.cat(core_blocks, dim=1), full_matrices=False)
    rank = _numerical_rank(S, rtol)
    if max_rank is not None:
        rank = min(rank, max_rank)
    core_V = core_Vh[:rank].T
    V_blocks, start = [], 0
    for Q_i in right_bases:
        k = Q_i.shape[1]
        V_blocks.append(Q_i @ core_V[start : start + k])
        start += k
    return Q @ core_U[:, :rank], S[:rank], V_blocks


def factor_dense(
    matrix: torch.Tensor, rtol: float = 1e-6, max_rank: Optional[int] = None, energy: Optional[float] = None
):
    """Factor a dense (m, n) delta as a balanced pair ``(U sqrt(S), sqrt(S) V^T)`` of its
    numerical rank (or ``max_rank``, or the rank keeping ``energy``); returns the pair and
    the kept energy share."""
    U, S, Vh = torch.linalg.svd(matrix.to(DECOMPOSITION_DTYPE), full_matrices=False)
    U, S, V, kept = _truncate(U, S, Vh.T, rtol, max_rank, energy)
    return _balanced_pair(U, S, V, matrix.dtype), kept

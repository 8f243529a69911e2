"""SeedFT kernel against a float64 reference written straight from Alg. 1 (full SVDs)."""

import itertools

import pytest
import torch

from mergekit_seed.maths import linalg
from mergekit_seed.maths.kernels.seedft import seedft
from mergekit_seed.maths.linalg import polar_factor


def seedft_reference(tau, rank=None, rtol=1e-6):
    """Alg. 1 literally: full SVD of Delta_c, block average, SVD-based polar step."""
    tau = [t.double() for t in tau]
    n = tau[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(tau, dim=1), full_matrices=False)  # step 2
    r_star = int((S > rtol * S[0]).sum())
    r = min(r_star, n, rank or n)
    V = Vh[:r].T
    V_bar = sum(V[i * n : (i + 1) * n] for i in range(len(tau))) / len(tau)  # step 3
    P, _, Qh = torch.linalg.svd(V_bar, full_matrices=False)  # step 4
    return U[:, :r] @ torch.diag(S[:r]) @ (P @ Qh).T  # step 5


def related_deltas(m, n, N, generator, rank=None):
    shared = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if rank is not None:
        left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        return [left @ torch.randn(rank, n, generator=generator, dtype=torch.float64) for _ in range(N)]
    return [0.6 * shared + 0.4 * torch.randn(m, n, generator=generator, dtype=torch.float64) for _ in range(N)]


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "shape,low_rank",
    [((12, 40), None), ((50, 9), None), ((24, 24), None), ((30, 20), 3), ((40, 16), 2)],
    ids=["wide", "tall-truncated", "square", "rank-deficient", "tall-low-rank"],
)
def test_matches_float64_reference(N, shape, low_rank):
    generator = torch.Generator().manual_seed(N * 100 + shape[0])
    tau = [t.float() for t in related_deltas(*shape, N, generator, low_rank)]
    assert relative_error(seedft(tau), seedft_reference(tau)) < 1e-4


def test_rank_parameter_truncates_like_reference():
    generator = torch.Generator().manual_seed(7)
    tau = [t.float() for t in related_deltas(20, 30, 3, generator)]
    for rank in (1, 4, 11):
        assert relative_error(seedft(tau, rank=rank), seedft_reference(tau, rank=rank)) < 1e-4


def test_tall_matrix_keeps_at_most_n_directions():
    generator = torch.Generator().manual_seed(3)
    tau = [torch.randn(60, 5, generator=generator) for _ in range(3)]
    merged = seedft(tau)
    assert torch.linalg.matrix_rank(merged.double()) == 5


@pytest.mark.parametrize("N", [2, 3, 5])
def test_identical_seeds_return_the_seed_with_auto_lambda(N):
    tau = torch.randn(16, 24, generator=torch.Generator().manual_seed(N))
    merged = seedft([tau] * N) / N**0.5  # lambda auto = 1/sqrt(N)
    torch.testing.assert_close(merged, tau, atol=1e-5, rtol=1e-5)


def test_seed_order_does_not_matter():
    generator = torch.Generator().manual_seed(11)
    tau = [t.float() for t in related_deltas(18, 22, 4, generator)]
    expected = seedft(tau)
    for order in itertools.permutations(range(4)):
        torch.testing.assert_close(seedft([tau[i] for i in order]), expected, atol=1e-5, rtol=1e-4)


def test_zero_deltas_give_zero():
    assert torch.count_nonzero(seedft([torch.zeros(8, 6)] * 3)) == 0


def test_non_matrix_tensors_get_the_mean_with_auto_lambda():
    tau = [torch.randn(10), torch.randn(10), torch.randn(10)]
    torch.testing.assert_close(seedft(tau) / 3**0.5, torch.stack(tau).mean(0))


def test_bfloat16_inputs_compute_in_float32():
    generator = torch.Generator().manual_seed(5)
    tau = [t.to(torch.bfloat16) for t in related_deltas(16, 20, 3, generator)]
    merged = seedft(tau)
    assert merged.dtype == torch.float32
    assert relative_error(merged, seedft_reference([t.float() for t in tau])) < 1e-4


def test_polar_factor_matches_svd_and_handles_rank_deficiency():
    X = torch.randn(9, 4, dtype=torch.float64)
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(polar_factor(X), P @ Qh)
    # rank 1: the unique partial isometry u v^T
    u, v = torch.randn(9, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    expected = (u / u.norm()) @ (v / v.norm()).T
    torch.testing.assert_close(polar_factor(3 * u @ v.T), expected)


def test_lapack_eigendecompositions_use_torchs_thread_count(monkeypatch):
    """scipy's BLAS has its own thread pool: the Gram eigh must follow torch.set_num_threads."""
    import scipy.linalg
    from threadpoolctl import threadpool_info

    seen = []
    original = scipy.linalg.eigh

    def recording_eigh(*args, **kwargs):
        seen.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return original(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", recording_eigh)
    monkeypatch.setattr(linalg, "_LAPACK_EIGH_SIZE", 0)  # as for a large matrix
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tau = [torch.randn(30, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        result = seedft(tau)
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
    assert ((result.double() - seedft_reference(tau)).norm() / seedft_reference(tau).norm()) < 1e-6

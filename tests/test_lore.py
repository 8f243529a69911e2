"""LoRE-Merging kernel against a float64 coordinate-descent reference (docs/methods/lore.md's restatement)."""

import itertools

import pytest
import torch
from conftest import refused, run_cli, write_recipe

from mergekit_seed.maths.kernels.lore import _factored, lore, lore_estimate, relative_mu
from mergekit_seed.maths.profile import Profile
from mergekit_seed.references.weights import load_weights


def svt_reference(X, mu):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ torch.diag((S - mu).clamp_min(0)) @ Vh


def lore_reference(theta, mu, iterations):
    """Eq. 2 coordinate descent in float64 with full SVDs, all iterations, average post-merge."""
    theta = [t.double() for t in theta]
    deltas = [torch.zeros_like(theta[0]) for _ in theta]
    for _ in range(iterations):
        theta0 = sum(t - d for t, d in zip(theta, deltas)) / len(theta)
        deltas = [svt_reference(t - theta0, mu) for t in theta]
    return theta0 + sum(deltas) / len(deltas)


def models(shape, N, seed, spread=0.3):
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [(common + spread * torch.randn(shape, generator=generator, dtype=torch.float64)).float() for _ in range(N)]


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N", [2, 3, 4])
@pytest.mark.parametrize("shape", [(20, 30), (40, 12)])
@pytest.mark.parametrize("iterations", [1, 5])
def test_matches_float64_reference(N, shape, iterations):
    theta = models(shape, N, seed=N + iterations)
    mu = relative_mu(theta, 0.1)
    result = lore(theta, mu=mu, iterations=iterations, tol=0)
    assert relative_error(result, lore_reference(theta, mu, iterations)) < 1e-5


@pytest.mark.parametrize(
    "dtype, shape, iterations, bound",
    [
        (torch.float32, (600, 560), 3, 1e-4),
        (torch.float64, (600, 560), 3, 1e-10),
        (torch.float64, (1000, 900), 3, 1e-10),
    ],
)
def test_randomized_svt_path_matches_reference_on_a_large_matrix(dtype, shape, iterations, bound):
    """Through the randomized thresholdings, each warm-started from the previous iteration's
    sketch; at 1000 x 900 the mean delta stays factored and each first product comes from the
    previous one and the mean delta's change, at 600 x 560 the mean delta is formed (float64
    inputs converge their sketches to float64 accuracy)."""
    generator = torch.Generator().manual_seed(0)
    m, n = shape
    common = torch.randn(m, n, generator=generator, dtype=torch.float64)
    theta = [
        (
            common
            + torch.randn(m, 6, generator=generator, dtype=torch.float64)
            @ torch.randn(6, n, generator=generator, dtype=torch.float64)
            + 0.01 * torch.randn(m, n, generator=generator, dtype=torch.float64)
        ).to(dtype)
        for _ in range(3)
    ]
    mu = relative_mu(theta, 0.1)
    profile = Profile()
    estimate = lore_estimate(theta, mu=mu, iterations=iterations, tol=0, profile=profile)
    assert profile.counts["full_svds"] == 0 and profile.counts["sketches"] >= 3 * iterations
    assert _factored(sum(estimate.ranks), shape) == (m == 1000)
    result = lore(theta, mu=mu, iterations=iterations, tol=0)
    assert relative_error(result, lore_reference(theta, mu, iterations)) < bound


def test_mu_relative_uses_the_largest_spectral_norm_of_the_deviations():
    theta = models((15, 9), 3, seed=2)
    mean = torch.stack(theta).mean(0)
    expected = 0.25 * max(torch.linalg.matrix_norm((t - mean).double(), ord=2).item() for t in theta)
    assert relative_mu(theta, 0.25) == pytest.approx(expected, rel=1e-5)


def test_mu_zero_and_huge_mu_give_the_mean():
    theta = models((12, 18), 3, seed=3)
    mean = torch.stack(theta).mean(0)
    torch.testing.assert_close(lore(theta, mu=0.0, tol=0), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lore(theta, mu=1e6, tol=0), mean, atol=1e-5, rtol=1e-5)


def test_objective_never_increases():
    theta = models((16, 20), 4, seed=4, spread=1.0)
    estimate = lore_estimate(theta, mu_relative=0.2, iterations=12, tol=0, track_objective=True)
    history = estimate.objective
    assert len(history) == 12
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))


def test_exact_low_rank_deviations_come_back_as_deltas():
    generator = torch.Generator().manual_seed(5)
    theta_true = torch.randn(30, 24, generator=generator)
    deviations = [torch.randn(30, 2, generator=generator) @ torch.randn(2, 24, generator=generator) for _ in range(3)]
    mean_deviation = sum(deviations) / 3
    deviations = [d - mean_deviation for d in deviations]  # identifiable: they sum to zero
    noise = [1e-5 * torch.randn(30, 24, generator=generator) for _ in range(3)]
    theta = [theta_true + d + e for d, e in zip(deviations, noise)]
    estimate = lore_estimate(theta, mu=1e-3, iterations=10, tol=0)
    for delta, deviation in zip(estimate.deltas, deviations):
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) == torch.linalg.matrix_rank(deviation, rtol=1e-4)
        assert relative_error(delta, deviation) < 1e-2
    assert relative_error(estimate.theta0, theta_true) < 1e-3


def test_identical_models_and_order_invariance():
    t = models((10, 14), 1, seed=6)[0]
    torch.testing.assert_close(lore([t, t, t]), t)
    theta = models((10, 14), 3, seed=7)
    expected = lore(theta, tol=0)
    for order in itertools.permutations(range(3)):
        torch.testing.assert_close(lore([theta[i] for i in order], tol=0), expected, atol=1e-5, rtol=1e-5)


def test_tol_stops_early_and_non_matrices_get_the_mean():
    theta = models((10, 14), 3, seed=8)
    assert lore_estimate(theta, iterations=50, tol=1e-3).iterations < 50
    assert lore_estimate(theta, iterations=7, tol=0).iterations == 7
    vectors = [torch.randn(5) for _ in range(3)]
    torch.testing.assert_close(lore(vectors), torch.stack(vectors).mean(0))


def test_stock_mergekit_yaml_runs_lore_without_a_base(tiny_family, tmp_path):
    _, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "lore", None, seeds)
    run_cli("mergekit-yaml", recipe, tmp_path / "out", check=True)
    merged = load_weights(tmp_path / "out")
    weights = [load_weights(s) for s in seeds]
    name = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[name], lore([w[name] for w in weights]), atol=1e-6, rtol=1e-5)
    norm = "model.norm.weight"
    torch.testing.assert_close(merged[norm], torch.stack([w[norm] for w in weights]).mean(0))


@pytest.mark.parametrize(
    "parameters,fragment",
    [
        ({"mu": -1}, "'mu'"),
        ({"iterations": 0}, "'iterations'"),
        ({"mu": 0.1, "mu_relative": 0.2}, "'mu' and 'mu_relative' exclude each other"),
        ({"post_merge": "mean"}, "'post_merge'"),
    ],
)
def test_bad_lore_parameters_are_refused_by_name(tiny_family, tmp_path, parameters, fragment):
    _, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "lore", None, seeds, parameters)
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), fragment, out=tmp_path / "out")


def test_svt_count_bound_is_a_lower_bound_and_noise_goes_to_the_full_svd():
    from mergekit_seed.maths.linalg import _count_above_lower_bound, singular_value_threshold

    generator = torch.Generator().manual_seed(1)
    low_rank = torch.randn(600, 8, generator=generator, dtype=torch.float64) @ torch.randn(
        8, 560, generator=generator, dtype=torch.float64
    )
    noise = torch.randn(600, 560, generator=generator, dtype=torch.float64)
    for matrix in (low_rank, noise, low_rank + 0.1 * noise):
        S = torch.linalg.svdvals(matrix)
        for mu in (0.0, 0.1 * S[0].item(), 0.5 * S[0].item()):
            assert _count_above_lower_bound(matrix, mu) <= int((S > mu).sum())
            U, full_S, Vh = torch.linalg.svd(matrix, full_matrices=False)
            expected = (U * (full_S - mu).clamp_min(0)) @ Vh
            result = singular_value_threshold(matrix, mu).matrix
            assert (result - expected).norm() <= 1e-6 * expected.norm().clamp_min(1e-12)


def reference_stopping_iteration(theta, mu, tol, iterations):
    """The iteration at which Eq. 2 stops in float64: ||theta0_t - theta0_{t-1}||_F <= tol ||theta0_t||_F."""
    theta = [t.double() for t in theta]
    deltas = [torch.zeros_like(theta[0]) for _ in theta]
    previous = None
    for iteration in range(1, iterations + 1):
        theta0 = sum(t - d for t, d in zip(theta, deltas)) / len(theta)
        deltas = [svt_reference(t - theta0, mu) for t in theta]
        if previous is not None and (theta0 - previous).norm() <= tol * theta0.norm():
            return iteration
        previous = theta0
    return iterations


@pytest.mark.parametrize(
    "spectrum",
    ["low rank (the factored test)", "noise (the dense test)", "low rank, zero mean (theta0's norm formed)"],
)
def test_the_stopping_test_matches_the_reference_on_either_path(spectrum):
    """The convergence test is computed from the factors while the mean delta stays factored,
    densely once it is formed; ||theta0||_F is bracketed by ||mean|| -+ ||mean delta|| and
    formed only when the test falls in between (always, for models whose mean is zero). Every
    path stops where the float64 reference stops."""
    generator = torch.Generator().manual_seed(3)
    low_rank = spectrum.startswith("low rank")
    shape = (400, 300) if low_rank else (60, 40)
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    if low_rank:
        theta = [
            common
            + torch.randn(shape[0], 2, generator=generator, dtype=torch.float64)
            @ torch.randn(2, shape[1], generator=generator, dtype=torch.float64)
            for _ in range(3)
        ]
        if "zero mean" in spectrum:
            theta = [t - common for t in theta]
            theta[2] = -theta[0] - theta[1]
        theta = [t.float() for t in theta]
        mu = 20.0
    else:
        theta = [
            (common + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).float() for _ in range(3)
        ]
        mu = 1.0
    tol = 0.1 if "zero mean" in spectrum else 1e-4  # there theta0 grows from 0 as -dbar
    estimate = lore_estimate(theta, mu=mu, iterations=40, tol=tol)
    expected = reference_stopping_iteration(theta, mu, tol, 40)
    assert 2 < expected < 40
    assert estimate.iterations == expected
    assert _factored(sum(estimate.ranks), shape) == low_rank


def test_a_warm_start_below_the_rank_grows_to_it_without_a_full_svd():
    """More singular values exceed mu than the warm start holds (a rank that grew between
    iterations): the thresholding grows its sketch to the count it found, starting from the
    failed sketch's directions, instead of doubling past a quarter of the smaller side into a
    full SVD; the result is the float64 reference's."""
    from mergekit_seed.maths.linalg import singular_value_threshold

    generator = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(600, 560, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(560, 560, generator=generator, dtype=torch.float64)).Q
    S = 0.93 ** torch.arange(560, dtype=torch.float64)
    matrix = (U * S) @ V.T
    mu = (S[44] + S[45]).item() / 2  # exactly 45 values above mu; a quarter of 560 is 140
    warm = singular_value_threshold(matrix, (S[9] + S[10]).item() / 2)  # a higher mu kept 10
    assert warm.rank == 10
    thresholded = singular_value_threshold(matrix, mu, warm_start=warm)
    expected = (U * (S - mu).clamp_min(0)) @ V.T
    assert (thresholded.matrix - expected).norm() <= 1e-6 * expected.norm()
    assert thresholded.rank == 45
    assert not thresholded.full_svd

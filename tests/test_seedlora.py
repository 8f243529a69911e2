"""SeedLoRA kernels against float64 references written from the papers' equations."""

import itertools
import math

import pytest
import torch
from conftest import refused, run_cli, write_recipe

from mergekit_seed.maths.kernels import seedlora as seedlora_kernels
from mergekit_seed.maths.kernels.seedlora import fuse_mean, robust_and_conflict, seedlora_dm, seedlora_twostage
from mergekit_seed.maths.linalg import mean_and_std, quantile
from mergekit_seed.methods import make_fusion
from mergekit_seed.references.weights import load_weights


def seeds_like(shape, N, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [
        (0.7 * shared + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype) for _ in range(N)
    ]


# ------------------------------------------------------------------ distribution matching


def dm_reference(tau, weights=None, normalize=True):
    tau = [t.double() for t in tau]
    weights = weights or [1.0] * len(tau)
    divisor = sum(weights) if normalize else len(tau)
    tau_m = sum(w * t for w, t in zip(weights, tau)) / divisor  # Eq. 4
    mu_hat = sum(t.mean() for t in tau) / len(tau)
    sigma_hat = sum(t.std(unbiased=False) for t in tau) / len(tau)
    if tau_m.std(unbiased=False) == 0:
        return tau_m
    return sigma_hat * (tau_m - tau_m.mean()) / tau_m.std(unbiased=False) + mu_hat  # Eq. 5


@pytest.mark.parametrize("shape", [(12, 30), (7,), (4, 5, 6)])
@pytest.mark.parametrize("N", [2, 3, 5])
def test_dm_matches_reference(shape, N):
    tau = seeds_like(shape, N, seed=N)
    weights = [1.0 + i for i in range(N)]
    for normalize in (True, False):
        torch.testing.assert_close(
            seedlora_dm(tau, weights, normalize).double(), dm_reference(tau, weights, normalize), rtol=1e-5, atol=1e-6
        )


def test_dm_hits_target_mean_and_std_exactly():
    tau = seeds_like((20, 16), 3, seed=4)
    merged = seedlora_dm(tau).double()
    target_mean = sum(t.double().mean() for t in tau) / 3
    target_std = sum(t.double().std(unbiased=False) for t in tau) / 3
    assert abs(merged.mean() - target_mean) < 1e-6
    assert abs(merged.std(unbiased=False) - target_std) < 1e-6


def test_dm_weights_shape_the_mix_and_normalize_only_scales_before_rescale():
    a, b = torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0, -2.0])
    # weight 0 on b: the merge is a rescaled copy of a
    only_a = seedlora_dm([a, b], weights=[1.0, 0.0])
    centred = (a - a.mean()) / a.std(correction=0)
    sigma_hat = (a.std(correction=0) + b.std(correction=0)) / 2
    torch.testing.assert_close(only_a, sigma_hat * centred + (a.mean() + b.mean()) / 2)
    # Eq. 5 is scale invariant, so normalize changes nothing once the rescale applies
    torch.testing.assert_close(seedlora_dm([a, b], [2.0, 1.0], True), seedlora_dm([a, b], [2.0, 1.0], False))


def test_dm_zero_spread_skips_rescale_and_identity_cases():
    assert torch.count_nonzero(seedlora_dm([torch.zeros(5, 4)] * 3)) == 0
    constant = torch.full((3, 3), 0.25)
    torch.testing.assert_close(seedlora_dm([constant, constant]), constant)
    t = torch.randn(6, 8)
    torch.testing.assert_close(seedlora_dm([t, t, t]), t, atol=1e-6, rtol=1e-5)


def test_dm_seed_order_does_not_matter():
    tau = seeds_like((9, 11), 4, seed=9)
    expected = seedlora_dm(tau)
    for order in itertools.permutations(range(4)):
        torch.testing.assert_close(seedlora_dm([tau[i] for i in order]), expected)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_mean_and_std_in_blocks_matches_float64(offset):
    generator = torch.Generator().manual_seed(4)
    # several blocks, a ragged last one, and a mean that dwarfs the spread
    values = (offset + 1e-2 * torch.randn(3 * (1 << 16) + 123, generator=generator, dtype=torch.float64)).float()
    mean, std = mean_and_std(values)
    exact = values.double()
    exact_mean, exact_std = exact.mean().item(), exact.std(correction=0).item()
    # float32 blocks: the mean is exact to float32's resolution of the entries' magnitude
    assert abs(mean - exact_mean) <= 1e-6 * (abs(exact_mean) + exact_std)
    assert std == pytest.approx(exact_std, rel=1e-6)
    assert mean_and_std(torch.tensor([2.5])) == (2.5, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["seedlora_dm", "seedlora_twostage", "seedft", "lore"])
def test_merging_leaves_mergekit_tensors_untouched(method, dtype):
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    from mergekit_seed.methods import METHODS

    tensors = [t.to(dtype) for t in seeds_like((12, 9), 4, seed=11)]
    copies = [t.clone() for t in tensors]
    group = TensorGroup.from_tensors(tensors, base_index=0, name="w")
    merge_method = next(m for m in METHODS if m.spec.name == method)
    parameters = {p.name: p.default for p in merge_method.parameters}
    if "weight" in parameters:
        parameters["weight"] = PerInputValues([(entry.id, 1.0) for entry in group.entries])
    merge_method.merge_group(group, **parameters)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


# ------------------------------------------------------------------ two-stage


def twostage_reference(tau, threshold=None, q=0.5, min_agree=None, rank=None, energy=0.99):
    """Entry-by-entry stage 1 and full-SVD stage 2 with mean fusion, in float64."""
    tau = [t.double() for t in tau]
    N = len(tau)
    min_agree = min_agree or math.ceil(N / 2)
    flat_abs = torch.cat([t.abs().flatten() for t in tau])
    sigma = threshold if threshold is not None else torch.quantile(flat_abs, q).item()
    shape = tau[0].shape
    robust = torch.zeros(shape, dtype=torch.float64).flatten()
    conflict = torch.zeros_like(robust)
    residual = torch.ones_like(robust, dtype=torch.bool)
    flats = [t.flatten() for t in tau]
    for j in range(robust.numel()):
        values = [f[j].item() for f in flats]
        large = [v for v in values if abs(v) >= sigma and v != 0]
        pos = [v for v in large if v > 0]
        neg = [v for v in large if v < 0]
        if pos and neg:
            elected = pos if sum(pos) >= -sum(neg) else neg
            conflict[j] = sum(elected) / len(elected)
            residual[j] = False
        elif len(large) >= min_agree and large:
            robust[j] = sum(large) / len(large)
            residual[j] = False
    robust, conflict, residual = robust.view(shape), conflict.view(shape), residual.view(shape)
    masked = [t * residual for t in tau]
    M_avg = sum(masked) / N
    if M_avg.ndim != 2:
        return robust + conflict + M_avg
    U, S, Vh = torch.linalg.svd(M_avg, full_matrices=False)
    if rank is None:
        share = (S**2).cumsum(0) / (S**2).sum()
        rank = int((share < energy - 1e-12).sum()) + 1
    U, V = U[:, :rank], Vh[:rank].T
    Z = [U.T @ m @ V for m in masked]
    return robust + conflict + U @ (sum(Z) / N) @ V.T


@pytest.mark.parametrize("N", [2, 3, 4])
@pytest.mark.parametrize("settings", [{}, {"q": 0.3, "min_agree": 1}, {"threshold": 0.8, "rank": 3}, {"energy": 0.9}])
def test_twostage_matches_reference(N, settings):
    tau = seeds_like((10, 14), N, seed=N + 20)
    kernel_args = dict(settings)
    if "q" in kernel_args:
        kernel_args["threshold_quantile"] = kernel_args.pop("q")
    result = seedlora_twostage(tau, **kernel_args)
    expected = twostage_reference(tau, **settings)
    assert ((result.double() - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("shape", [(10, 14), (37,), (3, 4, 5)])
def test_twostage_in_row_blocks_equals_one_block_and_the_reference(monkeypatch, shape):
    tau = seeds_like(shape, 3, seed=5)
    whole = seedlora_twostage(tau)
    monkeypatch.setattr(seedlora_kernels, "_STAGE_ONE_BLOCK", 3)  # one row (or 3 entries) per block
    blocked = seedlora_twostage(tau)
    assert torch.equal(blocked, whole)
    expected = twostage_reference(tau)
    assert ((blocked.double() - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("q", [0.0, 1e-7, 0.3, 0.5, 0.999, 1.0])
def test_quantile_of_large_tensors_with_repeated_values_is_exact(q):
    generator = torch.Generator().manual_seed(3)
    # bf16-rounded deltas repeat values, which is what slows a plain quickselect
    values = torch.randn(3 * (1 << 20) + 7, generator=generator).bfloat16().float().abs()
    assert quantile(values, q) == torch.quantile(values, q)


def test_hand_made_three_seed_example():
    tau = [
        torch.tensor([2.0, 3.0, -2.0, 0.5, 2.0, 1.5]),
        torch.tensor([2.0, -1.0, 3.0, 0.2, 0.0, -1.2]),
        torch.tensor([4.0, -4.0, 1.0, -0.1, 0.0, 0.3]),
    ]
    stage_one = robust_and_conflict(torch.stack(tau), 1.0, min_agree=2)
    # entry 0: large and positive in all seeds -> robust 8/3
    # entry 1: +3 vs -1, -4: negative mass 5 > 3 -> conflict, mean(-1, -4)
    # entry 2: -2 vs +3, +1: positive mass 4 > 2 -> conflict, mean(3, 1)
    # entry 3: nothing large -> residual; entry 4: one large seed < min_agree -> residual
    # entry 5: +1.5 vs -1.2 -> conflict, +1.5
    torch.testing.assert_close(stage_one.robust, torch.tensor([8 / 3, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(stage_one.conflict, torch.tensor([0, -2.5, 2.0, 0, 0, 1.5]))
    assert stage_one.residual.tolist() == [False, False, False, True, True, False]
    merged = seedlora_twostage(tau, threshold=1.0)
    torch.testing.assert_close(merged, torch.tensor([8 / 3, -2.5, 2.0, 0.2, 2 / 3, 1.5]))


def test_mean_fusion_at_full_rank_is_robust_plus_conflict_plus_residual_mean():
    tau = seeds_like((16, 12), 3, seed=31)
    stacked = torch.stack(tau)
    sigma = torch.quantile(stacked.abs().flatten(), 0.5)
    stage_one = robust_and_conflict(stacked, sigma, 2)
    expected = stage_one.robust + stage_one.conflict + (stacked * stage_one.residual).mean(0)
    torch.testing.assert_close(seedlora_twostage(tau, rank=12), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seedlora_twostage(tau, energy=1.0), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fusion", ["mean", "ties", "dare"])
def test_twostage_identity_order_and_zero(fusion):
    t = seeds_like((12, 10), 1, seed=3)[0]
    fuse = make_fusion(fusion, 0.5, 7, "w") if fusion != "mean" else fuse_mean
    if fusion == "mean":
        torch.testing.assert_close(seedlora_twostage([t, t, t], energy=1.0), t, atol=1e-5, rtol=1e-4)
    # float64: TIES trimming and sign election are discontinuous, so float32 rounding in the
    # SVD could move one boundary coordinate between seed orders
    tau = seeds_like((12, 10), 3, seed=5, dtype=torch.float64)
    if fusion != "dare":
        expected = seedlora_twostage(tau, fusion=fuse)
        for order in itertools.permutations(range(3)):
            torch.testing.assert_close(
                seedlora_twostage([tau[i] for i in order], fusion=fuse), expected, atol=1e-5, rtol=1e-4
            )
    assert torch.count_nonzero(seedlora_twostage([torch.zeros(6, 5)] * 3, fusion=fuse)) == 0


def test_ties_fusion_is_sign_consensus_mean_of_trimmed_coordinates():
    Z = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]], [[-0.5, -4.0]]])
    fused = make_fusion("ties", 1.0, None, "w")(Z)
    # column 0: sum +3.5 -> keep +1, +3; column 1: sum -5 -> keep -2, -4
    torch.testing.assert_close(fused, torch.tensor([[2.0, -3.0]]))


def test_dare_fusion_is_reproducible_with_a_seed():
    Z = torch.randn(3, 8, 8)
    first = make_fusion("dare", 0.5, 11, "layer.0")(Z)
    torch.testing.assert_close(make_fusion("dare", 0.5, 11, "layer.0")(Z), first, rtol=0, atol=0)
    assert not torch.equal(make_fusion("dare", 0.5, 12, "layer.0")(Z), first)


# ------------------------------------------------------------------ through mergekit


@pytest.mark.parametrize("method,parameters", [("seedlora_dm", {}), ("seedlora_twostage", {"fusion": "ties"})])
def test_stock_mergekit_yaml_runs_seedlora(tiny_family, tmp_path, method, parameters):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", method, base, seeds, parameters)
    run_cli("mergekit-yaml", recipe, tmp_path / "out", check=True)
    merged = load_weights(tmp_path / "out")
    base_weights = load_weights(base)
    name = "model.layers.1.mlp.down_proj.weight"
    tau = [load_weights(s)[name] - base_weights[name] for s in seeds]
    if method == "seedlora_dm":
        expected = base_weights[name] + seedlora_dm(tau)
    else:
        expected = base_weights[name] + seedlora_twostage(tau, fusion=make_fusion("ties", 0.5, None, name))
    torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "parameters,fragment",
    [
        ({"threshold_quantile": 1.5}, "'threshold_quantile'"),
        ({"threshold_quantile": 0}, "'threshold_quantile'"),
        ({"threshold": -0.1}, "'threshold'"),
        ({"min_agree": 4}, "'min_agree' = 4 exceeds the number of seeds (3)"),
        ({"fusion": "average"}, "'fusion'"),
    ],
)
def test_bad_twostage_parameters_are_refused_by_name(tiny_family, tmp_path, parameters, fragment):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_twostage", base, seeds, parameters)
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), fragment, out=tmp_path / "out")

"""Property tests for every kernel over random shapes, seed counts, ranks and scales."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_seed.maths.kernels.lore import lore
from mergekit_seed.maths.kernels.seedft import seedft
from mergekit_seed.maths.kernels.seedlora import seedlora_dm, seedlora_twostage


KERNELS = {
    # name: (kernel, scale that makes N identical seeds give that seed back)
    "seedft": (lambda tau: seedft(tau), lambda n: 1 / math.sqrt(n)),
    "seedlora_dm": (lambda tau: seedlora_dm(tau), lambda n: 1.0),
    "seedlora_twostage": (lambda tau: seedlora_twostage(tau, energy=1.0), lambda n: 1.0),
    "lore": (lambda tau: lore(tau, tol=0), lambda n: 1.0),
}


@st.composite
def seed_deltas(draw):
    count = draw(st.integers(2, 4))
    shape = draw(
        st.one_of(
            st.tuples(st.integers(1, 12)),
            st.tuples(st.integers(1, 12), st.integers(1, 12)),
        )
    )
    scale = 10.0 ** draw(st.integers(-3, 3))
    rank = draw(st.one_of(st.none(), st.integers(1, 3)))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(count):
        if rank is not None and len(shape) == 2:
            tensor = torch.randn(shape[0], rank, generator=generator) @ torch.randn(
                rank, shape[1], generator=generator
            )
        else:
            tensor = torch.randn(shape, generator=generator)
        deltas.append(scale * tensor)
    return deltas


def close(a, b, reference_scale):
    return (a - b).abs().max().item() <= 1e-4 * max(reference_scale, 1e-30)


@settings(max_examples=40, deadline=None)
@given(deltas=seed_deltas(), name=st.sampled_from(sorted(KERNELS)))
def test_finite_shape_dtype_and_permutation_invariance(deltas, name):
    kernel, _ = KERNELS[name]
    merged = kernel(deltas)
    assert merged.shape == deltas[0].shape and merged.dtype == torch.float32
    assert torch.isfinite(merged).all()
    scale = max(d.abs().max().item() for d in deltas)
    assert close(kernel(deltas[::-1]), merged, scale)
    assert close(kernel(deltas[1:] + deltas[:1]), merged, scale)


@settings(max_examples=40, deadline=None)
@given(deltas=seed_deltas(), name=st.sampled_from(sorted(KERNELS)))
def test_identical_seeds_give_that_seed_back(deltas, name):
    kernel, identity_scale = KERNELS[name]
    count = len(deltas)
    merged = identity_scale(count) * kernel([deltas[0]] * count)
    assert close(merged, deltas[0], deltas[0].abs().max().item())


@settings(max_examples=20, deadline=None)
@given(deltas=seed_deltas(), name=st.sampled_from(sorted(KERNELS)))
def test_bfloat16_inputs_compute_in_float32(deltas, name):
    kernel, _ = KERNELS[name]
    merged = kernel([d.to(torch.bfloat16) for d in deltas])
    assert merged.dtype == torch.float32 and torch.isfinite(merged).all()


def test_zero_deltas_merge_to_zero():
    for name, (kernel, _) in KERNELS.items():
        assert torch.count_nonzero(kernel([torch.zeros(5, 3)] * 3)) == 0, name


SCALARS = st.one_of(st.floats(-2, 2, allow_nan=False), st.integers(-3, 3), st.booleans())
FILTERS = st.one_of(st.none(), st.just("*"), st.sampled_from(["q_proj", "mlp", "layers.1", "k_proj"]))


@settings(max_examples=200, deadline=None)
@given(
    setting=st.one_of(
        SCALARS,
        st.fixed_dictionaries({"value": SCALARS, "filter": FILTERS}),
        st.lists(st.fixed_dictionaries({"value": SCALARS, "filter": FILTERS}), min_size=1, max_size=4),
    ),
    tensor_name=st.sampled_from(["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]),
)
def test_adapter_settings_resolve_as_mergekit_resolves_them(setting, tensor_name):
    """Adapter recipes resolve parameter settings without mergekit's configuration module;
    the value must be the one mergekit's own evaluator gives for the parsed setting."""
    from mergekit.config import ParameterSetting
    from mergekit.config import evaluate_setting as mergekit_evaluate
    from pydantic import TypeAdapter

    from mergekit_seed.recipe import evaluate_setting

    parsed = TypeAdapter(ParameterSetting).validate_python(setting)
    expected = mergekit_evaluate(tensor_name, parsed, 0, validate=lambda value: value)
    assert evaluate_setting(setting, tensor_name) == expected


@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_truncated_svd_by_energy_equals_the_full_svd(spectrum):
    """The energy-truncated SVD (randomized when few directions suffice, a full SVD when the
    spectrum is flat) keeps the same rank and the same subspace as a full SVD."""
    from mergekit_seed.maths.linalg import rank_for_energy, truncated_approximation, truncated_svd

    generator = torch.Generator().manual_seed(3)
    m, n = 700, 600
    if spectrum == "flat":
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    else:
        left = torch.linalg.qr(torch.randn(m, 20, generator=generator, dtype=torch.float64)).Q
        right = torch.linalg.qr(torch.randn(n, 20, generator=generator, dtype=torch.float64)).Q
        matrix = (left * torch.logspace(0, -2, 20, dtype=torch.float64)) @ right.T
        matrix += 1e-6 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    U, S, V = truncated_svd(matrix, energy=0.99)
    # formed from the kept directions (decaying: randomized) or as matrix minus the dropped ones
    # (flat: a full SVD keeping most directions), it is the same approximation
    torch.testing.assert_close(truncated_approximation(matrix, energy=0.99), (U * S) @ V.T, rtol=0, atol=1e-12)
    full = torch.linalg.svdvals(matrix)
    assert S.numel() == rank_for_energy(full, 0.99)
    torch.testing.assert_close(S, full[: S.numel()], rtol=1e-6, atol=0)
    projection = (U * S) @ V.T
    reference_U, reference_S, reference_Vh = torch.linalg.svd(matrix, full_matrices=False)
    k = S.numel()
    reference = (reference_U[:, :k] * reference_S[:k]) @ reference_Vh[:k]
    assert (projection - reference).norm() <= 1e-6 * reference.norm()


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(0, 6), q=st.integers(1, 8), seed=st.integers(0, 2**16)
)
def test_a_shifted_matrix_multiplies_as_the_formed_sum(m, n, k, q, seed):
    """LoRE's residual D_i + dbar, kept unformed: both products and its formed matrix equal the
    explicit sum's (float64)."""
    from mergekit_seed.maths.linalg import LowRank, Shifted

    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=generator, dtype=torch.float64)
    shift = LowRank(
        torch.randn(m, k, generator=generator, dtype=torch.float64),
        torch.randn(k, n, generator=generator, dtype=torch.float64),
    )
    shifted, formed = Shifted(base, shift), base + shift.left @ shift.right
    right = torch.randn(n, q, generator=generator, dtype=torch.float64)
    left = torch.randn(q, m, generator=generator, dtype=torch.float64)
    assert torch.allclose(shifted @ right, formed @ right)
    assert torch.allclose(left @ shifted, left @ formed)
    assert torch.allclose(shifted.dense(), formed)
    assert tuple(shifted.shape) == (m, n) and shifted.dtype == torch.float64


@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 12), extra=st.integers(0, 30), decades=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_the_wide_svd_is_an_svd(q, extra, decades, seed):
    """The Rayleigh-Ritz SVD through QR: U S V^T gives the matrix back, U and V are orthonormal
    and S are LAPACK's singular values, for rows spanning up to 8 decades (float64)."""
    from mergekit_seed.maths.linalg import _wide_svd

    generator = torch.Generator().manual_seed(seed)
    n = q + extra
    matrix = (
        torch.randn(q, n, generator=generator, dtype=torch.float64)
        * torch.logspace(0, -decades, q, dtype=torch.float64)[:, None]
    )
    U, S, V = _wide_svd(matrix)
    assert torch.allclose((U * S) @ V.T, matrix, atol=1e-12)
    assert torch.allclose(U.T @ U, torch.eye(q, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(V.T @ V, torch.eye(q, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(matrix), rtol=1e-10, atol=1e-14)


@settings(max_examples=200, deadline=None)
@given(
    name=st.lists(
        st.sampled_from(["model", "layers", "0", "q_proj", "v_proj", "self_attn", "proj", "q"]), min_size=1, max_size=5
    ).map(".".join),
    targets=st.lists(
        st.sampled_from(["q_proj", "proj", "self_attn.q_proj", "0.q_proj", "q", "layers.0", "model"]),
        min_size=1,
        max_size=3,
    ),
)
def test_sera_target_modules_match_as_peft_matches_a_list(name, targets):
    """SeRA's target_modules (a list) select the modules PEFT's own rule selects."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from mergekit_seed.references.sera_layer import _matches

    assert _matches(name, targets) == bool(check_target_module_exists(LoraConfig(target_modules=targets), name))

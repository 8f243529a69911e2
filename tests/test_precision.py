"""The float32 paths against the float64 references on hard inputs (docs/performance.md, "Precision").

``seedlora_dm``, ``seedlora_twostage`` and ``lore`` compute in float32 for float32/bf16 checkpoints;
SeedFT's decompositions are float64 always. The documented tolerance is 1e-4 relative (Frobenius)
against each method's independent float64 reference, the one the reference tests use.
"""

import pytest
import torch
from test_lore import lore_reference
from test_seedft import seedft_reference
from test_seedlora import dm_reference, twostage_reference

from mergekit_seed.maths.kernels.lore import lore, relative_mu
from mergekit_seed.maths.kernels.seedft import seedft
from mergekit_seed.maths.kernels.seedlora import seedlora_dm, seedlora_twostage


TOLERANCE = 1e-4


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, generator) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V, in float64."""
    k = singular_values.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    return (U * singular_values) @ V.T


def hard_deltas(kind: str, shape=(48, 40), N: int = 3):
    """Float32 seed deltas: ``ill`` spectra spanning six decades, ``deficient`` rank 3 of 40,
    ``offset`` a mean 1000x the spread (the cancellation case for moments)."""
    generator = torch.Generator().manual_seed({"ill": 1, "deficient": 2, "offset": 3}[kind])
    m, n = shape
    if kind == "ill":
        spectrum = torch.logspace(0, -6, min(m, n), dtype=torch.float64)
        deltas = [with_spectrum(m, n, spectrum, generator) for _ in range(N)]
    elif kind == "deficient":
        shared = with_spectrum(m, n, torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64), generator)
        deltas = [
            shared + 0.1 * with_spectrum(m, n, torch.tensor([1.0], dtype=torch.float64), generator) for _ in range(N)
        ]
    else:
        deltas = [5.0 + 5e-3 * torch.randn(m, n, generator=generator, dtype=torch.float64) for _ in range(N)]
    return [d.float() for d in deltas]


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("kind", ["ill", "deficient", "offset"])
def test_seedlora_dm_in_float32(kind):
    tau = hard_deltas(kind)
    assert seedlora_dm(tau).dtype == torch.float32
    assert relative_error(seedlora_dm(tau), dm_reference(tau)) < TOLERANCE


@pytest.mark.parametrize("kind", ["ill", "deficient", "offset"])
@pytest.mark.parametrize("settings", [{}, {"energy": 0.9999}, {"rank": 3}])
def test_seedlora_twostage_in_float32(kind, settings):
    tau = hard_deltas(kind)
    expected = twostage_reference(tau, **settings)
    assert relative_error(seedlora_twostage(tau, **settings), expected) < TOLERANCE


@pytest.mark.parametrize("kind", ["ill", "deficient"])
@pytest.mark.parametrize("mu_relative", [1e-3, 0.1])
def test_lore_in_float32(kind, mu_relative):
    theta = hard_deltas(kind)
    mu = relative_mu(theta, mu_relative)
    expected = lore_reference(theta, mu, iterations=5)
    assert relative_error(lore(theta, mu=mu, iterations=5, tol=0), expected) < TOLERANCE


@pytest.mark.parametrize("kind", ["ill", "deficient"])
def test_seedft_on_float32_inputs_keeps_float64_decompositions(kind):
    tau = hard_deltas(kind)
    assert relative_error(seedft(tau), seedft_reference(tau)) < TOLERANCE

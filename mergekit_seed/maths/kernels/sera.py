"""SeRA: Vector Segmented and Recombined Adaptation, the delta of Eqs. 1-3 as tensors.

A SeRA layer adds ``x A C B`` (row-vector form) to a frozen linear layer ``x W0^T``, where
A (d_in x r) is block-diagonal with ``split`` blocks A_k (d_in/split x r/split), C (r x r) is
dense, and B (r x d_out) is block-diagonal with blocks B_k (r/split x d_out/split):

    h = x W0^T + scaling * x A C B,     scaling = sera_alpha / r           (Eq. 1)

Tensors in, tensors out: the layer (an ``nn.Module``) and its config are
:mod:`mergekit_seed.references.sera_layer`, an adapter folder on disk
:mod:`mergekit_seed.references.sera_files`.
"""

from __future__ import annotations

import torch


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(split, p, q) blocks -> the (split*p, split*q) block-diagonal matrix."""
    return torch.block_diag(*blocks.unbind(0))


def sera_delta_factors(A: torch.Tensor, C: torch.Tensor, B: torch.Tensor, scaling: float):
    """The PyTorch-layout delta ``scaling * (A C B)^T`` (d_out, d_in) as a factor pair (Eq. 1).

    Returns ``(left (d_out, r), right (r, d_in))`` with left @ right = scaling * B^T C^T A^T,
    A and B being the block-diagonal matrices built from the stored blocks (Eq. 2).
    """
    A_full, B_full = block_diagonal(A), block_diagonal(B)
    return scaling * B_full.T, C.T @ A_full.T

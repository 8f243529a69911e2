"""Kernels stay on their inputs' device (so --cuda/--device/--multi-gpu work) with a fixed dtype policy."""

import re
from pathlib import Path

import pytest
import torch

from mergekit_seed.kernels.lore import lore
from mergekit_seed.kernels.seedft import seedft, seedft_factored
from mergekit_seed.kernels.seedlora import seedlora_dm, seedlora_dm_factored, seedlora_twostage
from mergekit_seed.linalg import LowRank

PACKAGE = Path(__file__).parent.parent / "mergekit_seed"
FACTORIES = re.compile(r"torch\.(zeros|ones|full|empty|randn|rand|eye|arange|tensor|Generator)\(")


def test_every_tensor_factory_in_the_math_names_its_device():
    """A factory without ``device=`` would allocate on the CPU behind a GPU merge's back."""
    for path in [PACKAGE / "linalg.py", *(PACKAGE / "kernels").glob("*.py")]:
        text = path.read_text()
        for match in FACTORIES.finditer(text):
            call = text[match.start() : text.index("\n", match.start())]
            # multi-line calls: read up to the closing parenthesis
            depth, end = 0, match.end() - 1
            while True:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
                end += 1
            call = text[match.start() : end + 1]
            assert "device" in call, f"{path.name}: {call}"


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_dtype_policy(dtype, expected):
    tau = [torch.randn(6, 5).to(dtype) for _ in range(3)]
    for kernel in (seedft, seedlora_dm, seedlora_twostage, lore):
        result = kernel(tau)
        assert result.dtype == expected and result.device == tau[0].device, kernel.__name__
    pairs = [LowRank(torch.randn(6, 2), torch.randn(2, 5)) for _ in range(3)]
    for kernel in (seedft_factored, seedlora_dm_factored):
        merged = kernel(pairs)
        assert merged.left.dtype == torch.float32 and merged.left.device == pairs[0].left.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernels_run_on_the_gpu():
    tau = [torch.randn(64, 48, device="cuda") for _ in range(3)]
    for kernel in (seedft, seedlora_dm, seedlora_twostage, lore):
        assert kernel(tau).device.type == "cuda", kernel.__name__

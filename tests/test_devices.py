"""Kernels stay on their inputs' device (so --cuda/--device/--multi-gpu work) with a fixed dtype policy."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe

from mergekit_seed.maths.kernels.lore import lore
from mergekit_seed.maths.kernels.seedft import seedft, seedft_factored
from mergekit_seed.maths.kernels.seedlora import seedlora_dm, seedlora_dm_factored, seedlora_twostage
from mergekit_seed.maths.linalg import LowRank
from mergekit_seed.references.weights import load_weights


PACKAGE = Path(__file__).parent.parent / "mergekit_seed"
FACTORIES = {"zeros", "ones", "full", "empty", "randn", "rand", "eye", "arange", "tensor", "Generator"}


def factory_calls_without_device(source: str):
    """(line, call) of every ``torch.<factory>(...)`` in ``source`` without a ``device=`` keyword
    (read from the syntax tree: a variable or string that merely says "device" does not count)."""
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and not any(keyword.arg == "device" for keyword in node.keywords)
        ):
            yield node.lineno, ast.unparse(node)


def test_the_device_lint_catches_a_factory_without_device():
    bad = "import torch\ndef f(x, device):\n    return torch.zeros(3, dtype=x.dtype) + torch.ones(2, device=device)\n"
    assert [call for _, call in factory_calls_without_device(bad)] == ["torch.zeros(3, dtype=x.dtype)"]


def test_every_tensor_factory_in_the_math_names_its_device():
    """A factory without ``device=`` would allocate on the CPU behind a GPU merge's back."""
    for path in [PACKAGE / "maths" / "linalg.py", *(PACKAGE / "maths" / "kernels").glob("*.py")]:
        missing = list(factory_calls_without_device(path.read_text()))
        assert not missing, f"{path.name}: {missing}"


@pytest.mark.parametrize(
    "dtype,expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_dtype_policy(dtype, expected):
    tau = [torch.randn(6, 5).to(dtype) for _ in range(3)]
    for kernel in (seedft, seedlora_dm, seedlora_twostage, lore):
        result = kernel(tau)
        assert result.dtype == expected and result.device == tau[0].device, kernel.__name__
    pairs = [LowRank(torch.randn(6, 2), torch.randn(2, 5)) for _ in range(3)]
    for kernel in (seedft_factored, seedlora_dm_factored):
        merged = kernel(pairs)
        assert merged.left.dtype == torch.float32 and merged.left.device == pairs[0].left.device


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("shape", [(64, 48), (700, 600)])  # the second takes the randomized paths
def test_kernels_give_the_cpus_result_on_the_gpu(shape):
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator)
    tau = [common + 0.1 * torch.randn(shape, generator=generator) for _ in range(3)]
    for kernel in (seedft, seedlora_dm, seedlora_twostage, lore):
        on_cpu = kernel(tau)
        on_gpu = kernel([t.cuda() for t in tau])
        assert on_gpu.device.type == "cuda", kernel.__name__
        error = ((on_gpu.cpu().double() - on_cpu.double()).norm() / on_cpu.double().norm()).item()
        assert error < 1e-4, (kernel.__name__, error)


@needs_gpu
def test_stock_mergekit_yaml_with_cuda_matches_the_cpu(tiny_family, tmp_path):
    base, seeds = tiny_family
    from mergekit_seed.methods import our_method_names

    for method in our_method_names():
        recipe = write_recipe(tmp_path / f"{method}.yml", method, None if method == "lore" else base, seeds)
        run_cli("mergekit-yaml", recipe, tmp_path / f"{method}-cpu", check=True)
        run_cli("mergekit-yaml", recipe, tmp_path / f"{method}-gpu", "--cuda", check=True)
        cpu, gpu = load_weights(tmp_path / f"{method}-cpu"), load_weights(tmp_path / f"{method}-gpu")
        for name in cpu:
            torch.testing.assert_close(gpu[name], cpu[name], atol=1e-5, rtol=1e-4, msg=f"{method} {name}")

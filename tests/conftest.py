import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny LLaMA base and three seed checkpoints (absolute paths)."""
    from mergekit_seed.demo.tiny import derive_seeds, save_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_llama(root / "base")
    seeds = derive_seeds(base, root, 3)
    return base, seeds


def write_recipe(path: Path, method: str, base, seeds, parameters=None, extra: str = "") -> Path:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    lines += [f"  - model: {seed}" for seed in seeds]
    if parameters:
        lines.append("parameters:")
        lines += [f"  {key}: {value}" for key, value in parameters.items()]
    lines.append("dtype: float32")
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def run_cli(*args, check=False):
    """Run an installed console script in a subprocess (offline)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result

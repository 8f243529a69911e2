import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items):
    """The demo's tests first: `make test` runs two workers, a file each at a time (--dist
    loadfile), and test_demo.py, the longest file (its quick demo is 4-5 minutes), should not
    start last."""
    items.sort(key=lambda item: item.path.name != "test_demo.py")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny LLaMA base and three seed checkpoints (absolute paths)."""
    from tiny import derive_seeds, save_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_llama(root / "base")
    seeds = derive_seeds(base, root, 3)
    return base, seeds


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory):
    """Two random PEFT LoRA adapters (r=4, q_proj and v_proj) on their own tiny LLaMA base."""
    from tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("loras")
    base = save_tiny_llama(root / "base")
    return base, [save_random_lora(base, root / f"lora{i}", r=4, seed=i) for i in range(2)]


def tree_hashes(*roots: Path) -> dict:
    """{file: sha256} of every file under ``roots``: what "an input never changes" compares."""
    import hashlib

    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        for path in sorted(Path(root).rglob("*"))
        if path.is_file()
    }


def recipe_text(method: str, base, seeds, parameters=None, output=None) -> str:
    """A recipe: merge_method, base_model (unless None), models, parameters, output section."""
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    lines += [f"  - model: {seed}" for seed in seeds]
    if parameters:
        lines.append("parameters:")
        lines += [f"  {key}: {value}" for key, value in parameters.items()]
    lines.append("dtype: float32")
    if output:
        lines.append("output:")
        lines += [f"  {key}: {value}" for key, value in output.items()]
    return "\n".join(lines) + "\n"


def write_recipe(path: Path, method: str, base, seeds, parameters=None, output=None) -> Path:
    path.write_text(recipe_text(method, base, seeds, parameters, output), encoding="utf-8")
    return path


def refused(result, *fragments, out=None):
    """Exit status 1, one `error:` line naming what is wrong, no weights or staging under OUT."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr
    for fragment in fragments:
        assert any(fragment in line for line in errors), result.stderr
    if out is not None:
        assert not out.exists() or not list(out.rglob("*.safetensors"))
        assert not list(out.parent.glob(f".{out.name}.partial-*"))


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def _entry_point(name):
    if name == "mergekit-seed":
        from mergekit_seed.cli import main

        return main
    if name == "mergekit-yaml":
        from mergekit.scripts.run_yaml import main

        return main
    raise ValueError(name)


def run_cli(*args, check=False, isolated=False):
    """Run a console script (``mergekit-seed`` or stock ``mergekit-yaml``).

    In-process through click's runner by default (the seconds of torch/transformers imports
    are paid once); ``isolated=True`` runs the installed script in a subprocess, as a user
    would. In-process, an exception other than a clean exit is re-raised: it would have been
    a traceback.
    """
    if isolated:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, env=env)
        result = CliResult(done.returncode, done.stdout, done.stderr)
    else:
        from click.testing import CliRunner

        outcome = CliRunner().invoke(_entry_point(args[0]), [str(a) for a in args[1:]], catch_exceptions=True)
        if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
            raise outcome.exception
        result = CliResult(outcome.exit_code, outcome.stdout, outcome.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def save_random_lora(
    base: Path, out: Path, r: int, seed: int, targets=("q_proj", "v_proj"), use_rslora=False, alpha=16
):
    """A PEFT LoRA adapter on the tiny base with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def save_random_sera(base: Path, out: Path, r: int, split: int, seed: int, targets=("q_proj", "v_proj")):
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_seed.references.sera_files import save_sera
    from mergekit_seed.references.sera_layer import SeraConfig, apply_sera, sera_layers

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = SeraConfig(
        r=r, split=split, sera_alpha=2 * r, target_modules=list(targets), base_model_name_or_path=str(base)
    )
    apply_sera(model, config)
    with torch.no_grad():
        for layer in sera_layers(model).values():
            layer.sera_B.normal_(0, 0.05)
    save_sera(model, out, config)
    return out


def lora_copies(tiny_loras, tmp_path):
    base, seeds = tiny_loras
    return shutil.copytree(base, tmp_path / "base"), [shutil.copytree(s, tmp_path / s.name) for s in seeds]


def no_staging_left(folder: Path) -> None:
    """No staging or replaced folder of ours is left in ``folder``."""
    assert not [p for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def write_splits(folder: Path):
    """A validation and a test JSONL file of prompt/answer rows (reversed words), disjoint, in
    ``folder``: what ``select`` and ``compare`` read. Returns (validation, test)."""
    rows = [
        {"prompt": f"{op}:{word}=", "answer": word[::-1]}
        for op in ("rev", "sort")
        for word in ("abc", "xyz", "mno", "pq")
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[::2]))
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[1::2]))
    return folder / "val.jsonl", folder / "test.jsonl"


def drawn(monkeypatch, method: str, position: int) -> list:
    """What matplotlib is asked to draw: every value passed at ``position`` (counting after the
    axes) to ``Axes.<method>`` (``set_title``, 0: the titles; ``text``, 2: the cell texts;
    ``set_xticks``, 1: the tick labels), recorded while the call goes through."""
    import matplotlib.axes

    values = []
    original = getattr(matplotlib.axes.Axes, method)

    def recorded(axis, *args, **kwargs):
        values.append(args[position] if len(args) > position else kwargs.get("labels"))
        return original(axis, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, method, recorded)
    return values


# ------------------------------------------------------------------ select's planted family

PROMPTS = [
    f"{op}:{word}="
    for op in ("rev", "sort", "dup", "next", "add", "cap")
    for word in ("abc", "xyz", "mno", "pq", "hij", "uvw", "kl", "de", "fg", "rs", "tu", "wx")
]


def planted_family(root: Path, count: int = 3, noise: float = 0.06):
    """A base, a strong model S and ``count`` weak seeds S + n_i with zero-sum noise, so that
    Model Soup (the plain average of the seeds) is S itself."""
    import torch
    from safetensors.torch import load_file, save_file
    from tiny import save_tiny_llama

    base = save_tiny_llama(root / "base", seed=0)
    strong = save_tiny_llama(root / "strong", seed=1)
    weights = load_file(strong / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    noises = [
        {n: noise * torch.randn(t.shape, generator=generator) for n, t in weights.items()} for _ in range(count - 1)
    ]
    noises.append({n: -sum(other[n] for other in noises) for n in weights})
    seeds = []
    for index, seed_noise in enumerate(noises):
        folder = save_tiny_llama(root / f"seed{index}", seed=0)
        save_file(
            {n: (t + seed_noise[n]).contiguous() for n, t in weights.items()},
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
        seeds.append(folder)
    return base, strong, seeds


def answers_of(model_folder: Path, prompts, path: Path, length: int = 3) -> Path:
    """A JSONL of prompts answered with ``model_folder``'s greedy continuation (kept when the
    answer tokenizes back to the same tokens)."""
    import torch

    from mergekit_seed.tools.compare import greedy_continuation, load_model

    model, tokenizer = load_model(str(model_folder), None, "cpu")
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            generated = greedy_continuation(model, ids, length)[0, -length:].tolist()
            answer = "".join(tokenizer.convert_ids_to_tokens(generated))
            if answer.strip() == answer and tokenizer(answer, add_special_tokens=False)["input_ids"] == generated:
                rows.append({"prompt": prompt, "answer": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``select``'s planted family (:func:`planted_family`) with validation and test splits
    answered by the strong model: (root, base, strong, seeds, validation, test)."""
    root = tmp_path_factory.mktemp("planted")
    base, strong, seeds = planted_family(root)
    validation = answers_of(strong, PROMPTS[:36], root / "validation.jsonl")
    test = answers_of(strong, PROMPTS[36:], root / "test.jsonl")
    return root, base, strong, seeds, validation, test


def select_planted(planted, out: Path, *, seeds=None, validation=None, test=None, echo=None, **settings) -> dict:
    """``select()`` on the planted family's seeds and splits (or ``seeds``, ``validation``,
    ``test``) into ``out``: quiet, with 200 bootstrap resamples unless ``settings`` say otherwise;
    ``echo`` gets the printed lines (default: none)."""
    from mergekit_seed.tools import selection

    _, base, _, planted_seeds, planted_validation, planted_test = planted
    settings = {"quiet": True, "resamples": 200, **settings}
    return selection.select(
        [str(seed) for seed in seeds or planted_seeds],
        str(base),
        validation or planted_validation,
        test or planted_test,
        out,
        echo=echo or (lambda _line: None),
        **settings,
    )

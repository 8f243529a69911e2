"""Every shell command of README.md and docs/*.md runs, offline, on tiny models, or is listed here
with the reason it cannot (issue 41).

Each ```bash block runs in a fresh folder holding what the docs' commands name (tiny models under
the docs' paths, the recipe files, the JSONL data), one command after the other, through the
installed commands themselves (click's runner, in-process, for speed). A command in the docs that
is neither run nor listed below fails the test, so a new command gets one or the other.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner


REPO = Path(__file__).parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^ *```(?:bash|sh)\n(.*?)^ *```", re.S | re.M)

# command (its start, as the docs write it) -> why it does not run here
NOT_OFFLINE = {
    "make demo": "the full demo, minutes of CPU (tests/test_demo.py runs the quick demo)",
    "make test": "the test suite itself",
    "pip install": "installs packages from an index",
    "mergekit-seed demo --out demo-out": "the demo (tests/test_demo.py runs it with --quick)",
    "hf upload": "uploads to the Hugging Face Hub",
    "mergekit-seed reproduce "
    "me/llama-seedft": "reads a Hub repository (tests/test_hub.py reproduces from a local Hub cache)",
    "for model in": "a loop of lm-eval runs with vLLM on real models",
    "lm_eval ": "lm-eval on real models and datasets (vLLM, or a 7B model)",
    "done": "the end of the lm-eval loop above",
    "accelerate launch": "lm-eval under accelerate on real models",
    "mergekit-seed compare "
    "--lm-eval": "compares the folders the lm_eval commands above write (tests/test_lm_eval.py builds such folders)",
    "mergekit-seed compare runs/seed0 runs/seed1 runs/seed2 merged/seedft "
    "--tasks": "downloads gsm8k and arc_easy, and asks for a GPU",
    "mergekit-seed select ... "
    "--dry-run": "elided arguments: the command above with --dry-run (tests/test_select.py runs it)",
    "mergekit-seed select SEEDS... --base BASE --validation-tasks "
    "arc_easy_val": "downloads ARC-Easy (tests/test_select.py runs local lm-eval tasks)",
    "mergekit-seed select SEEDS... --base BASE --validation V --test T --out merged/ "
    "--ray": "placeholder arguments (tests/test_select_ray.py runs select on a two-node Ray cluster)",
    "mergekit-seed select ... "
    "--ray-address": "joins a running Ray cluster (tests/test_select_ray.py starts one on this machine)",
    "mergekit-seed select ... --ray "
    "--dry-run": "elided arguments (tests/test_select_ray.py runs --ray --dry-run on a local runtime)",
}


def commands(text: str):
    """The commands of one block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            yield line


def blocks():
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            yield pytest.param(list(commands(match.group(1))), id=f"{page.relative_to(REPO)}#{number}")


def _skip_reason(command: str):
    return next((reason for start, reason in NOT_OFFLINE.items() if command.startswith(start)), None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models under every name the docs give their inputs."""
    from conftest import save_random_lora
    from tiny import derive_seeds, save_tiny_llama

    root = tmp_path_factory.mktemp("doc-models")
    base = save_tiny_llama(root / "base")
    seeds = derive_seeds(base, root, 3)
    loras = [save_random_lora(base, root / f"lora{i}", r=4, seed=i) for i in range(3)]
    return base, seeds, loras


def workspace(folder: Path, models) -> dict:
    """Fill ``folder`` with what the docs' commands name; returns {name in the docs: path here}."""
    from conftest import recipe_text

    base, seeds, loras = models
    names = {"/models/llama-2-7b": base, "/models/base": base, "BASE": base}
    for index, number in enumerate((42, 87, 100)):
        names[f"/runs/metamath-seed{number}"] = seeds[index]
        names[f"SEED{index + 1}"] = seeds[index]
        names[f"ADAPTER{index + 1}"] = loras[index]
    (folder / "runs").mkdir()
    for index, name in enumerate(["seed0", "seed1", "seed2", "seed42", "seed87", "seed100"]):
        (folder / "runs" / name).symlink_to(seeds[index % 3])
    recipe = re.search(r"```yaml\n(# seedft.yml.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(
        1
    )
    for name, path in names.items():
        recipe = recipe.replace(name, str(path)) if name.startswith("/") else recipe
    for file in ("seedft.yml", "recipe.yml"):  # the README's recipe, on the tiny models
        (folder / file).write_text(recipe)
    (folder / "lore.yml").write_text(
        recipe.replace("merge_method: seedft", "merge_method: lore").replace("lambda: auto", "lambda: 1.0")
    )
    (folder / "base-plus-adapters.yml").write_text(
        recipe_text("seedlora_dm", base, [f"{base}+{lora}" for lora in loras])
    )
    rows = [
        {"prompt": f"{op}:{word}=", "answer": word[::-1]}
        for op in ("rev", "sort", "dup")
        for word in ("abc", "xyz", "mno", "pq", "hij", "uvw")
    ]
    for name, part in (("heldout.jsonl", rows), ("val.jsonl", rows[::2]), ("test.jsonl", rows[1::2])):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    return names


def run(command: str, names: dict, folder: Path) -> str:
    """Run one documented command in ``folder``: our CLI and mergekit's, in-process; ``cat``."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_seed import merge
    from mergekit_seed.cli import main as mergekit_seed

    words = [str(names.get(word, word)) for word in shlex.split(command)]
    environment = {}
    while "=" in words[0] and words[0].split("=")[0].isupper():  # NAME=value before the command
        name, _, value = words.pop(0).partition("=")
        environment[name] = value
    if words[0] == "cat":
        return (folder / words[1]).read_text()
    for method in ("seedft", "lore"):  # compare's page compares merges made before
        if f"merged/{method}" in words and not (folder / "merged" / method).exists():
            merge(folder / f"{method}.yml", folder / "merged" / method, quiet=True, echo=lambda _line: None)
    program = {"mergekit-seed": mergekit_seed, "mergekit-yaml": mergekit_yaml}[words[0]]
    result = CliRunner(env=environment).invoke(program, words[1:], catch_exceptions=False)
    assert result.exit_code == 0, f"{command}: {result.output}"
    return result.output


@pytest.mark.parametrize("block", list(blocks()))
def test_every_documented_command_runs_offline_or_says_why_not(block, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = workspace(tmp_path, models)
    for command in block:
        if _skip_reason(command) is None:
            program = next(word for word in command.split() if "=" not in word)  # after NAME=value settings
            assert program in ("mergekit-seed", "mergekit-yaml", "cat"), (
                f"{command}: neither run here nor listed in NOT_OFFLINE"
            )
            run(command, names, tmp_path)


def test_every_listed_command_is_still_in_the_docs():
    documented = [
        command
        for page in PAGES
        for match in BLOCK.finditer(page.read_text(encoding="utf-8"))
        for command in commands(match.group(1))
    ]
    for start in NOT_OFFLINE:
        assert any(command.startswith(start) for command in documented), (
            f"{start}: no longer in the docs; drop it from NOT_OFFLINE"
        )

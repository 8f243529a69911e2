"""The provenance gate (``mergekit_seed.public``): no file any command publishes names the
merging machine's folders, a URL's credentials or a secret from the environment."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, save_random_lora, write_recipe, write_splits

from mergekit_seed.public import Labels, public_text


TOKEN = "hf_PLANTEDtoken0123456789"
PLANTED = "/planted/private/checkpoint"


def test_inputs_become_labels_and_paths_under_them_keep_their_tail(tmp_path):
    runs = tmp_path / "runs"
    labels = Labels.for_inputs([runs / "base", runs / "seed1"], {str(runs / "base"): "input0"})
    text = f"base {runs}/base, a file {runs}/seed1/model.safetensors, not {runs}/base2 nor {runs}/seed10"
    assert (
        public_text(text, labels) == f"base input0, a file seed1/model.safetensors, not {runs}/base2 nor {runs}/seed10"
    )


def test_json_name_or_path_fields_never_name_a_local_path(tmp_path):
    labels = Labels.for_inputs([tmp_path / "base"], {str(tmp_path / "base"): "input0"})
    text = json.dumps(
        {
            "name_or_path": str(tmp_path / "base"),
            "_name_or_path": PLANTED,
            "base_model_name_or_path": "org/model",
            "other": "kept",
        }
    )
    published = json.loads(public_text(text, labels))
    assert published == {
        "name_or_path": "input0",
        "_name_or_path": "checkpoint",
        "base_model_name_or_path": "org/model",
        "other": "kept",
    }


def test_cache_paths_become_repository_ids(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    assert (
        public_text(f'{{"name_or_path": "{snapshot}"}} and {snapshot}/config.json')
        == '{"name_or_path": "org/name"} and org/name'
    )


@pytest.mark.parametrize(
    "url, public",
    [
        ("https://user:tok@host/x.git?token=1#frag", "https://host/x.git"),
        ("https://huggingface.co/org/name", "https://huggingface.co/org/name"),
    ],
)
def test_urls_lose_credentials_and_queries(url, public):
    assert public_text(f"see {url} here") == f"see {public} here"


def test_secrets_from_the_environment_and_the_home_folder(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    home = os.path.expanduser("~")
    assert public_text(f"token {TOKEN} in {home}/src/x") == "token <redacted> in ~/src/x"


def _plant(folder: Path) -> None:
    """A local path in every JSON field transformers and PEFT record a model's origin in."""
    for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            key = {"tokenizer_config.json": "name_or_path", "adapter_config.json": "base_model_name_or_path"}
            data[key.get(name, "_name_or_path")] = PLANTED
            path.write_text(json.dumps(data))


def _written_text(*folders: Path) -> dict:
    return {
        str(path): path.read_text(errors="replace")
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and path.suffix in (".md", ".json", ".yml", ".yaml", ".txt", ".jinja")
    }


def test_no_published_file_names_a_planted_path_or_token(tiny_family, tmp_path, monkeypatch):
    """Every text file that run, select, compare, analyze and reproduce publish, with a token in
    the environment, the inputs under a folder whose name must not leak, and a local path planted
    in every config of every input."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base, seeds = tiny_family
    runs = tmp_path / "private-runs"
    base = shutil.copytree(base, runs / "base")
    seeds = [shutil.copytree(seed, runs / seed.name) for seed in seeds]
    loras = [save_random_lora(base, runs / f"lora{index}", r=4, seed=index) for index in range(2)]
    for folder in (base, *seeds, *loras):
        _plant(folder)
    data, test_data = write_splits(runs / "data")
    outs = tmp_path / "outs"
    full = write_recipe(runs / "full.yml", "seedft", base, seeds)
    adapter = write_recipe(runs / "lora.yml", "seedlora_dm", base, loras)
    commands = [
        ("run", full, outs / "full"),
        ("run", adapter, outs / "lora"),
        (
            "select",
            *seeds,
            "--base",
            base,
            "--validation",
            data,
            "--test",
            test_data,
            "--methods",
            "seedft,linear",
            "--out",
            outs / "select",
        ),
        ("compare", *seeds, "--data", data, "--out", outs / "compare"),
        ("analyze", *seeds, "--base", base, "--out", outs / "analyze"),
        ("reproduce", outs / "full", outs / "again", "--recipe", full),
    ]
    for command in commands:
        run_cli("mergekit-seed", *command, "--quiet", check=True)
    written = _written_text(outs)
    assert len(written) > 20 and any(path.endswith("tokenizer_config.json") for path in written)
    for path, text in written.items():
        for secret in (TOKEN, PLANTED, "private-runs", str(tmp_path)):
            assert secret not in text, f"{path} names {secret}"

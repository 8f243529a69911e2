"""Hub inputs resolved offline from a cache in huggingface_hub's own layout, pinned in the card,
and reproduced from a repository id. No test reaches the network (HF_HUB_OFFLINE=1)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import refused, run_cli

from mergekit_seed.references.weights import load_weights


def publish_to_cache(cache: Path, repo_id: str, folder: Path, message: str) -> str:
    """Put ``folder``'s files in the Hub cache as a new commit of ``repo_id`` on ``main``, laid out
    as huggingface_hub lays it out (blobs by content hash, snapshot symlinks, refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}:{message}".encode()).hexdigest()
    for file in sorted(folder.iterdir()):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def hub(tiny_family, tmp_path, monkeypatch):
    """A Hub cache holding the tiny family as org/base, org/seed0..2; HF_HUB_CACHE points at it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    base, seeds = tiny_family
    commits = {"org/base": publish_to_cache(cache, "org/base", base, "v1")}
    for index, seed in enumerate(seeds):
        commits[f"org/seed{index}"] = publish_to_cache(cache, f"org/seed{index}", seed, "v1")
    return cache, commits


def hub_recipe(path: Path, method: str = "seedlora_dm") -> Path:
    path.write_text(
        f"merge_method: {method}\nbase_model: org/base\nmodels:\n"
        + "".join(f"  - model: org/seed{i}\n" for i in range(3))
        + "dtype: float32\n"
    )
    return path


def provenance(card: Path) -> dict:
    return yaml.safe_load(card.read_text().split("---\n")[1])["mergekit_seed"]


def test_hub_ids_merge_offline_and_the_card_pins_them(hub, tiny_family, tmp_path):
    cache, commits = hub
    out = tmp_path / "merged"
    result = run_cli("mergekit-seed", "run", hub_recipe(tmp_path / "r.yml"), out, "--quiet")
    assert result.returncode == 0, result.stderr
    recorded = provenance(out / "README.md")
    assert {repo: entry["revision"] for repo, entry in recorded["hub_inputs"].items()} == commits
    base, seeds = tiny_family
    digest = hashlib.sha256((seeds[1] / "model.safetensors").read_bytes()).hexdigest()
    assert recorded["hub_inputs"]["org/seed1"]["files"] == {"model.safetensors": digest}
    # the same merge from the local folders gives the same tensors
    local = tmp_path / "local.yml"
    local.write_text(
        f"merge_method: seedlora_dm\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {s}\n" for s in seeds)
        + "dtype: float32\n"
    )
    run_cli("mergekit-seed", "run", local, tmp_path / "local", "--quiet", check=True)
    a, b = load_weights(out), load_weights(tmp_path / "local")
    assert all(torch.equal(a[name], b[name]) for name in b)
    card_text = (out / "README.md").read_text()
    assert str(tmp_path) not in card_text.split("---\n")[1]  # no local paths in the front matter

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/base", "org/seed0", "org/seed1", "org/seed2"]
    assert card.data.base_model_relation == "merge"
    assert card.text.lstrip().startswith("# merged")


def test_reproduce_by_repo_id_uses_the_recorded_revisions(hub, tiny_family, tmp_path):
    cache, commits = hub
    out = tmp_path / "merged"
    run_cli("mergekit-seed", "run", hub_recipe(tmp_path / "r.yml"), out, "--quiet", check=True)
    publish_to_cache(cache, "me/merged", out, "v1")

    # seed0's main moves on after the merge
    moved = tmp_path / "seed0-v2"
    shutil.copytree(tiny_family[1][0], moved)
    from safetensors.torch import load_file, save_file

    weights = load_file(moved / "model.safetensors")
    for tensor in weights.values():
        tensor.mul_(1.5)
    save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    publish_to_cache(cache, "org/seed0", moved, "v2")

    result = run_cli("mergekit-seed", "reproduce", "me/merged", tmp_path / "again", "--check")
    assert result.returncode == 0, result.stderr
    assert "largest difference: 0 in" in result.stdout


def test_a_tampered_blob_is_refused(hub, tmp_path):
    cache, commits = hub
    out = tmp_path / "merged"
    run_cli("mergekit-seed", "run", hub_recipe(tmp_path / "r.yml"), out, "--quiet", check=True)
    snapshot = cache / "models--org--seed2" / "snapshots" / commits["org/seed2"] / "model.safetensors"
    blob = snapshot.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    again = tmp_path / "again"
    refused(
        run_cli("mergekit-seed", "reproduce", out, again), "org/seed2@", "model.safetensors has changed", out=again
    )
    assert not again.exists()


def test_a_missing_revision_and_a_card_without_provenance(hub, tmp_path):
    cache, commits = hub
    out = tmp_path / "merged"
    run_cli("mergekit-seed", "run", hub_recipe(tmp_path / "r.yml"), out, "--quiet", check=True)
    card = out / "README.md"
    text = card.read_text()
    card.write_text(text.replace(commits["org/seed1"], "f" * 40))
    again = tmp_path / "again"
    refused(run_cli("mergekit-seed", "reproduce", card, again), f"org/seed1@{'f' * 40}", out=again)

    card.write_text(
        "# A model\n\n### Configuration\n\n```yaml\n" + hub_recipe(tmp_path / "x.yml").read_text() + "```\n"
    )
    refused(run_cli("mergekit-seed", "reproduce", card, again), "no mergekit-seed provenance", out=again)
    assert not again.exists()


def test_hub_ids_missing_from_the_cache_are_one_line(hub, tmp_path):
    recipe = hub_recipe(tmp_path / "r.yml")
    recipe.write_text(recipe.read_text().replace("org/seed2", "org/absent"))
    refused(run_cli("mergekit-seed", "validate", recipe), "org/absent", "not in the Hugging Face cache")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "org/absent", out=tmp_path / "out")
    refused(
        run_cli("mergekit-seed", "reproduce", "org/nothing-here", tmp_path / "out"),
        "org/nothing-here",
        out=tmp_path / "out",
    )


def test_hub_adapters_merge_offline(hub, tiny_family, tmp_path):
    from conftest import save_random_lora

    cache, commits = hub
    base = tiny_family[0]
    for index in range(2):
        folder = save_random_lora(base, tmp_path / f"lora{index}", r=2, seed=index)
        publish_to_cache(cache, f"org/lora{index}", folder, "v1")
    recipe = tmp_path / "lora.yml"
    recipe.write_text(
        "merge_method: seedft\nbase_model: org/base\nmodels:\n  - model: org/lora0\n  - model: org/lora1\n"
    )
    out = tmp_path / "merged"
    result = run_cli("mergekit-seed", "run", recipe, out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert set(provenance(out / "README.md")["hub_inputs"]) == {"org/lora0", "org/lora1"}
    publish_to_cache(cache, "me/adapter", out, "v1")
    result = run_cli("mergekit-seed", "reproduce", "me/adapter", tmp_path / "again", "--check")
    assert result.returncode == 0 and "largest difference: 0" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "direct_url, expected",
    [
        (None, '"mergekit-seed=={version}"'),  # from an index: the version
        (
            {"url": "https://github.com/org/mergekit-seed", "vcs_info": {"vcs": "git", "commit_id": "abc123"}},
            '"mergekit-seed @ git+https://github.com/org/mergekit-seed@abc123"',
        ),  # from git: that commit
        (
            {"url": "file:///nowhere/checkout", "dir_info": {"editable": True}},
            '"mergekit-seed=={version}"  # installed from a local folder: install that source instead',
        ),
    ],
)
def test_install_line_names_where_the_package_came_from(monkeypatch, direct_url, expected):
    from mergekit_seed import installed
    from mergekit_seed.installed import install_command, package_version

    real = installed.distribution

    class Installed:
        def read_text(self, name):
            return json.dumps(direct_url) if name == "direct_url.json" and direct_url else None

    monkeypatch.setattr(installed, "distribution", lambda name: Installed() if name == "mergekit-seed" else real(name))
    assert install_command() == expected.format(version=package_version("mergekit-seed"))


def test_the_publishing_page_flow_with_local_inputs(hub, tiny_family, tmp_path):
    """docs/publishing.md: run from local folders, publish the folder as it is (laid out as a
    download of the uploaded repository), then reproduce by id with --input for each label."""
    import subprocess
    import sys

    cache, _ = hub
    base, seeds = tiny_family
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: seedft\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {s}\n" for s in seeds)
        + "dtype: float32\n"
    )
    merged = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)
    card = (merged / "README.md").read_text()
    for folder in [base, *seeds]:
        assert str(folder) not in card
    rows = [line for line in card.split("### Inputs")[1].split("###")[0].splitlines() if line.startswith("| input")]
    assert rows and all("{" not in row for row in rows)  # proper rows, not dict reprs
    # the documented upload command exists in the pinned huggingface_hub
    hf = Path(sys.executable).parent / "hf"
    assert subprocess.run([str(hf), "upload", "--help"], capture_output=True).returncode == 0
    publish_to_cache(cache, "me/llama-seedft", merged, "v1")

    refused(run_cli("mergekit-seed", "reproduce", "me/llama-seedft", tmp_path / "again"), "--input input0=PATH")
    labels = provenance(merged / "README.md")["inputs"]
    folders = {str(path): path for path in [base, *seeds]}
    given = []
    for label, record in labels.items():
        (match,) = (
            [folder for name, folder in folders.items() if Path(name).name == record["folder"]]
            if isinstance(record, dict) and "folder" in record
            else [None]
        )
        given += ["--input", f"{label}={match}"]
    result = run_cli("mergekit-seed", "reproduce", "me/llama-seedft", tmp_path / "again", *given, "--check", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "largest difference: 0 in" in result.stdout

"""Cards are data (issue 47): ``reproduce`` reads only what ``--input``, ``--recipe`` or a Hub id
names; a card that names a local path where a model, adapter or tokenizer goes is refused."""

import os
import shutil

import pytest
import yaml
from conftest import refused, run_cli, tree_hashes, write_recipe


@pytest.fixture
def card_naming(tiny_family, tmp_path):
    """A real card whose Configuration block is rewritten to name ``folders`` (a function of
    the seeds) instead of its inputN labels."""
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds[:2])
    merged = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)

    def rewrite(replacements: dict):
        text = (merged / "README.md").read_text()
        head, _, rest = text.partition("```yaml\n")
        block, _, tail = rest.partition("```")
        for label, path in replacements.items():
            block = block.replace(f"{label}\n", f"{path}\n")
        (merged / "README.md").write_text(head + "```yaml\n" + block + "```" + tail)
        return merged

    return rewrite, base, seeds, recipe


@pytest.mark.parametrize("flags", [[], ["--no-verify-inputs"]])
def test_a_card_naming_local_folders_is_refused_and_nothing_is_read(card_naming, tmp_path, monkeypatch, flags):
    rewrite, base, seeds, _ = card_naming
    card = rewrite({"input0": base, "input1": seeds[0], "input2": seeds[1]})
    import mergekit_seed.reader as reader

    opened = []
    original = reader.regular_file
    monkeypatch.setattr(
        reader, "regular_file", lambda path, *a, **k: opened.append(str(path)) or original(path, *a, **k)
    )
    result = run_cli("mergekit-seed", "reproduce", card, tmp_path / "again", *flags)
    refused(result, "a card never chooses which local files are read", str(base))
    assert not (tmp_path / "again").exists()
    assert not [path for path in opened if str(base) in path or str(seeds[0]) in path], opened


def test_a_hub_id_that_is_also_a_local_folder_here_is_refused(card_naming, tmp_path, monkeypatch):
    rewrite, base, seeds, _ = card_naming
    monkeypatch.chdir(tmp_path)
    shutil.copytree(seeds[0], tmp_path / "org" / "seed")  # "org/seed" reads as a Hub id, and is a folder here
    card = rewrite({"input1": "org/seed"})
    refused(
        run_cli(
            "mergekit-seed",
            "reproduce",
            card,
            tmp_path / "again",
            "--input",
            f"input0={base}",
            "--input",
            f"input2={seeds[1]}",
        ),
        "'org/seed'",
        "a card never chooses",
    )


def test_the_users_recipe_stands_in_for_a_card_that_names_folders(card_naming, tmp_path):
    """A card written before labels named its folders: with --recipe the user's own folders are
    read, and the merge reproduces."""
    rewrite, base, seeds, recipe = card_naming
    card = rewrite({"input0": "/elsewhere/base", "input1": "/elsewhere/seed0", "input2": "/elsewhere/seed1"})
    result = run_cli(
        "mergekit-seed",
        "reproduce",
        card,
        tmp_path / "again",
        "--recipe",
        recipe,
        "--no-verify-inputs",
        "--check",
        card,
    )
    assert result.returncode == 0, result.stderr
    assert "every tensor matches" in result.stdout


def test_a_card_naming_a_local_tokenizer_source_is_refused(card_naming, tmp_path):
    rewrite, base, seeds, _ = card_naming
    card = rewrite({})
    text = card.joinpath("README.md").read_text() if card.is_dir() else card.read_text()
    head, _, rest = text.partition("```yaml\n")
    block, _, tail = rest.partition("```")
    data = yaml.safe_load(block)
    data["tokenizer_source"] = str(tmp_path)
    (card / "README.md").write_text(head + "```yaml\n" + yaml.safe_dump(data, sort_keys=False) + "```" + tail)
    before = tree_hashes(base)
    refused(
        run_cli(
            "mergekit-seed",
            "reproduce",
            card,
            tmp_path / "again",
            "--input",
            f"input0={base}",
            "--input",
            f"input1={seeds[0]}",
            "--input",
            f"input2={seeds[1]}",
        ),
        "a card never chooses",
        str(tmp_path),
    )
    assert tree_hashes(base) == before and not os.path.exists(tmp_path / "again")


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_reproduce_of_a_special_file_is_one_line(tmp_path, source):
    if source == "fifo":
        source = tmp_path / "card.md"
        os.mkfifo(source)
    refused(run_cli("mergekit-seed", "reproduce", source, tmp_path / "again"), "not a regular file")

"""The four mechanisms of issue 36, attacked by the cases that found them and by generated inputs.

1. The inputs of a command (``recipe.local_inputs``, ``weights.confined_file``): every path a
   merge reads, ``tokenizer_source`` included; model files only from inside their folder.
2. One output protocol (``output.OutputFolder``): its tests are tests/test_output.py.
3. One finiteness gate (``finite``): NaN is never published, compared as equal or reported.
4. Bounded parsing of untrusted text (``untrusted``): no backtracking regex over a card, user
   patterns compiled and matched under a time bound, JSON bounded and checked by type.
Every case here failed before the change that added it.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, refused, run_cli, tree_hashes, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekit_seed.errors import UserError


PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def family(tiny_family, tmp_path):
    base, seeds = tiny_family
    runs = tmp_path / "runs"
    return shutil.copytree(base, runs / "base"), [shutil.copytree(s, runs / s.name) for s in seeds]


def staged(out: Path):
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


# ------------------------------------------------------------------ 1. inputs


def test_out_inside_or_equal_to_tokenizer_source_is_refused(family, tmp_path):
    base, seeds = family
    tokenizer = shutil.copytree(base, tmp_path / "tokenizer")
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    recipe.write_text(recipe.read_text() + f"tokenizer_source: {tokenizer}\n")
    before = tree_hashes(tokenizer)
    for out in (tokenizer, tokenizer / "merged"):
        refused(
            run_cli("mergekit-seed", "run", recipe, out, "--overwrite"),
            "a merge never writes over its inputs",
            str(tokenizer),
        )
    assert tree_hashes(tokenizer) == before


def test_tokenizer_source_paths_are_labelled_in_every_written_file(family, tmp_path):
    base, seeds = family
    tokenizer = shutil.copytree(base, tmp_path / "private-tokenizer")
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    recipe.write_text(recipe.read_text() + f"tokenizer_source: {tokenizer}\n")
    out = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)
    for name in ("README.md", "mergekit_config.yml"):
        assert "private-tokenizer" not in (out / name).read_text(), name


def _shard_elsewhere(folder: Path, target: str) -> None:
    """Turn ``folder`` into a sharded checkpoint whose index names ``target`` for every tensor."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, target)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(family, tmp_path, where):
    base, seeds = family
    tensors = _shard_elsewhere(
        seeds[0], "../outside.safetensors" if where == "parent" else str(tmp_path / "outside.safetensors")
    )
    save_file(tensors, seeds[0].parent / "outside.safetensors")
    save_file(tensors, tmp_path / "outside.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), "leads outside the model folder", out=tmp_path / "out")


@pytest.mark.parametrize("target", ["a file outside", "/dev/zero", "a fifo", "a link to a fifo"])
def test_a_weight_file_linking_out_of_its_folder_is_refused_and_never_hashed(family, tmp_path, target):
    """Issue 47: a FIFO, or a link to /dev/zero or a FIFO, used to get "has no model weights"."""
    base, seeds = family
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(seeds[1] / "model.safetensors", outside)
    weights = seeds[1] / "model.safetensors"
    if target == "a fifo":
        os.mkfifo(weights)
    elif target == "a link to a fifo":
        os.mkfifo(seeds[1] / "pipe")
        weights.symlink_to("pipe")
    else:
        weights.symlink_to(outside if target == "a file outside" else Path("/dev/zero"))
    fragment = "leads outside the model folder" if target in ("a file outside", "/dev/zero") else "not a regular file"
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    started = time.process_time()
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), "model.safetensors", fragment, out=tmp_path / "out")
    # CPU seconds, not wall-clock ones: on a loaded machine the bound still holds
    assert time.process_time() - started < 60  # /dev/zero is never read, a FIFO never blocks


def test_stock_mergekit_yaml_never_blocks_on_a_fifo_weight_file(family, tmp_path):
    base, seeds = family
    (seeds[1] / "model.safetensors").unlink()
    os.mkfifo(seeds[1] / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    done = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode != 0 and "not a regular file" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("model", ["/dev/null", "a file"])
def test_a_model_path_that_is_not_a_folder_is_refused_up_front(family, tmp_path, model):
    base, seeds = family
    if model == "a file":
        model = tmp_path / "weights.safetensors"
        shutil.copy(seeds[0] / "model.safetensors", model)
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, [*seeds[:2], model])
    refused(run_cli("mergekit-seed", "validate", recipe), f"model path {model} is not a folder")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "is not a folder", out=tmp_path / "out")


def test_a_tokenizer_source_that_does_not_exist_is_refused_up_front(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    recipe.write_text(recipe.read_text() + f"tokenizer_source: {tmp_path / 'no-tokenizer'}\n")
    refused(run_cli("mergekit-seed", "validate", recipe), f"tokenizer path {tmp_path / 'no-tokenizer'} does not exist")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "does not exist", out=tmp_path / "out")


def test_a_fifo_in_an_adapter_folder_is_refused(tiny_loras, tmp_path):
    base, loras = tiny_loras
    seeds = [shutil.copytree(lora, tmp_path / lora.name) for lora in loras]
    (seeds[0] / "adapter_model.safetensors").unlink()
    os.mkfifo(seeds[0] / "adapter_model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds, output={"format": "lora"})
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "out"), "not a regular file", out=tmp_path / "out")


@st.composite
def folder_trees(draw):
    """A model folder's entries: (name, kind, target) with kinds file, link in, link out,
    dangling link, folder, fifo; and index entries naming arbitrary paths."""
    names = st.sampled_from(["model.safetensors", "a.safetensors", "b.bin", "sub", "x"])
    entries = draw(
        st.lists(
            st.tuples(names, st.sampled_from(["file", "link-in", "link-out", "dangling", "folder", "fifo"])),
            max_size=5,
            unique_by=lambda e: e[0],
        )
    )
    index = draw(
        st.none()
        | st.lists(
            st.sampled_from(
                [
                    "a.safetensors",
                    "../a.safetensors",
                    "/etc/hostname",
                    "sub/../a.safetensors",
                    "sub",
                    "x",
                    "",
                    ".",
                    "..",
                    "/dev/zero",
                    "a.safetensors/../../x",
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )
    return entries, index


@PROPERTY
@given(tree=folder_trees())
def test_confinement_returns_only_regular_files_inside_the_folder(tree, tmp_path_factory):
    from mergekit_seed.references.weights import full_model_files, hashed_weight_files, weight_files

    root = tmp_path_factory.mktemp("tree")
    folder, outside = root / "model", root / "outside"
    folder.mkdir()
    outside.write_bytes(b"secret")
    entries, index = tree
    for name, kind in entries:
        path = folder / name
        if kind == "file":
            path.write_bytes(b"x")
        elif kind == "link-in":
            (folder / f".{name}.target").write_bytes(b"x")
            path.symlink_to(folder / f".{name}.target")
        elif kind == "link-out":
            path.symlink_to(outside)
        elif kind == "dangling":
            path.symlink_to(root / "nothing")
        elif kind == "folder":
            path.mkdir()
        else:
            os.mkfifo(path)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {f"t{i}": p for i, p in enumerate(index)}})
        )
    resolved_folder = folder.resolve()
    for listing in (full_model_files, hashed_weight_files, weight_files):
        try:
            found = listing(folder)
        except UserError as error:
            assert "\n" not in str(error)
            continue
        for path in found:
            target = path.resolve()
            assert target.is_relative_to(resolved_folder), (listing.__name__, path)
            assert not target.exists() or target.is_file(), (listing.__name__, path)


# ------------------------------------------------------------------ 3. the finiteness gate


def _with_nan(folder: Path, pattern: str = "k_proj", whole: bool = False) -> None:
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if pattern in n)
    if whole:
        tensors[name].fill_(float("nan"))
    else:
        tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_check_against_a_reference_holding_nan_is_a_difference(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    merged = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)
    reference = shutil.copytree(merged, tmp_path / "reference")
    _with_nan(reference)
    result = run_cli(
        "mergekit-seed", "reproduce", merged, tmp_path / "again", "--recipe", recipe, "--check", reference
    )
    refused(result, "NaN or Inf")
    assert "every tensor matches" not in result.stdout


def test_compare_refuses_a_model_that_outputs_nan(family, tmp_path):
    base, seeds = family
    broken = shutil.copytree(seeds[0], tmp_path / "broken")
    _with_nan(broken, "embed_tokens", whole=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("abc", "bca", "cab")))
    out = tmp_path / "report"
    refused(run_cli("mergekit-seed", "compare", seeds[1], broken, "--data", data, "--out", out), str(broken), "NaN")
    assert not out.exists()


def test_report_json_never_holds_nan():
    from mergekit_seed.finite import report_json

    with pytest.raises(UserError, match=r"versus\.b\.mean is nan"):
        report_json({"versus": {"a": {"mean": 1.0}, "b": {"mean": float("nan")}}}, "compare.json")


@pytest.mark.parametrize("command", ["analyze", "mergekit-yaml"])
def test_a_nan_seed_is_one_line_everywhere(family, tmp_path, command):
    base, seeds = family
    _with_nan(seeds[1])
    if command == "analyze":
        result = run_cli("mergekit-seed", "analyze", seeds[0], seeds[1], "--base", base, "--out", tmp_path / "a")
    else:
        recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
        result = run_cli("mergekit-yaml", recipe, tmp_path / "out")
    refused(result, "contains NaN or Inf", str(seeds[1].name))


# ------------------------------------------------------------------ 4. bounded parsing


@pytest.fixture(scope="module")
def card_text(tiny_family, tmp_path_factory):
    base, seeds = tiny_family
    root = tmp_path_factory.mktemp("card")
    recipe = write_recipe(root / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, root / "merged", "--quiet", check=True)
    return (root / "merged" / "README.md").read_text()


@PROPERTY
@given(
    junk=st.text(alphabet="-`#\n yaml:Configuration{}[]*\\", max_size=2000),
    repeat=st.integers(1, 500),
    where=st.sampled_from(["front", "middle", "end"]),
)
def test_reading_any_card_text_up_to_a_megabyte_is_fast(card_text, tmp_path_factory, junk, repeat, where):
    from mergekit_seed.card import read_card

    text = {
        "front": junk * repeat + card_text,
        "middle": card_text.replace("### Configuration", junk * repeat + "### Configuration"),
        "end": card_text + junk * repeat,
    }[where][: 1 << 20]
    path = tmp_path_factory.mktemp("c") / "README.md"
    path.write_text(text)
    started = time.process_time()
    try:
        read_card(path)
    except UserError as error:
        assert "\n" not in str(error)
    assert time.process_time() - started < 2.0


def test_a_700_kb_card_that_hung_reproduce_is_read_at_once(tmp_path):
    from mergekit_seed.card import read_card

    path = tmp_path / "README.md"
    path.write_text(
        "---\n" + "### Configuration " * 40_000 + "\n```yam" * 2000
    )  # the old regex scanned this for minutes
    started = time.process_time()
    with pytest.raises(UserError, match="no '### Configuration' YAML block"):
        read_card(path)
    assert time.process_time() - started < 1.0


def test_the_line_scanner_finds_what_the_card_writer_writes(card_text):
    from mergekit_seed.untrusted import fenced_block, front_matter

    assert yaml.safe_load(front_matter(card_text))["mergekit_seed"]["merge_method"] == "seedlora_dm"
    assert yaml.safe_load(fenced_block(card_text, "### Configuration", "yaml"))["merge_method"] == "seedlora_dm"


@pytest.mark.parametrize(
    "pattern, fragment",
    [("[", "is not a valid regular expression"), ("((a+)+)+[", "is not a valid regular expression")],
)
def test_a_rank_pattern_that_is_not_a_regex_is_one_line(tiny_loras, tmp_path, pattern, fragment):
    base, loras = tiny_loras
    seeds = [shutil.copytree(lora, tmp_path / lora.name) for lora in loras]
    config = json.loads((seeds[0] / "adapter_config.json").read_text())
    config["rank_pattern"] = {pattern: 4}
    (seeds[0] / "adapter_config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", None, seeds, output={"format": "lora"})
    refused(run_cli("mergekit-seed", "validate", recipe), "rank_pattern", fragment)


def test_user_patterns_match_as_peft_matches_them_and_in_bounded_time():
    import re

    from mergekit_seed.untrusted import PATTERN_SECONDS, pattern_key

    modules = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "lm_head", "q_proj"]
    patterns = [
        "q_proj",
        r"layers\.1\d\.mlp\.down_proj",
        "layers.0.self_attn.q_proj",
        "head",
        "lm_head",
        r".*\.mlp\..*",
    ]
    for module in modules:
        peft = next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)  # PEFT's get_pattern_key
        assert pattern_key(patterns, module, "adapter_config.json") == peft
    started = time.process_time()
    try:  # exponential under Python's re (seconds at 26 characters); bounded here
        pattern_key(
            [r"([a-z_.0-9]+)+Z", r"(x+x+)+y"],
            "base_model.model.model.layers.0.self_attn.q_proj" + "x" * 40,
            "adapter_config.json",
        )
    except UserError as error:
        assert "backtracks" in str(error)
    assert time.process_time() - started < 2 * PATTERN_SECONDS + 1


@pytest.mark.parametrize(
    "damage, fragment", [("deep", "nested too deeply"), ("architectures", "architectures must be a list")]
)
def test_a_hostile_config_json_is_one_line(family, tmp_path, damage, fragment):
    base, seeds = family
    config = seeds[1] / "config.json"
    if damage == "deep":
        config.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": 1}))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    refused(run_cli("mergekit-seed", "validate", recipe), fragment)


@pytest.mark.parametrize("damage", ["pickled code", "truncated"])
def test_a_bin_checkpoint_mergekit_would_fail_on_is_one_line_naming_it(family, tmp_path, damage):
    import pickle

    base, seeds = family
    tensors = load_file(seeds[1] / "model.safetensors")
    (seeds[1] / "model.safetensors").unlink()
    weights = seeds[1] / "pytorch_model.bin"
    if damage == "pickled code":

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'ran'}",))

        weights.write_bytes(pickle.dumps({"x": Payload()}))
    else:
        torch.save(tensors, weights)
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), str(weights), out=tmp_path / "out")
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------ 5. provenance without secrets


def test_no_written_file_carries_a_git_credential(family, tmp_path, monkeypatch):
    from mergekit_seed import installed

    token = "ghp_PLANTEDTOKEN0123456789"
    real = installed.distribution

    class Installed:
        def read_text(self, name):
            if name == "direct_url.json":
                return json.dumps(
                    {
                        "url": f"https://user:{token}@example.com/org/mergekit-seed.git?access_token={token}",
                        "vcs_info": {"vcs": "git", "commit_id": "0123abcd"},
                    }
                )
            return real("mergekit-seed").read_text(name)

    monkeypatch.setattr(installed, "distribution", lambda name: Installed() if name == "mergekit-seed" else real(name))
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)
    card = (out / "README.md").read_text()
    assert "git+https://example.com/org/mergekit-seed.git@0123abcd" in card
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "remote, public",
    [
        ("https://user:tok@host/org/x.git?t=1#frag", "https://host/org/x.git"),
        ("https://tok@host:8443/org/x", "https://host:8443/org/x"),
        ("git@host:org/x.git", "ssh://git@host/org/x.git"),
        ("ssh://u:pw@host/x", "ssh://host/x"),
    ],
)
def test_public_urls_drop_credentials_and_queries(remote, public):
    from mergekit_seed.installed import public_url

    assert public_url(remote) == public


# ------------------------------------------------------------------ misleading lines


def test_lambda_past_float32_gets_the_range_message_not_the_word_auto(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds, parameters={"lambda": "1.0e+39"})
    result = run_cli("mergekit-seed", "validate", recipe)
    refused(result, "parameter 'lambda' = 1e+39", "less than or equal to")
    assert "'auto'" not in result.stderr


def test_an_out_of_range_density_of_mergekits_ties_is_a_warning(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "ties", base, seeds, parameters={"density": -0.5, "weight": 1.0})
    result = run_cli("mergekit-seed", "validate", recipe, check=True)
    assert "parameter 'density' = -0.5 is outside [0, 1]" in result.stderr


def test_a_header_that_lies_about_a_dtype_of_the_same_width_is_refused(family, tmp_path):
    base, seeds = family
    path = seeds[1] / "model.safetensors"
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + header_length])
    name = next(n for n in header if "q_proj" in n)
    header[name]["dtype"] = "I32"  # float32 bytes declared int32: the sizes agree
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_length)
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_length :]))
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    for command in (("validate", recipe), ("run", recipe, tmp_path / "out")):
        refused(run_cli("mergekit-seed", *command), name, "wrong dtype", out=tmp_path / "out")


def test_stock_mergekit_yaml_never_follows_an_index_out_of_a_model_folder(family, tmp_path):
    base, seeds = family
    tensors = _shard_elsewhere(seeds[0], "../outside.safetensors")
    save_file(tensors, seeds[0].parent / "outside.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    refused(run_cli("mergekit-yaml", recipe, tmp_path / "out"), "leads outside the model folder", out=tmp_path / "out")


@PROPERTY
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]),
    specials=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38, 0.0])),
        max_size=3,
    ),
)
def test_the_gate_agrees_with_isfinite_on_every_tensor(shape, dtype, specials):
    from mergekit_seed.finite import is_finite_tensor

    tensor = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-5, 5, shape, dtype=dtype)
    if dtype.is_floating_point and tensor.numel():
        for index, value in specials:
            tensor.view(-1)[index % tensor.numel()] = value
    assert is_finite_tensor(tensor) == bool(tensor.isfinite().all())


def test_float32_max_is_torchs():
    from mergekit_seed.finite import FLOAT32_MAX

    assert FLOAT32_MAX == torch.finfo(torch.float32).max


# ------------------------------------------------------------------ issue 47: tracebacks that became one line


def test_a_nul_byte_in_out_is_one_line(family, tmp_path):
    from mergekit_seed import merge

    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    with pytest.raises(UserError, match="cannot resolve the path"):
        merge(recipe, str(tmp_path / "out\0x"), quiet=True)


@pytest.mark.parametrize("option, value", [("--confidence", "nan"), ("--confidence", "inf")])
def test_a_non_finite_float_option_is_refused_by_click(family, tmp_path, option, value):
    base, seeds = family
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    result = run_cli("mergekit-seed", "compare", *seeds[:2], "--data", data, "--out", tmp_path / "out", option, value)
    assert (
        result.returncode == 2
        and "Invalid value for '--confidence'" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_reproduce_refuses_a_nan_tolerance(tmp_path):
    result = run_cli("mergekit-seed", "reproduce", tmp_path / "card.md", tmp_path / "out", "--check", "--atol", "nan")
    assert result.returncode == 2 and "not a finite number" in result.stderr


def test_an_out_shard_size_below_one_is_one_line(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    refused(
        run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--out-shard-size", "0"),
        "--out-shard-size 0: must be at least 1",
        out=tmp_path / "out",
    )
    negative = run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--out-shard-size", "-1")
    assert negative.returncode == 2 and "Invalid value for '--out-shard-size': '-1' is not a size" in negative.stderr


def test_analyze_of_seeds_of_another_width_is_one_line(family, tmp_path):
    from tiny import TINY_LLAMA

    base, seeds = family
    other = tmp_path / "wider"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "intermediate_size": 64})).save_pretrained(
        other, safe_serialization=True
    )
    refused(
        run_cli("mergekit-seed", "analyze", seeds[0], other, "--base", base, "--out", tmp_path / "an"),
        "analyze compares seeds of one base",
    )


@pytest.mark.parametrize("folder", ["/data/run #2", "/data/a\nmerge_method: linear", "/data/*star: [x"])
def test_recipes_show_writes_a_folder_as_yaml_reads_it_back(folder):
    shown = run_cli("mergekit-seed", "recipes", "show", "demo-full-seedft", "--models", folder, check=True).stdout
    recipe = yaml.safe_load(shown)
    assert recipe["merge_method"] == "seedft" and recipe["base_model"] == f"{folder}/base"
    assert [entry["model"] for entry in recipe["models"]] == [f"{folder}/full/seed{i}" for i in range(3)]


@pytest.mark.parametrize(
    "remote, published",
    [
        ("~/src/mergekit-seed", False),
        ("/home/me/src/mergekit-seed", False),
        ("../upstream", False),
        ("file:///srv/x", False),
        ("https://github.com/org/mergekit-seed", True),
        ("git@github.com:org/mergekit-seed.git", True),
    ],
)
def test_the_install_line_names_only_a_remote_another_machine_reaches(remote, published):
    from mergekit_seed.installed import _is_remote

    assert _is_remote(remote) == published

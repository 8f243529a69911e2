"""The one reader (``mergekit_seed.reader``): inside its folder, a regular file, a bounded read.
No FIFO ever blocks it, no device is read to the end, no link leads it out of a folder."""

import os
import threading

import pytest

from mergekit_seed.errors import UserError
from mergekit_seed.reader import (
    read_json,
    read_lines,
    read_text,
    read_yaml,
    regular_file,
    safetensors_file,
    sha256,
)


def _returns_quickly(function, seconds: float = 10.0):
    """Run ``function`` in a thread; fail (instead of hanging the suite) when it blocks."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize(
    "reader",
    [
        lambda path: read_text(path, "recipe"),
        lambda path: read_json(path, "config"),
        lambda path: read_lines(path, "JSONL data file"),
        lambda path: read_yaml(path, "grid"),
        lambda path: sha256(path),
    ],
)
def test_a_fifo_is_refused_without_blocking(tmp_path, reader):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        _returns_quickly(lambda: reader(fifo))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_refused(device):
    with pytest.raises(UserError, match="not a regular file"):
        read_text(device, "recipe")


def test_a_sparse_file_past_the_bound_is_refused_before_it_is_read(tmp_path):
    sparse = tmp_path / "huge.jsonl"
    with open(sparse, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB of holes: reading it would take seconds and a GiB of memory
    with pytest.raises(UserError, match="too large for a recipe"):
        _returns_quickly(lambda: read_text(sparse, "recipe", 1 << 20))


def test_a_file_that_lies_about_its_size_is_still_bounded():
    """/proc files report size 0 and hold more: the bound is on what is read, too."""
    with pytest.raises(UserError, match="too large"):
        read_text("/proc/self/maps" if os.path.exists("/proc/self/maps") else __file__, "text", 16)


@pytest.mark.parametrize("target", ["outside", "absolute"])
def test_a_link_out_of_its_folder_is_refused(tmp_path, target):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (folder / "config.json").symlink_to(secret if target == "absolute" else "../secret.json")
    with pytest.raises(UserError, match="leads outside"):
        read_json(folder / "config.json", "model config", within=folder)
    assert read_json(secret, "model config") == {}  # named directly, the same file is the user's choice


def test_a_link_inside_its_folder_is_read(tmp_path):
    folder = tmp_path / "snapshot"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc").write_text('{"a": 1}')
    (folder / "config.json").symlink_to("blobs/abc")
    assert read_json(folder / "config.json", "model config", within=folder) == {"a": 1}


def test_missing_files_and_folders_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_text(tmp_path / "absent.yml", "recipe")
    with pytest.raises(UserError, match="not a regular file"):
        read_text(tmp_path, "recipe")
    assert regular_file(tmp_path / "absent", missing_ok=True) == tmp_path / "absent"


def test_a_nul_byte_in_a_path_is_one_line():
    with pytest.raises(UserError):
        read_text("recipe\0.yml", "recipe")


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="corrupt or truncated safetensors"):
        with safetensors_file(broken) as reader:
            list(reader.keys())


def test_text_that_is_not_utf8_names_what_it_should_be(tmp_path):
    latin = tmp_path / "r.yml"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text; a recipe is UTF-8 text"):
        read_text(latin, "recipe")

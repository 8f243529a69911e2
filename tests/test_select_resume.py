"""An interrupted ``select`` resumes (issue 50): every finished scoring is kept in ``.OUT.resume``
beside OUT until OUT is published, the same command run again after Ctrl-C or a SIGKILL scores
only what is left, says how much it read back, and ends with the record of an uninterrupted
run; a changed seed, split or grid point invalidates exactly the work that depends on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, run_cli, select_planted
from safetensors.torch import load_file, save_file

from mergekit_seed.errors import UserError
from mergekit_seed.output import OutputFolder, ResumeJournal
from mergekit_seed.references.weights import weight_file_hashes
from mergekit_seed.tools import selection
from mergekit_seed.tools.selection import sweep


METHODS = ["seedft", "lore", "linear"]  # six candidates with the default grid


def _select(planted, out: Path, lines=None, **settings):
    echo = lines.append if lines is not None else None
    return select_planted(
        planted, out, methods=METHODS, metric="prefix_match", echo=echo, warn=lambda _message: None, **settings
    )


def _scorings(monkeypatch) -> list:
    calls = []
    original = sweep.score_model

    def counted(model, rows, *args, **kwargs):
        calls.append(str(model))
        return original(model, rows, *args, **kwargs)

    monkeypatch.setattr(sweep, "score_model", counted)
    return calls


def _interrupted_after(monkeypatch, merges: int) -> None:
    """Ctrl-C as the sweep starts merging candidate ``merges + 1``."""
    done = []
    original = sweep.merge

    def interrupting(*args, **kwargs):
        if len(done) == merges:
            raise KeyboardInterrupt
        done.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, "merge", interrupting)


def _entries(out: Path) -> list:
    return sorted((out.parent / f".{out.name}.resume").glob("*.json"))


def test_an_interrupted_sweep_resumes_and_ends_with_the_uninterrupted_record(planted, tmp_path, monkeypatch):
    seeds = planted[3]
    whole = _select(planted, tmp_path / "whole")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupted_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _select(planted, out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert len(_entries(out)) == 1 + len(seeds) + 2  # the marker, the seeds and two candidates on validation
    calls = _scorings(monkeypatch)
    lines = []
    resumed = _select(planted, out, lines)
    assert len(calls) == len(whole["candidates"]) - 2 + 2  # the other candidates on validation, then two on test
    assert f"resumed: {len(seeds) + 2} scorings" in " ".join(lines)
    assert resumed == whole
    assert (out / "select.json").read_text() == (tmp_path / "whole" / "select.json").read_text()
    assert weight_file_hashes(out) == weight_file_hashes(tmp_path / "whole")
    assert not (tmp_path / ".out.resume").exists()  # published: the journal is gone


def test_a_changed_grid_point_or_seed_invalidates_exactly_its_own_work(planted, tmp_path, monkeypatch):
    seeds = [Path(shutil.copytree(seed, tmp_path / seed.name)) for seed in planted[3]]
    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # everything scored, then interrupted before the record
        patch.setattr(selection, "selection_record", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            _select(planted, out, seeds=seeds)
    grid = tmp_path / "grid.yml"
    grid.write_text("seedft:\n  lambda: [auto, 1.0]\nlore:\n  mu_relative: [0.05, 0.1, 0.3]\n")  # 0.2 -> 0.3
    with monkeypatch.context() as patch:
        calls = _scorings(patch)
        patch.setattr(selection, "selection_record", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            _select(planted, out, seeds=seeds, grid=grid)
    assert len(calls) == 1  # the new grid point; the rest (and the two test scorings) read back
    weights = load_file(seeds[2] / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, seeds[2] / "model.safetensors", metadata={"format": "pt"})
    calls = _scorings(monkeypatch)
    lines = []
    record = _select(planted, out, lines, seeds=seeds, grid=grid)
    # seed2 and every candidate (each merges seed2) again, and the winner on test; the other seeds on
    # validation and the chosen seed on test (not seed2) read back
    assert record["on_test"]["best_seed"] != str(seeds[2])
    assert len(calls) == 1 + len(record["candidates"]) + 1, calls
    assert "resumed: 3 scorings" in " ".join(lines)


def test_a_select_killed_with_sigkill_resumes_from_the_command_line(planted, tmp_path):
    _, base, _, seeds, validation, test = planted
    grid = tmp_path / "grid.yml"  # enough candidates that the kill lands in the sweep
    grid.write_text("lore:\n  mu_relative: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]\n")
    command = [
        *map(str, seeds),
        "--base", str(base), "--validation", str(validation), "--test", str(test), "--methods", "lore,linear",
        "--grid", str(grid), "--metric", "prefix_match", "--resamples", "200", "--quiet",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    process = subprocess.Popen(
        [str(BIN / "mergekit-seed"), "select", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    waited = 0
    while len(_entries(tmp_path / "out")) < 1 + len(seeds) + 1 and process.poll() is None and waited < 6000:
        time.sleep(0.05)
        waited += 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep ended before the kill"
    kept = len(_entries(tmp_path / "out")) - 1
    result = run_cli("mergekit-seed", "select", *command)
    assert result.returncode == 0, result.stderr
    assert f"resumed: {kept} scorings" in result.stdout
    assert "the staging folder of a run that was killed" in result.stderr
    whole = run_cli("mergekit-seed", "select", *command[:-1], str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert (tmp_path / "out" / "select.json").read_text() == (tmp_path / "whole" / "select.json").read_text()
    assert not list(tmp_path.glob(".out.*"))


def test_the_journal_is_ours_or_refused_and_keeps_whole_entries(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, command="select") as output:
        journal = output.resume_journal()
        journal.put("a" * 64, {"score": 0.5, "values": [0.5]})
    partial = journal.path / f".{'b' * 64}.json.0123abcd.tmp"  # an entry a killed run was writing
    partial.write_text('{"score": 0.')
    with OutputFolder(out, command="select") as output:
        journal = output.resume_journal()
        assert journal.get("a" * 64) == {"score": 0.5, "values": [0.5]} and journal.get("b" * 64) is None
        assert not partial.exists() and journal.reused == 1
    (journal.path / "notes.txt").write_text("mine")
    with OutputFolder(out, command="select") as output, pytest.raises(UserError, match="notes.txt"):
        output.resume_journal()
    assert (journal.path / "notes.txt").read_text() == "mine"  # never deleted
    (journal.path / "notes.txt").unlink()
    with pytest.raises(UserError, match="no compare marker"):  # another command's journal
        ResumeJournal(out, "compare").open()
    shutil.rmtree(journal.path)
    journal.path.symlink_to(tmp_path)
    with OutputFolder(out, command="select") as output, pytest.raises(UserError, match="a link or a file"):
        output.resume_journal()

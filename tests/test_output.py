"""The one writer (``mergekit_seed.output``), as issue 47 rebuilt it: which output replaces
which, a lock that is never written through a link, unpredictable staging names, signals in
every command, a killed run's leftovers cleaned by the next one, and an ``--overwrite`` swap
that leaves OUT present at every instant. Every case here failed before that change."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import refused, run_cli, tree_hashes, write_recipe

from mergekit_seed.errors import UserError
from mergekit_seed.output import MANIFEST_NAME, OutputFolder, copy_file, staged_path, write_text


def leftovers(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def publish(out: Path, content: bytes = b"old", **options) -> None:
    with OutputFolder(out, **options) as output:
        (output.staging / "model.safetensors").write_bytes(content)
        output.publish()


@pytest.fixture
def family(tiny_family, tmp_path):
    import shutil

    base, seeds = tiny_family
    runs = tmp_path / "runs"
    return shutil.copytree(base, runs / "base"), [shutil.copytree(s, runs / s.name) for s in seeds]


@pytest.fixture
def merged(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "made"
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)
    return out


# ------------------------------------------------------------------ which output replaces which


@pytest.mark.parametrize("command", ["compare", "analyze"])
def test_a_report_never_replaces_a_merge(family, merged, tmp_path, command):
    base, seeds = family
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "abc def"}) + "\n")
    before = tree_hashes(merged)
    arguments = ["--data", data] if command == "compare" else ["--base", base]
    refused(
        run_cli("mergekit-seed", command, seeds[0], seeds[1], *arguments, "--out", merged, "--quiet"),
        "holds a merge written by `mergekit-seed run`",
        f"a `mergekit-seed {command}` report never replaces",
    )
    assert tree_hashes(merged) == before


def test_a_report_replaces_only_its_own_command(family, tmp_path):
    base, seeds = family
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "abc def"}) + "\n")
    out = tmp_path / "report"
    run_cli("mergekit-seed", "analyze", seeds[0], seeds[1], "--base", base, "--out", out, "--quiet", check=True)
    run_cli(
        "mergekit-seed", "analyze", seeds[0], seeds[2], "--base", base, "--out", out, "--quiet", check=True
    )  # its own: replaced
    before = tree_hashes(out)
    refused(
        run_cli("mergekit-seed", "compare", seeds[0], seeds[1], "--data", data, "--out", out, "--quiet"),
        "holds a `mergekit-seed analyze` report, which a `mergekit-seed compare` report never replaces",
    )
    assert tree_hashes(out) == before


def test_overwrite_of_a_merge_never_replaces_a_report(family, tmp_path):
    base, seeds = family
    out = tmp_path / "report"
    run_cli("mergekit-seed", "analyze", seeds[0], seeds[1], "--base", base, "--out", out, "--quiet", check=True)
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    before = tree_hashes(out)
    refused(
        run_cli("mergekit-seed", "run", recipe, out, "--overwrite"),
        "holds a `mergekit-seed analyze` report, which a merge never replaces",
    )
    assert tree_hashes(out) == before


def test_the_manifest_says_which_command_wrote_it(merged):
    manifest = json.loads((merged / MANIFEST_NAME).read_text())
    assert manifest["command"] == "run" and manifest["kind"] == "merge" and "model.safetensors" in manifest["files"]


def test_a_manifest_of_an_older_version_is_read_by_what_it_lists(tmp_path):
    """Manifests written before commands were recorded: a report by the file only it writes."""
    out = tmp_path / "old-report"
    out.mkdir()
    (out / "analysis.json").write_text("{}")
    (out / MANIFEST_NAME).write_text(json.dumps({"mergekit_seed": "0.1.0", "files": ["analysis.json"]}))
    with pytest.raises(UserError, match="holds a `mergekit-seed analyze` report"):
        with OutputFolder(out, command="compare", report=True):
            pass
    with OutputFolder(out, command="analyze", report=True) as output:
        output.publish()


# ------------------------------------------------------------------ the lock


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_the_lock_is_never_written_through_a_link(tmp_path, link):
    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    if link == "symbolic":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    with pytest.raises(UserError, match="never written through"):
        with OutputFolder(out):
            pass
    assert victim.read_text() == "mine" and not out.exists()


def test_staging_names_are_unpredictable_and_a_user_folder_of_the_old_name_is_kept(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.partial-{os.getpid()}"  # the name older versions used, and deleted
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    names = set()
    for _ in range(3):
        with OutputFolder(out, overwrite=True) as output:
            names.add(output.staging.name)
            assert (
                output.staging.name.startswith(".out.partial-") and len(output.staging.name) > len(".out.partial-") + 8
            )
    assert len(names) == 3 and (mine / "thesis.tex").read_text() == "mine"


def test_writes_outside_an_open_staging_folder_are_a_bug(tmp_path):
    with pytest.raises(RuntimeError, match="not inside an open output folder's staging"):
        write_text(tmp_path / "x.txt", "no")
    with OutputFolder(tmp_path / "out") as output:
        write_text(output.staging / "a" / "b.txt", "yes")
        assert staged_path(output.staging / "a") == output.staging / "a"
        with pytest.raises(RuntimeError):
            copy_file(output.staging / "a" / "b.txt", tmp_path / "elsewhere.txt")
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "elsewhere.txt").exists()


# ------------------------------------------------------------------ signals and killed runs


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from mergekit_seed import output

    out, step, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "renames":
        output.exchange = lambda a, b: False  # a file system that cannot swap in one step
    def stop(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    output._step = stop
    with output.OutputFolder(out, overwrite=True, command="run") as folder:
        (folder.staging / "model.safetensors").write_bytes(b"new")
        if step == "wait":
            print("staged", flush=True)
            time.sleep(60)
        folder.publish()
    """
)


def _child(out: Path, step: str, mode: str = "exchange") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(out), step, mode], capture_output=True, text=True, timeout=120
    )


def _content(out: Path) -> bytes:
    assert (out / MANIFEST_NAME).is_file(), sorted(p.name for p in out.iterdir())
    return (out / "model.safetensors").read_bytes()


SWAP_STEPS = {
    "exchange": ["journal", "staged", "manifest", "exchanged", "cleaned"],
    "renames": ["journal", "staged", "manifest", "moved-aside", "renamed", "cleaned"],
}


@pytest.mark.parametrize("mode, step", [(mode, step) for mode, steps in SWAP_STEPS.items() for step in steps])
def test_a_run_killed_at_any_step_of_an_overwrite_is_recovered_by_the_next(tmp_path, mode, step):
    """SIGKILL at each step of ``--overwrite``: with the one-step swap OUT is whole (old or new)
    at every step; with two renames it may be missing between them. Either way the next run
    into OUT restores it, removes what the killed run left, and says so in one line."""
    out = tmp_path / "out"
    publish(out)
    killed = _child(out, step, mode)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if mode == "exchange" or step != "moved-aside":
        assert _content(out) in (b"old", b"new")
    notices = []
    with OutputFolder(out, overwrite=True, warn=notices.append):
        pass
    assert _content(out) == (b"new" if step in ("exchanged", "renamed", "cleaned") else b"old")
    assert leftovers(out) == [], leftovers(out)
    if step not in ("journal", "cleaned"):  # killed before its staging folder existed, or after it was gone
        assert len(notices) >= 1 and all("\n" not in notice for notice in notices), notices


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_out_is_held_removes_the_staging_folder_and_the_lock(tmp_path, signum):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), "wait", "exchange"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "staged"
    child.send_signal(signum)
    child.wait(timeout=60)
    assert child.returncode != 0 and leftovers(out) == [] and not out.exists()


def test_a_sigkilled_run_leaves_leftovers_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), "wait", "exchange"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "staged"
    child.kill()
    child.wait(timeout=60)
    assert any(".partial-" in name for name in leftovers(out))
    notices = []
    publish(out, b"fresh", warn=notices.append)
    assert _content(out) == b"fresh" and leftovers(out) == []
    assert any("the staging folder of a run that was killed" in notice for notice in notices), notices


def test_an_older_versions_leftovers_are_removed_by_their_journal(tmp_path):
    """Older versions wrote ``COMMAND, pid PID, since T`` into the lock and staged in
    ``.OUT.partial-PID``: a lock of theirs names exactly what to remove."""
    out = tmp_path / "out"
    (tmp_path / ".out.partial-4242").mkdir()
    (tmp_path / ".out.partial-4242" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text("mergekit-seed run, pid 4242, since 12:00:00")
    kept = tmp_path / ".out.partial-777"  # no journal names it: not ours to remove
    kept.mkdir()
    publish(out, b"new", warn=lambda _line: None)
    assert not (tmp_path / ".out.partial-4242").exists() and kept.is_dir()


STOPPED_COMMAND = textwrap.dedent(
    """
    import sys, time
    import importlib
    module_name, function, *arguments = sys.argv[1:]
    module = importlib.import_module(module_name)
    def stopped(*args, **kwargs):
        print("ready", flush=True)
        time.sleep(60)
    setattr(module, function, stopped)
    from mergekit_seed.cli import main
    main(arguments)
    """
)


@pytest.mark.parametrize("command", ["run", "compare", "select"])
def test_sigterm_in_every_command_leaves_nothing(family, tmp_path, command):
    """SIGTERM during run's validation, compare's scoring or select's sweep (each held there
    while the signal comes): no lock, no staging folder, no traceback."""
    base, seeds = family
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{w}=", "answer": w[::-1]}) + "\n" for w in ("abc", "xyz", "pqr", "mno"))
    )
    test_data = tmp_path / "test.jsonl"
    test_data.write_text("".join(json.dumps({"prompt": f"{w}:", "answer": w}) + "\n" for w in ("abc", "xyz")))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    held, arguments = {
        "run": (("mergekit_seed.runner", "validate"), ["run", recipe, out]),
        "compare": (
            ("mergekit_seed.tools.compare", "compare_into"),
            ["compare", *seeds, "--data", data, "--out", out],
        ),
        "select": (
            ("mergekit_seed.tools.selection", "sweep_validation"),
            [
                "select",
                *seeds,
                "--base",
                base,
                "--validation",
                data,
                "--test",
                test_data,
                "--methods",
                "linear",
                "--out",
                out,
            ],
        ),
    }[command]
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED_COMMAND, *held, *map(str, arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert child.stdout.readline().strip() == "ready"
    assert any(".partial-" in name for name in leftovers(out))
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert leftovers(out) == [] and not out.exists()

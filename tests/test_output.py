"""The one writer (``mergekit_seed.output``): every test of the output protocol lives here.

Issue 47 rebuilt it: which output replaces which, a lock that is never written through a link,
unpredictable staging names, signals in every command, a killed run's leftovers cleaned by the
next one, and an ``--overwrite`` swap that leaves OUT present at every instant. Issue 36's cases
(a lock, staging, an atomic publish, never deleting a file we did not write) follow. Every case
here failed before the change that added it."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import BIN, lora_copies, no_staging_left, refused, run_cli, tree_hashes, write_recipe, write_splits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_seed.errors import UserError
from mergekit_seed.output import MANIFEST_NAME, OutputFolder, copy_file, staged_path, write_text
from mergekit_seed.references.weights import load_weights


PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def leftovers(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def leftovers_staged(out: Path):
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def publish(out: Path, content: bytes = b"old", **options) -> None:
    with OutputFolder(out, **options) as output:
        (output.staging / "model.safetensors").write_bytes(content)
        output.publish()


@pytest.fixture
def family(tiny_family, tmp_path):
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


def _as_in_a_terminal() -> None:
    """The child's signals at their defaults, as a terminal's foreground job has them: a test
    suite started as a shell's background job passes SIGINT on ignored, and a program whose
    Ctrl-C is ignored keeps ignoring it (the output protocol respects that)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_out_is_held_removes_the_staging_folder_and_the_lock(tmp_path, signum):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), "wait", "exchange"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_as_in_a_terminal,
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
    data, test_data = write_splits(tmp_path / "data")
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


# ------------------------------------------------------------------ the protocol (issue 36)


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    with OutputFolder(out) as first:
        refused(
            run_cli("mergekit-seed", "run", recipe, out, "--overwrite"),
            "another run is writing this output folder",
            "pid",
        )
        assert list(first.staging.iterdir()) == []
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)  # the lock is released
    assert not (tmp_path / ".out.lock").exists()


def test_a_file_put_into_out_during_the_merge_is_kept(family, tmp_path, monkeypatch):
    from mergekit_seed import merge, runner

    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    out.mkdir()
    checked = runner.check_finite_output

    def meanwhile(folder):  # the user drops a file into the empty OUT while the merge runs
        (out / "notes.txt").write_text("mine")
        checked(folder)

    monkeypatch.setattr(runner, "check_finite_output", meanwhile)
    with pytest.raises(UserError, match="notes.txt appeared in the output folder during the run") as raised:
        merge(recipe, out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (kept,) = leftovers_staged(out)
    assert (
        str(kept) in str(raised.value) and (kept / "model.safetensors").is_file() and (kept / MANIFEST_NAME).is_file()
    )


def test_overwrite_keeps_what_the_user_added_to_an_earlier_merge(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    out = tmp_path / "out"
    run_cli("mergekit-seed", "run", recipe, out, "--quiet", check=True)
    (out / "notes.txt").write_text("mine")
    (out / "evals").mkdir()
    (out / "evals" / "score.json").write_text("{}")
    before = tree_hashes(out)
    refused(run_cli("mergekit-seed", "run", recipe, out, "--overwrite"), "notes.txt", "was not written by it")
    assert tree_hashes(out) == before and not leftovers_staged(out)
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "evals")
    run_cli("mergekit-seed", "run", recipe, out, "--overwrite", "--quiet", check=True)  # ours alone: replaced


def test_an_earlier_output_copied_into_an_empty_out_during_the_run_is_never_replaced(tmp_path):
    """Without --overwrite nothing in OUT is replaced, even files under a manifest of ours that
    appeared while the run was going."""
    out = tmp_path / "out"
    earlier = tmp_path / "earlier"
    publish_earlier(earlier)
    with pytest.raises(UserError, match="appeared in the output folder during the run"):
        with OutputFolder(out) as output:
            (output.staging / "model.safetensors").write_bytes(b"new")
            shutil.copytree(earlier, out, dirs_exist_ok=True)
            output.publish()
    assert (out / "model.safetensors").read_bytes() == b"old" and len(leftovers_staged(out)) == 1


def test_compare_never_writes_into_a_model_folder(family, tmp_path):
    base, seeds = family
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    before = tree_hashes(seeds[0])
    refused(
        run_cli("mergekit-seed", "compare", seeds[0], seeds[1], "--data", data, "--out", seeds[0]),
        "never writes over its inputs",
    )
    refused(
        run_cli("mergekit-seed", "analyze", seeds[0], seeds[1], "--base", base, "--out", seeds[0] / "analysis"),
        "lies inside",
    )
    assert tree_hashes(seeds[0]) == before


def test_a_report_folder_holding_other_files_is_refused(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="replaces only a previous mergekit-seed merge or report"):
        with OutputFolder(out, overwrite=True):
            pass
    assert (out / "thesis.tex").read_text() == "mine"


# generated runs: an interleaving of two writers into one OUT and a user adding files
ACTIONS = st.lists(
    st.sampled_from(["a-enter", "b-enter", "a-publish", "b-publish", "user-file", "a-exit", "b-exit"]), max_size=10
)


@PROPERTY
@given(actions=ACTIONS, overwrite=st.booleans(), start=st.sampled_from(["absent", "empty", "ours", "foreign"]))
def test_writers_and_a_user_never_lose_a_user_file(actions, overwrite, start, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    out = root / "out"
    if start != "absent":
        out.mkdir()
    if start == "ours":
        publish_earlier(out)
    if start == "foreign":
        (out / "user-0.txt").write_text("user")
    writers = {"a": None, "b": None}
    user_files = 1 if start == "foreign" else 0
    for action in actions:
        who, _, what = action.partition("-")
        if action == "user-file":
            if out.is_dir():
                (out / f"user-{user_files}.txt").write_text("user")
                user_files += 1
            continue
        writer = writers[who]
        try:
            if what == "enter" and writer is None:
                writer = OutputFolder(out, overwrite=overwrite).__enter__()
                (writer.staging / f"{who}.safetensors").write_bytes(who.encode())
                writers[who] = writer
                assert writers["a" if who == "b" else "b"] is None, "two writers hold one OUT"
            elif what == "publish" and writer is not None:
                writer.publish()
                writer.__exit__(None, None, None)  # as every command does once published
                writers[who] = None
            elif what == "exit" and writer is not None:
                writer.__exit__(None, None, None)
                writers[who] = None
        except UserError as error:
            assert "\n" not in str(error)
            if writer is not None and what != "enter":
                writer.__exit__(None, None, None)
                writers[who] = None
    for writer in writers.values():
        if writer is not None:
            writer.__exit__(None, None, None)
    for index in range(user_files):
        assert (out / f"user-{index}.txt").read_text() == "user"
    assert not (root / ".out.lock").exists()


def publish_earlier(out: Path) -> None:
    """An earlier output of ours in ``out``."""
    with OutputFolder(out, overwrite=True) as output:
        (output.staging / "model.safetensors").write_bytes(b"old")
        output.publish()


# ------------------------------------------------------------------ where OUT may be (issue 23)


@pytest.mark.parametrize("where", ["a seed", "the folder of the seeds", "inside a seed", "the base"])
def test_out_never_overlaps_an_input_even_with_overwrite(family, tmp_path, where):
    base, seeds = family
    out = {
        "a seed": seeds[1],
        "the folder of the seeds": seeds[0].parent,
        "inside a seed": seeds[0] / "merged",
        "the base": base,
    }[where]
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, seeds)
    before = tree_hashes(tmp_path / "runs")
    result = run_cli("mergekit-seed", "run", recipe, out, "--overwrite", "--quiet")
    refused(result, "a merge never writes over its inputs")
    assert tree_hashes(tmp_path / "runs") == before
    no_staging_left(out.parent)


def test_out_through_a_symlink_to_an_input_is_refused(family, tmp_path):
    base, seeds = family
    link = tmp_path / "link"
    link.symlink_to(seeds[0])
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    before = tree_hashes(tmp_path / "runs")
    refused(run_cli("mergekit-seed", "run", recipe, link, "--overwrite"), str(seeds[0]))
    assert tree_hashes(tmp_path / "runs") == before and link.is_symlink()


def test_the_python_api_refuses_an_input_as_out(family, tmp_path):
    from mergekit_seed import UserError, merge

    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    before = tree_hashes(tmp_path / "runs")
    with pytest.raises(UserError, match="never writes over its inputs"):
        merge(recipe, seeds[0].parent, overwrite=True, quiet=True)
    assert tree_hashes(tmp_path / "runs") == before


def test_out_holding_the_recipe_is_refused(family, tmp_path):
    base, seeds = family
    folder = tmp_path / "work"
    folder.mkdir()
    recipe = write_recipe(folder / "r.yml", "seedlora_dm", base, seeds)
    refused(run_cli("mergekit-seed", "run", recipe, folder, "--overwrite"), "contains the input")
    assert recipe.is_file()


def test_out_in_the_hugging_face_cache_is_refused(family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base, seeds = family
    cache = tmp_path / "hf-cache"
    (cache / "models--org--name").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    refused(run_cli("mergekit-seed", "run", recipe, cache / "models--org--name" / "merged"), "Hugging Face cache")
    assert not (cache / "models--org--name" / "merged").exists()


def test_overwrite_recognises_a_merge_written_without_a_card(family, tmp_path):
    """(A folder of something else is refused: tests/test_plugin.py.) Without a card, our marker
    says the folder is a merge of ours."""
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    quiet = tmp_path / "no-card"
    run_cli("mergekit-seed", "run", recipe, quiet, "--quiet", "--no-write-model-card", check=True)
    assert not (quiet / "README.md").exists()
    run_cli("mergekit-seed", "run", recipe, quiet, "--quiet", "--overwrite", check=True)
    assert (quiet / "README.md").is_file()


def test_reproduce_never_writes_over_its_card_or_check_folder(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    merged = tmp_path / "merged"
    run_cli("mergekit-seed", "run", recipe, merged, "--quiet", check=True)
    other = tmp_path / "other"
    run_cli("mergekit-seed", "run", recipe, other, "--quiet", check=True)
    before = tree_hashes(merged, other)
    refused(
        run_cli("mergekit-seed", "reproduce", merged, merged, "--recipe", recipe, "--overwrite", "--check"),
        "contains the input",
    )
    refused(
        run_cli("mergekit-seed", "reproduce", merged, other, "--recipe", recipe, "--overwrite", "--check", other),
        "is the input",
    )
    assert tree_hashes(merged, other) == before


# ------------------------------------------------------------------ output paths


def test_a_symlinked_out_is_published_at_its_target(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    run_cli("mergekit-seed", "run", recipe, link, "--quiet", check=True)
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    # a dangling link: the merge appears where it points
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "not-yet")
    run_cli("mergekit-seed", "run", recipe, dangling, "--quiet", check=True)
    assert dangling.is_symlink() and (tmp_path / "not-yet" / "model.safetensors").is_file()
    # a link to a folder holding something else: refused, with or without --overwrite
    (target / "notes.txt").write_text("mine")
    for flags in ((), ("--overwrite",)):
        refused(run_cli("mergekit-seed", "run", recipe, link, *flags))
    assert link.is_symlink()
    no_staging_left(tmp_path)


def test_out_whose_parent_is_a_file_is_one_line(family, tmp_path):
    base, seeds = family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    (tmp_path / "afile").write_text("x")
    refused(run_cli("mergekit-seed", "run", recipe, tmp_path / "afile" / "out"), "cannot create the output folder")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.parametrize("kind", ["checkpoints", "adapters"])
def test_a_write_that_fails_part_way_is_one_line_and_leaves_nothing(family, tiny_loras, tmp_path, kind):
    if kind == "checkpoints":
        base, seeds = family
        recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    else:
        base, seeds = lora_copies(tiny_loras, tmp_path)
        recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds, output={"format": "full"})
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / "mergekit-seed"), "run", str(recipe), str(out), "--quiet"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    refused(done, "nothing was published", out=out)
    assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1, done.stderr
    assert not out.exists()
    no_staging_left(tmp_path)


# ------------------------------------------------------------------ --overwrite and SIGTERM (issue 5)


def test_overwrite_replaces_a_previous_merge(tiny_family, tmp_path):
    base, seeds = tiny_family
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    assert run_cli("mergekit-seed", "run", recipe, out, "--quiet").returncode == 0
    refused(run_cli("mergekit-seed", "run", recipe, out), "--overwrite")
    (out / "model.safetensors").write_bytes(b"damaged")  # a file of ours, whatever became of it
    assert run_cli("mergekit-seed", "run", recipe, out, "--overwrite", "--quiet").returncode == 0
    assert load_weights(out)  # the new merge
    # a file the user added is never deleted: --overwrite refuses until it is moved out
    (out / "old.txt").write_text("x")
    refused(run_cli("mergekit-seed", "run", recipe, out, "--overwrite"), "old.txt")
    assert (out / "old.txt").read_text() == "x"
    assert not list(tmp_path.glob(".out.*"))


def test_a_run_killed_halfway_leaves_no_partial_model(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "lore", None, seeds, {"iterations": 100000, "tol": 0})
    out = tmp_path / "out"
    process = subprocess.Popen(
        [str(BIN / "mergekit-seed"), "run", str(recipe), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".out.partial-*")), "the merge never started writing"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))

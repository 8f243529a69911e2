"""One error model (issue 48): every refusal is a ``UserError``, printed as one line; a bug keeps
its traceback; ``MERGEKIT_SEED_DEBUG=1`` or ``-v`` shows the traceback of a refusal too."""

import os
import subprocess

import pytest
from conftest import BIN, run_cli, write_recipe

from mergekit_seed.errors import MergeRefused, RecipeProblems, UserError


@pytest.fixture
def unknown_parameter_recipe(tiny_family, tmp_path):
    base, seeds = tiny_family
    return write_recipe(tmp_path / "r.yml", "seedft", base, seeds, parameters={"rnak": 2})


def _run(*args, **env):
    return subprocess.run(
        [str(BIN / "mergekit-seed"), *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
    )


def test_a_refusal_is_one_line_and_the_debug_switch_shows_its_traceback(unknown_parameter_recipe, tmp_path):
    plain = _run("run", unknown_parameter_recipe, tmp_path / "out")
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert [line for line in plain.stderr.splitlines() if line.strip()] == [
        line for line in plain.stderr.splitlines() if line.startswith("error:")
    ]
    assert "unknown parameter 'rnak'" in plain.stderr
    for debug in (
        _run("run", unknown_parameter_recipe, tmp_path / "out", MERGEKIT_SEED_DEBUG="1"),
        _run("run", unknown_parameter_recipe, tmp_path / "out", "-v"),
    ):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
        assert "RecipeProblems" in debug.stderr and "error: " in debug.stderr.splitlines()[-1]


def test_every_refusal_type_is_a_user_error():
    assert issubclass(RecipeProblems, UserError) and issubclass(MergeRefused, UserError)
    assert issubclass(MergeRefused, ValueError)  # for callers of mergekit's Python API
    assert RecipeProblems(["a", "b"]).lines() == ["a", "b"]


def test_a_bug_keeps_its_traceback(unknown_parameter_recipe, tmp_path, monkeypatch):
    """An exception that is not a refusal is not turned into a user error line."""
    from mergekit_seed import runner

    def broken(*_args, **_kwargs):
        raise TypeError("a bug in our code")

    monkeypatch.setattr(runner, "validate", broken)
    with pytest.raises(TypeError, match="a bug in our code"):
        run_cli("mergekit-seed", "run", unknown_parameter_recipe, tmp_path / "out")


def test_only_mergekits_own_refusals_mid_merge_become_one_line():
    from mergekit.common import parse_kmb

    from mergekit_seed.runner import raised_by_mergekit

    try:
        parse_kmb("x")
    except ValueError as error:
        assert raised_by_mergekit(error)
    try:
        int("x")
    except ValueError as error:
        assert not raised_by_mergekit(error)

"""The CLI attacks itself (issue 47): every argument or option of every command that takes a
path gets a FIFO, ``/dev/zero``, a link, a hard link, a missing path, a name with a newline and
``#``, and a sparse 1 GB file. Each case must end in one line (or a correct result) within a
time bound, with no traceback, and every input byte for byte as it was.

The cases are generated from the click commands themselves: a parameter is a path when click
types it ``click.Path`` (or its metavar says PATH or DIR). A command added later is attacked
without anyone writing a case; it needs a baseline only if its required parameters have names
:data:`BASELINE` does not know (the test then says which).
"""

import os
import shutil
import signal
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import save_random_lora, tree_hashes, write_recipe, write_splits

from mergekit_seed.cli import _build_adapter_run_command, _build_run_command, main


SECONDS_PER_CASE = 60
ATTACKS = ("fifo", "dev-zero", "link", "hard-link", "missing", "newline-name", "sparse-1gb")
# options each command needs beside its required parameters to do its work at all
NEEDED = {
    "compare": ("data",),
    "select": ("validation", "test_data", "methods"),
    "reproduce": ("given_inputs",),
    "analyze": ("base",),
}


def commands():
    """(command path, click command) for every command, groups walked, both forms of ``run``."""
    context = click.Context(main)
    found = []
    for name in main.list_commands(context):
        if name == "run":
            found += [(("run",), _build_run_command()), (("run", "adapters"), _build_adapter_run_command())]
            continue
        command = main.get_command(context, name)
        if isinstance(command, click.Group):
            found += [((name, sub), command.get_command(context, sub)) for sub in command.list_commands(context)]
        else:
            found.append(((name,), command))
    return found


def is_path(parameter: click.Parameter) -> bool:
    metavar = str(getattr(parameter, "metavar", "") or "")
    return isinstance(parameter.type, click.Path) or "PATH" in metavar or "DIR" in metavar


def path_parameters():
    return [
        (path, command, parameter)
        for path, command in commands()
        for parameter in command.params
        if is_path(parameter)
    ]


@pytest.fixture(scope="module")
def world(tiny_family, tmp_path_factory):
    """Valid inputs for every command, under one folder whose bytes the cases must not change."""
    from tiny import save_tiny_llama  # noqa: F401 - the fixture family is built with it

    root = tmp_path_factory.mktemp("world")
    inputs = root / "inputs"
    base, seeds = tiny_family
    base = shutil.copytree(base, inputs / "base")
    seeds = [shutil.copytree(seed, inputs / seed.name) for seed in seeds[:2]]
    loras = [save_random_lora(base, inputs / f"lora{i}", r=2, seed=i) for i in range(2)]
    write_splits(inputs)
    (inputs / "grid.yml").write_text("linear: {}\n")
    recipe = write_recipe(inputs / "recipe.yml", "seedlora_dm", base, seeds)
    write_recipe(inputs / "lora.yml", "seedlora_dm", base, loras)
    (inputs / "tasks").mkdir()
    card = root / "card"
    assert CliRunner().invoke(main, ["run", str(recipe), str(card), "--quiet"]).exit_code == 0
    outside = root / "outside.txt"
    outside.write_text("not an input of anything\n")
    sparse = root / "sparse"
    with open(sparse, "wb") as handle:
        handle.truncate(1 << 30)
    return {
        "root": root,
        "inputs": inputs,
        "base": base,
        "seeds": seeds,
        "recipe": recipe,
        "card": card,
        "sparse": sparse,
        "outside": outside,
        "counter": [0],
    }


def baseline(world, parameter: click.Parameter, out: Path, command_path=()):
    """A valid value for ``parameter`` by its name: a list of command-line words."""
    inputs = world["inputs"]
    by_name = {
        "recipe": [inputs / "lora.yml" if command_path == ("run", "adapters") else world["recipe"]],
        "recipes": [world["recipe"]],
        "user_recipe": [world["recipe"]],
        "out": [out],
        "models": [str(s) for s in world["seeds"]],
        "seeds": [str(s) for s in world["seeds"]],
        "base": [world["base"]],
        "tokenizer": [world["base"]],
        "data": [inputs / "val.jsonl"],
        "validation": [inputs / "val.jsonl"],
        "test_data": [inputs / "test.jsonl"],
        "grid": [inputs / "grid.yml"],
        "source": [world["card"]],
        "check_dir": [world["card"]],
        "include_path": [inputs / "tasks"],
        "name": ["demo-full-seedft"],
        "methods": ["linear"],
        "given_inputs": [f"input{i}={path}" for i, path in enumerate([world["base"], *world["seeds"]])],
    }
    if parameter.name not in by_name:
        pytest.fail(f"no baseline value for parameter {parameter.name!r}: add one to test_attack_matrix.baseline")
    return [str(value) for value in by_name[parameter.name]]


def words(parameter: click.Parameter, values):
    if isinstance(parameter, click.Argument):
        return list(values)
    flag = parameter.opts[0]
    return [word for value in values for word in (flag, value)]


def attacked_value(world, attack: str, parameter: click.Parameter, valid: str) -> str:
    """``attack`` made for one parameter whose valid value is ``valid``."""
    world["counter"][0] += 1
    scratch = world["root"] / "attacks" / str(world["counter"][0])
    scratch.mkdir(parents=True)
    prefix = valid.split("=", 1)[0] + "=" if parameter.name == "given_inputs" else ""
    valid = valid.split("=", 1)[1] if prefix else valid
    if attack == "fifo":
        os.mkfifo(scratch / "fifo")
        value = scratch / "fifo"
    elif attack == "dev-zero":
        value = Path("/dev/zero")
    elif attack == "link":  # a link to the valid input; for a file, one that leads out of every folder too
        value = scratch / "link"
        value.symlink_to(Path(valid).absolute() if Path(valid).exists() else world["outside"])
    elif attack == "hard-link":
        value = scratch / "hard"
        if Path(valid).is_file():
            os.link(valid, value)
        else:
            os.link(world["outside"], value)
    elif attack == "missing":
        value = scratch / "missing"
    elif attack == "newline-name":
        value = scratch / "a\nb #c"
        if Path(valid).is_dir():
            shutil.copytree(valid, value)
        elif Path(valid).is_file():
            shutil.copy(valid, value)
    else:
        value = world["sparse"]
    return prefix + str(value)


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


CASES = [(path, parameter.name, attack) for path, _, parameter in path_parameters() for attack in ATTACKS]


def test_every_path_parameter_is_attacked():
    names = {(" ".join(path), name) for path, name, _ in CASES}
    assert {
        ("run", "recipe"),
        ("run", "out"),
        ("validate", "recipes"),
        ("compare", "data"),
        ("select", "grid"),
        ("reproduce", "source"),
        ("recipes show", "models"),
        ("demo", "out"),
    } <= names, names


@pytest.mark.parametrize("command_path, name, attack", CASES, ids=[f"{' '.join(p)}-{n}-{a}" for p, n, a in CASES])
def test_an_attacked_path_ends_in_one_line_or_a_result(world, monkeypatch, tmp_path, command_path, name, attack):
    command = dict(commands())[command_path]
    if command_path == ("demo",):  # the attack is on --out; training the demo's models is not
        import mergekit_seed.tools.demo.pipeline as demo
        from mergekit_seed.errors import UserError

        def stop(*_args, **_kwargs):
            raise UserError("stopped after taking --out (attack matrix)")

        monkeypatch.setattr(demo, "run_experiment", stop)
    argv = [str(word) for word in _argv(world, command_path, command, tmp_path / "out", (name, attack))]
    before = tree_hashes(world["inputs"], world["card"])
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        outcome = CliRunner().invoke(main, argv, catch_exceptions=True)
    except _Timeout:
        pytest.fail(f"{argv} did not end within {SECONDS_PER_CASE} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(outcome.exception, _Timeout):
        pytest.fail(f"{argv} did not end within {SECONDS_PER_CASE} s")
    error = outcome.exception
    assert error is None or isinstance(error, SystemExit), f"{argv}: a traceback ({type(error).__name__}: {error})"
    stderr = outcome.stderr
    assert "Traceback" not in stderr
    if outcome.exit_code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines and all(
            line.startswith(("error:", "warning:", "Error:", "Usage:", "Try ", "  ")) for line in lines
        ), stderr
    assert tree_hashes(world["inputs"], world["card"]) == before, f"{argv} changed an input"


def _flags(command: click.Command):
    return {opt for parameter in command.params for opt in getattr(parameter, "opts", [])}


def _argv(world, command_path, command, out, attacked=None):
    """The command line of ``command`` with every required (and needed) parameter at its
    baseline value; ``attacked``: (parameter name, attack) replaces one path parameter's value."""
    argv = list(command_path[:1]) + ([command_path[1]] if command_path[0] == "recipes" else [])
    for parameter in command.params:
        if attacked is not None and parameter.name == attacked[0]:
            valid = baseline(world, parameter, out, command_path)
            argv += words(parameter, [attacked_value(world, attacked[1], parameter, valid[0])] + valid[1:])
        elif parameter.required or parameter.name in NEEDED.get(command_path[0], ()):
            argv += words(parameter, baseline(world, parameter, out, command_path))
    return argv + (["--quiet"] if "--quiet" in _flags(command) else [])


@pytest.mark.parametrize("command_path", [path for path, _ in commands() if path != ("demo",)], ids=" ".join)
def test_every_baseline_works_so_the_attacks_reach_their_parameter(world, tmp_path, command_path):
    """Unattacked, every command succeeds: an attack that fails fails because of its path."""
    command = dict(commands())[command_path]
    outcome = CliRunner().invoke(main, [str(word) for word in _argv(world, command_path, command, tmp_path / "out")])
    assert outcome.exit_code == 0, (outcome.stdout, outcome.stderr, outcome.exception)

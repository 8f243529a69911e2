"""The reader and the writer are the only doors to the file system (issue 47).

Read from the package's source, every call is checked: a file is opened or parsed only in
``mergekit_seed/reader.py`` (which confines it to its folder, refuses anything that is not a
regular file before opening it, and bounds what it reads), and written, renamed or deleted only
in ``mergekit_seed/output.py`` (whose helpers write only inside an open output folder's
staging). A library that writes files itself (``save_pretrained``, ``savefig``, mergekit's
``run_merge`` and ``TensorWriter``, lm-eval's tracker) is handed ``staged_path(...)``. The
allow-list is short, and every entry says why.
"""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).parent.parent / "mergekit_seed"

READER, WRITER = "reader.py", "output.py"

# attribute or function names whose call reads a file
READ_CALLS = {"read_text", "read_bytes", "safe_open", "load_file"}
READ_QUALIFIED = {
    ("json", "load"),
    ("torch", "load"),
    ("yaml", "load"),
    ("yaml", "safe_load"),
    ("yaml", "full_load"),
    ("yaml", "unsafe_load"),
    ("yaml", "load_all"),
    ("yaml", "safe_load_all"),
    ("os", "open"),
    ("np", "load"),
    ("numpy", "load"),
    ("pickle", "load"),
}
# ... and whose call writes, renames or deletes
WRITE_CALLS = {
    "write_text",
    "write_bytes",
    "unlink",
    "rmdir",
    "mkdir",
    "makedirs",
    "rename",
    "replace",
    "rmtree",
    "copy",
    "copy2",
    "copyfile",
    "copytree",
    "copyfileobj",
    "move",
    "remove",
    "removedirs",
    "save_file",
    "symlink_to",
    "hardlink_to",
    "touch",
    "mkdtemp",
    "NamedTemporaryFile",
    "TemporaryDirectory",
    "mkstemp",
    "truncate",
    "chmod",
}
# also methods of str, list, dict or set: a file-system call only as os.X or shutil.X
NOT_FILE_SYSTEM = {"replace", "remove", "copy", "move"}
# a plain call ``name(...)`` is checked when ``name`` was imported from one of these
FILE_SYSTEM_MODULES = {
    "os",
    "os.path",
    "shutil",
    "tempfile",
    "pathlib",
    "io",
    "json",
    "yaml",
    "pickle",
    "numpy",
    "torch",
    "safetensors",
    "safetensors.torch",
}
# libraries that write into a folder they are given: the folder must come from staged_path()
STAGED_WRITERS = {"save_pretrained", "savefig", "run_merge", "TensorWriter", "EvaluationTracker"}

# (file, call name): why it may
ALLOWED = {
    (
        "installed.py",
        "read_text",
    ): "importlib.metadata's read of our own installation record (direct_url.json), not a user file",
    (
        "kernel_timings.py",
        "write_text",
    ): "the benchmarks' kernel timings, written to the file MERGEKIT_SEED_PROFILE names "
    "(set by benchmarks/bench.py for its own child process), never a user folder",
    (
        "tools/demo/shipped.py",
        "write_text",
    ): "a maintainer's tool: after shipping demo runs it rewrites this repository's "
    "own docs and shipped.json (docs/demo.md says when), never a user folder",
}


def _name(call: ast.Call):
    """(qualifier, name) of a call: ``os.rename(...)`` -> ("os", "rename"), ``f(...)`` -> (None, "f")."""
    function = call.func
    if isinstance(function, ast.Attribute):
        qualifier = function.value.id if isinstance(function.value, ast.Name) else None
        return qualifier, function.attr
    if isinstance(function, ast.Name):
        return None, function.id
    return None, None


def _mentions_staged_path(call: ast.Call) -> bool:
    return any(
        isinstance(node, ast.Call) and _name(node)[1] == "staged_path"
        for argument in call.args + [k.value for k in call.keywords]
        for node in ast.walk(argument)
    )


def _is_write_open(call: ast.Call) -> bool:
    modes = [call.args[1]] if len(call.args) > 1 else [k.value for k in call.keywords if k.arg == "mode"]
    return any(
        isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+")
        for mode in modes
    )


def _imported_names(tree: ast.Module) -> dict:
    """{local name: module it was imported from} for every ``from X import name``."""
    return {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = _imported_names(tree)
        for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
            qualifier, name = _name(call)
            where = f"{relative}:{call.lineno} {qualifier + '.' if qualifier else ''}{name}"
            plain = isinstance(call.func, ast.Name)
            if name is None or (relative, name) in ALLOWED:
                continue
            if plain and name != "open" and imported.get(name) not in FILE_SYSTEM_MODULES:
                continue  # our own function (a door of the reader or the writer among them), or another library's
            if name == "open" and qualifier is None:
                if relative not in (READER, WRITER) or (relative == READER and _is_write_open(call)):
                    found.append(f"{where}: opens a file (use mergekit_seed.reader, or output's write helpers)")
            elif name in READ_CALLS or (qualifier, name) in READ_QUALIFIED:
                if relative != READER and not (
                    relative == WRITER and (qualifier, name) == ("os", "open")
                ):  # the lock file
                    found.append(f"{where}: reads a file outside the one reader (mergekit_seed.reader)")
            elif name in WRITE_CALLS and (name not in NOT_FILE_SYSTEM or qualifier in ("os", "shutil") or plain):
                if relative != WRITER:
                    found.append(f"{where}: writes, renames or deletes outside the one writer (mergekit_seed.output)")
            elif name in STAGED_WRITERS and relative != WRITER and not _mentions_staged_path(call):
                found.append(f"{where}: a library writing files must be handed output.staged_path(...)")
    return found


def test_only_the_reader_reads_and_only_the_writer_writes():
    found = violations()
    assert not found, "\n".join(found)


def test_the_allow_list_has_no_stale_entry():
    """Every allowed call is still there: an entry that allows nothing would allow it again later."""
    calls = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        calls |= {
            (relative, _name(node)[1])
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call)
        }
    assert not set(ALLOWED) - calls, set(ALLOWED) - calls


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("open(p)", True),
        ("Path(p).read_text()", True),
        ("json.load(f)", True),
        ("yaml.safe_load(t)", True),
        ("shutil.rmtree(p)", True),
        ("os.replace(a, b)", True),
        ("p.unlink()", True),
        ("figure.savefig(path)", True),
        ("figure.savefig(staged_path(path))", False),
        ("text.replace('a', 'b')", False),
        ("json.loads(t)", False),
        ("from shutil import rmtree\nrmtree(p)", True),
        ("from safetensors import safe_open\nsafe_open(p)", True),
        ("from mergekit_seed.output import write_text\nwrite_text(p, t)", False),
        ("from mergekit_seed.reader import read_text\nread_text(p, 'x')", False),
        ("names.remove(x)", False),
        ("os.remove(p)", True),
    ],
)
def test_the_check_sees_what_it_must(tmp_path, monkeypatch, source, flagged):
    """The checker itself, on one-line modules (so a rename of the rules cannot make it blind)."""
    package = tmp_path / "mergekit_seed"
    package.mkdir()
    (package / "module.py").write_text(source + "\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert bool(violations()) == flagged, violations()

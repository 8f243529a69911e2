"""The package is layered (docs/architecture.md): no module imports a higher layer, and no two
modules import each other, even inside functions. Read from the source (every import
statement, at any depth), so a circle kept from crashing by a function-level import fails too."""

import ast
import json
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).parent.parent / "mergekit_seed"

# bottom to top; a module may import its own layer and the ones below
LAYERS = {
    "base": [
        "errors",
        "version",
        "after_import",
        "output",
        "reader",
        "public",
        "finite",
        "untrusted",
        "installed",
        "quiet",
    ],
    "maths": ["maths"],
    "references": ["references"],
    "methods": ["methods", "kernel_timings", "plugin"],
    "recipe": ["recipe", "catalogue", "hub_recipes", "validation"],
    "engines and cards": ["engines", "card", "reproduce"],
    "runner": ["runner"],
    "tools": ["tools"],
    "cli": ["cli"],
    "package": ["__init__", "startup"],
}


def module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS.values()):
        for member in members:
            if module == member or module.startswith(member + "."):
                return index
    raise AssertionError(f"mergekit_seed.{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def imports_of(path: Path):
    """(imported module relative to the package, line) for every import of the package."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mergekit_seed":
            if node.module == "mergekit_seed":
                yield "__init__", node.lineno
            else:
                yield node.module[len("mergekit_seed.") :], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mergekit_seed":
                    yield "__init__", node.lineno
                elif alias.name.startswith("mergekit_seed."):
                    yield alias.name[len("mergekit_seed.") :], node.lineno


def edges():
    found = {}
    for module, path in module_names():
        for imported, line in imports_of(path):
            found.setdefault(module, set()).add(imported)
            yield module, imported, f"{path.relative_to(PACKAGE.parent)}:{line}"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{where}: {module} ({list(LAYERS)[layer_of(module)]}) imports {imported} ({list(LAYERS)[layer_of(imported)]})"
        for module, imported, where in edges()
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {}
    for module, imported, _ in edges():
        if imported != module:
            graph.setdefault(module, set()).add(imported)
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_every_module_imports_and_the_package_stays_cheap():
    names = [f"mergekit_seed.{module}" if module != "__init__" else "mergekit_seed" for module, _ in module_names()]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({name!r})\n" for name in names)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "could not register" not in done.stderr, (
        done.stderr
    )  # importing ours in any order never breaks registration
    # `import mergekit_seed` (run at every interpreter start by the .pth hook) imports neither torch nor mergekit
    cheap = subprocess.run(
        [sys.executable, "-c", "import sys, mergekit_seed; print('torch' in sys.modules, 'mergekit' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert cheap.stdout.split() == ["False", "False"], cheap.stdout + cheap.stderr


# What a function may import late: a package whose import cost benchmarks/startup.py measured
# (seconds in a fresh interpreter on our 2-core machine, in benchmarks/startup.json; docs quote
# them from there). Everything else is imported at the top of its module.
STARTUP_RESULTS = Path(__file__).parent.parent / "benchmarks" / "startup.json"
LATE_IMPORTS = {name.split(".")[0] for name in json.loads(STARTUP_RESULTS.read_text())["imports"]}
# imported at every interpreter start by mergekit_seed.pth: even the standard library waits
# (hook_ms in benchmarks/startup.json)
START_UP_MODULES = {"__init__", "startup"}


def _top_level_imports(path: Path):
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def _is_late_import(name: str, modules: dict, seen=()) -> bool:
    """A module on the list, or one of ours that imports one at its top (directly or through ours)."""
    if any(name == late or name.startswith(late + ".") for late in LATE_IMPORTS):
        return True
    ours = name[len("mergekit_seed.") :] if name.startswith("mergekit_seed.") else None
    if ours in modules and ours not in seen:
        return any(
            _is_late_import(imported, modules, seen + (ours,)) for imported in _top_level_imports(modules[ours])
        )
    return False


def test_a_function_imports_late_only_what_costs_start_up_time():
    modules = dict(module_names())
    found = []
    for module, path in modules.items():
        if module in START_UP_MODULES:
            continue
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                found += [f"{module}:{node.lineno}: {name}" for name in names if not _is_late_import(name, modules)]
    assert not found, (
        "import these at the top of their module (cheap), or measure them (benchmarks/startup.py MODULES):\n"
        + "\n".join(found)
    )


LONGEST_FUNCTION = 60


def test_no_function_is_longer_than_sixty_lines():
    """Issue 37: a function longer than this is split by meaning (a step, a test, data apart
    from its template), docstring included in the count. The signature is not counted: ruff
    writes one parameter a line once it outgrows a line (issue 48)."""
    long = [
        f"{module}:{node.lineno} {node.name}: {node.end_lineno - node.body[0].lineno + 1} lines"
        for module, path in module_names()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.body[0].lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, "\n".join(long)


def test_importing_the_methods_first_never_breaks_registration():
    """Our methods module imports mergekit's registry, whose import hook registers our methods:
    imported first (a tool module does), it must not try to register itself half-built."""
    code = "import mergekit_seed.methods; import mergekit_seed; mergekit_seed.register()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "could not register" not in done.stderr, done.stderr


def test_no_two_modules_share_a_name():
    """Issue 48: two modules named sera (the layer and its files), profile and profiling, told a
    reader nothing apart. Every module and package has a name of its own, saying its job."""
    names = [path.parent.name if path.stem == "__init__" else path.stem for path in PACKAGE.rglob("*.py")]
    names = [name for name in names if name != PACKAGE.name]
    shared = sorted({name for name in names if names.count(name) > 1})
    assert not shared, shared

"""What starting a command costs: imports, start-up hook, light and full `run`, teardown.

    python benchmarks/startup.py [--reps 5] [--json benchmarks/startup.json]

Every figure is the median of ``--reps`` fresh child processes on this machine (wall and CPU
seconds and peak RSS from GNU time, through ``bench.timed_child``):
- ``imports``: seconds to import each module that `tests/test_layers.py` allows a function to
  import late (`LATE_IMPORTS`), and mergekit's heavier modules, in a fresh interpreter (our
  methods' registration included where mergekit's method registry is imported, as a user gets it);
- ``torch_mib``: peak RSS of an interpreter that imports torch, less that of one that does not;
- ``commands``: `mergekit-seed recipes`, `methods`, `validate --offline` on a tiny full-model
  recipe, and `run` of a tiny three-seed LoRA recipe as it starts (no transformers or peft) and
  with one more mergekit option (`--allow-crimes`), which parses mergekit's own options and
  imports them (``light_run_saves``: what the light start saves);
- ``teardown_seconds``: an interpreter that imported torch ending normally, less one ending
  through ``os._exit``;
- ``hook_ms``: the start-up hook's cumulative import time (``python -X importtime``), with
  Python's bytecode cache and with none at all (``PYTHONDONTWRITEBYTECODE`` set and an empty
  ``PYTHONPYCACHEPREFIX``: the hook's modules and the standard library modules they import are
  compiled at every start);
- ``lm_eval_index_seconds``: lm-eval indexing its built-in task files once, as `compare --tasks`
  does (absent without the ``eval`` extra).
The figures the docs quote from this file are held to it by tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from bench import BIN, build_models, machine, recipe, timed_child  # noqa: E402


MODULES = (
    "torch",
    "safetensors.torch",
    "transformers",
    "peft",
    "mergekit.merge_methods",
    "mergekit.config",
    "mergekit.options",
    "mergekit.merge",
    "mergekit.io",
    "matplotlib.pyplot",
    "scipy.linalg",
    "numpy",
    "tqdm",
    "lm_eval.evaluator",
    "ray",
)


def median_run(command, reps: int, scratch: Path) -> dict:
    runs = [timed_child(command, dict(os.environ, HF_HUB_OFFLINE="1"), scratch) for _ in range(reps)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def seconds_in_fresh_interpreter(setup: str, timed: str, reps: int) -> float:
    """Median seconds of the statement ``timed``, after ``setup``, each time in a new interpreter."""
    code = f"import time\n{setup}\nstarted = time.perf_counter()\n{timed}\nprint(time.perf_counter() - started)"
    return statistics.median(
        float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1]) for _ in range(reps)
    )


def import_seconds(module: str, reps: int) -> float:
    return seconds_in_fresh_interpreter("import importlib", f"importlib.import_module({module!r})", reps)


def hook_milliseconds(reps: int, cached: bool) -> float:
    """The start-up hook's cumulative import time in milliseconds (``-X importtime`` gives microseconds)."""
    with tempfile.TemporaryDirectory() as empty:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if not cached:
            env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=empty)
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)  # writes the cache when allowed
        found = []
        for _ in range(reps):
            report = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True, check=True
            ).stderr
            match = re.search(r"import time:\s+\d+ \|\s+(\d+) \|\s+mergekit_seed\.startup$", report, re.M)
            if match is None:
                raise SystemExit("the start-up hook did not run: is mergekit-seed installed in this interpreter?")
            found.append(int(match.group(1)) / 1000)
    return statistics.median(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "startup.json")
    args = parser.parse_args()
    results = {"machine": machine("cpu"), "reps": args.reps}
    results["imports"] = {
        m: round(import_seconds(m, args.reps), 3) for m in MODULES if importlib.util.find_spec(m.split(".")[0])
    }
    print("imports:", results["imports"], flush=True)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        python = [sys.executable, "-c"]
        bare, with_torch = (median_run([*python, code], args.reps, scratch) for code in ("pass", "import torch"))
        results["torch_mib"] = round(with_torch["peak_mib"] - bare["peak_mib"])
        fast_exit = median_run([*python, "import torch, os; os._exit(0)"], args.reps, scratch)
        results["teardown_seconds"] = round(with_torch["seconds"] - fast_exit["seconds"], 2)
        base, seeds, loras, _ = build_models(scratch / "models", "tiny", 3)
        full = recipe(scratch / "full.yml", "seedlora_dm", base, seeds)
        adapter = recipe(scratch / "adapter.yml", "seedft", base, loras, "output:\n  format: lora\n")
        seed = [BIN / "mergekit-seed"]
        out = scratch / "out"
        commands = {
            "recipes": [*seed, "recipes"],
            "methods": [*seed, "methods"],
            "validate --offline": [*seed, "validate", "--offline", full],
            "run (adapter recipe)": [*seed, "run", adapter, out, "--overwrite", "--quiet"],
            "run (adapter recipe, --allow-crimes)": [
                *seed,
                "run",
                adapter,
                out,
                "--overwrite",
                "--quiet",
                "--allow-crimes",
            ],
        }
        results["commands"] = {}
        for name, command in commands.items():
            measured = median_run(command, args.reps, scratch)
            results["commands"][name] = {
                key: round(value, 2 if key != "peak_mib" else 0) for key, value in measured.items()
            }
            print(name, results["commands"][name], flush=True)
    light, full = (
        results["commands"]["run (adapter recipe)"],
        results["commands"]["run (adapter recipe, --allow-crimes)"],
    )
    results["light_run_saves"] = {key: round(full[key] - light[key], 2) for key in ("seconds", "peak_mib")}
    results["hook_ms"] = {
        "cached": round(hook_milliseconds(args.reps, True), 1),
        "uncached": round(hook_milliseconds(args.reps, False), 1),
    }
    if importlib.util.find_spec("lm_eval"):
        index = seconds_in_fresh_interpreter(
            "from lm_eval.tasks import TaskManager", "TaskManager()", min(args.reps, 3)
        )
        results["lm_eval_index_seconds"] = round(index, 1)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


def report(results: dict) -> str:
    """The markdown section of benchmarks/RESULTS.md."""
    lines = [
        f"Machine: {results['machine']}; medians of {results['reps']} fresh processes.",
        "",
        "| command | wall (s) | CPU (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {m['peak_mib']:.0f} |"
            for name, m in results["commands"].items()
        ),
        "",
        "Importing, in a fresh interpreter (s): "
        + ", ".join(f"`{name}` {seconds:.3f}" for name, seconds in results["imports"].items())
        + ".",
        "",
        f"torch's share of a process: {results['torch_mib']} MiB. The interpreter's teardown after importing torch: "
        f"{results['teardown_seconds']:.2f} s. The start-up hook: {results['hook_ms']['cached']} ms with Python's "
        "bytecode "
        f"cache, {results['hook_ms']['uncached']} ms with none.",
    ]
    if "lm_eval_index_seconds" in results:
        lines.append(f"lm-eval indexing its built-in tasks: {results['lm_eval_index_seconds']} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

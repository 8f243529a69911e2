"""How long the demo takes from scratch: wall and CPU time of `mergekit-seed demo` and `--quick`.

    python benchmarks/demo_timing.py [--modes quick,full] [--json benchmarks/demo-timing.json]
    python benchmarks/demo_timing.py --results quick=OUT/results.json full=OUT/results.json

Each mode runs in a child process with an empty base cache (``MERGEKIT_SEED_CACHE``) and a fresh
``--out``, so every base is pre-trained too, as on a user's first run; the times are the demo's
own (``seconds`` and ``cpu_seconds`` of its results.json: wall time, and the process's CPU time
over every thread). ``--results`` records runs made that way by hand instead. Run it on a quiet
machine: the demo trains on one thread, and a busy machine stretches its wall time. The README's
and docs/demo.md's timing figures are checked against the file this writes (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path


BIN = Path(sys.executable).parent


def run_demo(mode: str, scratch: Path) -> Path:
    """``mergekit-seed demo`` (``--quick`` for the quick mode) from scratch; its results.json."""
    out, cache = scratch / f"{mode}-out", scratch / f"{mode}-cache"
    cache.mkdir()
    command = [str(BIN / "mergekit-seed"), "demo", "--out", str(out), "--quiet"] + (
        ["--quick"] if mode == "quick" else []
    )
    subprocess.run(command, env=dict(os.environ, MERGEKIT_SEED_CACHE=str(cache), HF_HUB_OFFLINE="1"), check=True)
    return out / "results.json"


def timing(results_file: Path) -> dict:
    results = json.loads(results_file.read_text(encoding="utf-8"))
    environment = results["environment"]
    return {
        "seconds": results["seconds"],
        "cpu_seconds": results["cpu_seconds"],
        "threads": environment["threads"],
        "cpu": environment["cpu"],
        "cpu_capability": environment["cpu_capability"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="quick,full")
    parser.add_argument(
        "--results", nargs="+", metavar="MODE=RESULTS_JSON", help="record runs made by hand the same way"
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "demo-timing.json")
    args = parser.parse_args()
    record = {"date": date.today().isoformat(), "from_scratch": "empty MERGEKIT_SEED_CACHE, fresh --out", "modes": {}}
    if args.results:
        for entry in args.results:
            mode, _, path = entry.partition("=")
            record["modes"][mode] = timing(Path(path))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            for mode in args.modes.split(","):
                record["modes"][mode] = timing(run_demo(mode, Path(scratch)))
    args.json.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

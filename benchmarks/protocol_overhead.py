"""What the one reader, the one writer and the finiteness gate add to a merge.

    python benchmarks/protocol_overhead.py [--size 44m] [--method seedlora_dm] [--seeds 3]

Builds bench.py's synthetic checkpoints, runs one ``mergekit_seed.merge`` of them (the whole
``mergekit-seed run``: validation, card, merge, read-back, publish), then times, in the same
process and on the same files, each mechanism on its own:
- the reader: listing every input's weight files through ``weights.confined_file`` (index
  entries, links, file types), as validation and hashing do, and the regular-file check
  (``reader.regular_file``: resolve, confine, stat) of every file of every input, which each
  read through the reader pays once more;
- the writer: opening OUT (location check, lock and its journal, existing-content check,
  staging) and publishing a staged copy of the merge (the provenance gate over its text files,
  manifest, rename);
- the gate: reading every written tensor back and checking it is finite.
Each is reported as a share of the merge's wall time (target: all three under 2%).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from bench import build_models, machine, recipe  # noqa: E402


def seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="44m")
    parser.add_argument("--method", default="seedlora_dm")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    from mergekit_seed import merge
    from mergekit_seed.output import OutputFolder
    from mergekit_seed.reader import regular_file
    from mergekit_seed.references.weights import full_model_files, hashed_weight_files
    from mergekit_seed.runner import check_finite_output

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, seeds, _, parameters = build_models(root / "models", args.size, args.seeds)
        path = recipe(root / "r.yml", args.method, base, seeds)
        out = root / "out"
        merge_seconds = seconds(lambda: merge(path, out, quiet=True))

        def confine() -> None:
            for folder in [base, *seeds]:
                full_model_files(folder)
                hashed_weight_files(folder)
                for file in folder.iterdir():
                    regular_file(file, folder)

        output = OutputFolder(root / "again", [base, *seeds, path])
        protocol_seconds = seconds(output.__enter__)  # location check, lock, existing content, staging
        for file in out.iterdir():  # stands in for the merge's own writes: not timed
            if file.is_file():
                shutil.copyfile(file, output.staging / file.name)
        protocol_seconds += seconds(output.publish)  # manifest, rename into place
        output.__exit__(None, None, None)
        confinement = seconds(confine)
        gate = seconds(lambda: check_finite_output(out))
    print(f"machine: {machine('cpu')}")
    print(
        f"{args.size}: {parameters / 1e6:.1f}M parameters, {args.seeds} seeds, {args.method}; merge "
        f"{merge_seconds:.2f} s"
    )
    for name, value in (("reader", confinement), ("writer", protocol_seconds), ("finiteness gate", gate)):
        print(f"{name}: {value:.4f} s = {100 * value / merge_seconds:.2f}% of the merge")
    total = confinement + protocol_seconds + gate
    print(f"reader and writer: {100 * (confinement + protocol_seconds) / merge_seconds:.2f}% (target < 2%)")
    print(f"all three: {100 * total / merge_seconds:.2f}% (target < 2%)")


if __name__ == "__main__":
    main()

"""Which scale the demo's verdict is about (issue 38): the same task at three model sizes.

For each size the demo's whole pipeline runs once (one experiment: pre-train the base,
three seeds per setting, every merge through the real engines, scored on validation and
test), and every method is compared with the best seed (chosen on validation) and the mean
seed on test, with the demo's paired bootstrap interval. Opt-in: it takes tens of minutes on
one core. Writes JSON and a markdown table; docs/demo.md quotes the table.

    python benchmarks/demo_scale.py --out scale-out            # all three sizes
    python benchmarks/demo_scale.py --out scale-out --sizes 1m  # one of them (0.17m, 0.55m, 1m)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


# name: (hidden, intermediate, layers, heads); "0.17m" is the demo's own model. A 4M rung
# (hidden 256) was started and stopped: on our 2-core machine it would have run well past an hour.
SIZES = {"0.17m": (64, 128, 4, 4), "0.55m": (96, 192, 6, 4), "1m": (128, 256, 6, 4)}


def config_for(size: str):
    from mergekit_seed.tools.demo.pipeline import DemoConfig

    hidden, intermediate, layers, heads = SIZES[size]
    default = DemoConfig()
    base = replace(
        default.base,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    return replace(default, experiments=1, base=base)


def parameter_count(config) -> int:
    from mergekit_seed.tools.demo.task import CharVocabulary

    base, vocabulary = config.base, len(CharVocabulary())
    hidden, intermediate = base.hidden_size, base.intermediate_size
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return base.num_hidden_layers * per_layer + 2 * vocabulary * hidden + hidden


def run_size(size: str, out: Path) -> dict:
    import torch

    from mergekit_seed.quiet import quiet_libraries
    from mergekit_seed.tools.demo.pipeline import run_experiment, summarise
    from mergekit_seed.tools.demo.task import CharVocabulary

    config = config_for(size)
    torch.set_num_threads(config.threads)
    quiet_libraries()
    started = time.perf_counter()
    run = run_experiment(0, config, out / size, CharVocabulary(), True, print)
    results = summarise([run], config)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["parameters"] = parameter_count(config)
    return results


def table(by_size: dict) -> str:
    from mergekit_seed.tools.demo.pipeline import MERGEKIT_METHODS, ours

    def cell(difference: dict) -> str:
        return f"{100 * difference['mean']:+.1f} [{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"

    methods = list(ours()) + list(MERGEKIT_METHODS)
    lines = [
        "| size | setting | mean seed | best seed | " + " | ".join(methods) + " |",
        "|" + "---|" * (len(methods) + 4),
    ]
    for size, results in by_size.items():
        label = f"{results['parameters'] / 1e6:.2f}M ({results['seconds'] / 60:.0f} min)"
        for setting, entry in results["settings"].items():
            for reference in ("best", "mean"):
                cells = [cell(entry[f"versus_{reference}_seed"][m]) for m in methods]
                lines.append(
                    f"| {label} | {setting}, vs {reference} seed | {100 * entry['mean_seed']:.1f} | "
                    f"{100 * entry['best_seed_per_experiment'][0]:.1f} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


def update_docs(scale_file: Path, page: Path) -> None:
    """Put :func:`table` of a shipped ``scale.json`` (docs/demo-scale.json) into ``page``
    (docs/demo.md) between its scale markers; tests/test_demo.py checks that they agree."""
    from mergekit_seed.tools.demo.shipped import write_between_markers

    by_size = json.loads(Path(scale_file).read_text(encoding="utf-8"))
    write_between_markers(page, "scale", table(by_size) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES))
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    by_size = {}
    for size in arguments.sizes.split(","):
        print(f"size {size}")
        by_size[size] = run_size(size, arguments.out)
        (arguments.out / "scale.json").write_text(json.dumps(by_size, indent=2) + "\n", encoding="utf-8")
        (arguments.out / "scale.md").write_text(table(by_size) + "\n", encoding="utf-8")
    print(table(by_size))


if __name__ == "__main__":
    main()

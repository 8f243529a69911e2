"""``select`` at a size people merge: Ray workers against the sequential sweep, one kept base against a load each.

    python benchmarks/select_scale.py [--size 44m] [--out select-scale.json] [--device cpu]

Builds bench.py's synthetic LLaMA (``44m``: 45.7M parameters) with three rank-8 LoRA seeds on all
seven projections and the demo's character tokenizer, writes the quick demo's validation and
test splits (150 prompt/answer rows each) as JSONL, then in one process runs ``select`` with the
default methods and grid (10 candidates), answer_logprob, four ways:

1. sequential, torch on one thread, the base kept loaded for adapter scorings (the default);
2. the same with a load per scoring (what select did before), base loads counted in both;
3. sequential with torch on two threads (the machine's cores, one process);
4. ``--ray``: a local Ray runtime over this machine, one CPU per task (``--gpus-per-task`` with
   ``--device cuda``), as many tasks at once as fit, Ray's start and stop included.

A first, untimed select pays the imports, first loads and each kernel's first call. Reports each run's
seconds and the ratios (Ray / sequential on one thread, target <= 0.65 on a 2-core machine;
Ray / sequential on two threads; kept base / a load per scoring), and checks that the runs on
one thread (Ray's workers have one each) give the same select.json byte for byte, and that two
threads (another reduction order: the scores' last digits move) make the same choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from bench import SIZES, build_models, machine  # noqa: E402
from select_sweep import jsonl_splits  # noqa: E402


def models_and_splits(root: Path, size: str):
    """bench.py's base and LoRA seeds with the demo's tokenizer, and the quick demo's splits."""
    from mergekit_seed.tools.demo.pipeline import DemoConfig, experiment_data
    from mergekit_seed.tools.demo.task import CharVocabulary, char_tokenizer

    base, _, loras, parameters = build_models(root / "models", size, 3)
    char_tokenizer(CharVocabulary()).save_pretrained(str(base))
    _, validation, test = experiment_data(DemoConfig.for_mode(quick=True), 0)
    return base, loras, parameters, *jsonl_splits(root, validation, test)


def counting_base_loads(base: Path):
    """Patch transformers' loader to count loads of ``base``; returns the counter (a list)."""
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, folder, *args, **kwargs):
        if Path(folder) == base:
            loads.append(1)
        return original(cls, folder, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(counted)
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="44m", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpus-per-task", type=float, default=0.5, help="with --device cuda: Ray's GPUs per task")
    parser.add_argument("--out", type=Path, default=Path("select-scale.json"))
    args = parser.parse_args()

    import mergekit_seed.tools.selection as selection_package
    from mergekit_seed.quiet import quiet_libraries
    from mergekit_seed.tools.selection import select, sweep
    from mergekit_seed.tools.selection.workers import RaySettings

    quiet_libraries()
    original_plan = sweep.plan_selection
    seconds, records, loads = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, seeds, parameters, validation, test = models_and_splits(root, args.size)
        counter = counting_base_loads(base)
        settings = dict(metric="answer_logprob", device=args.device, quiet=True, warn=lambda _message: None)

        def run(name: str, threads: int, share_base: bool = True, ray=None) -> None:
            def plan_selection(*plan_args, **plan_kwargs):
                plan = original_plan(*plan_args, **plan_kwargs)
                plan.scorer = dataclasses.replace(plan.scorer, share_base=share_base)
                return plan

            selection_package.plan_selection = plan_selection  # where select() finds it
            torch.set_num_threads(threads)
            counter.clear()
            started = time.perf_counter()
            record = select(
                [str(s) for s in seeds], str(base), validation, test, root / name, ray=ray, echo=print, **settings
            )
            seconds[name] = round(time.perf_counter() - started, 2)
            records[name] = (root / name / "select.json").read_text(encoding="utf-8")
            if ray is None:
                loads[name] = len(counter)
            print(f"{name}: {seconds[name]} s, winner {record['chosen']['candidate']}", flush=True)

        run("warm_up", 1)  # imports, first loads and each kernel's first call, paid once, not counted
        run("sequential_kept_base", 1)
        run("sequential_load_per_scoring", 1, share_base=False)
        run("sequential_two_threads", 2)
        gpus = args.gpus_per_task if args.device == "cuda" else 0.0
        run("ray", 1, ray=RaySettings(cpus_per_task=1.0, gpus_per_task=gpus))
    for counted in (seconds, records, loads):
        counted.pop("warm_up")
    one_thread = {name: text for name, text in records.items() if name != "sequential_two_threads"}
    same = len(set(one_thread.values())) == 1
    two = json.loads(records["sequential_two_threads"])
    result = {
        "model_parameters": parameters,
        "seeds": "3 LoRA adapters, rank 8, on all seven projections",
        "candidates": len(json.loads(records["ray"])["candidates"]),
        "validation_and_test_examples": 150,
        "metric": "answer_logprob",
        "seconds": seconds,
        "base_loads": loads,
        "ray_over_sequential_one_thread": round(seconds["ray"] / seconds["sequential_kept_base"], 3),
        "ray_over_sequential_two_threads": round(seconds["ray"] / seconds["sequential_two_threads"], 3),
        "kept_base_over_load_per_scoring": round(
            seconds["sequential_kept_base"] / seconds["sequential_load_per_scoring"], 3
        ),
        "select_json_identical_at_one_thread": same,  # sequential either way, and Ray's workers (one thread each)
        # two threads reduce in another order: the last digits of scores move, the choice must not
        "two_threads_same_choice": two["chosen"] == json.loads(records["ray"])["chosen"],
        "machine": machine(args.device),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if not same:
        for name, text in one_thread.items():
            args.out.with_suffix(f".{name}.json").write_text(text, encoding="utf-8")
        raise SystemExit(f"the runs' select.json differ (each written beside {args.out})")


if __name__ == "__main__":
    main()

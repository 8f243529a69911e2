"""Choose the demo's configuration by the seeds alone (issue 24): no merge is run here.

For a candidate base and fine-tuning setting, pre-train the base (cached), fine-tune three
seeds, and report on the validation split what the regime criteria look at: each skill's
mean seed accuracy (wanted between 20% and 90%), the share of examples on which the seeds
disagree (wanted at least 10%), the seed oracle, and the seconds spent. docs/demo.md records
the candidates tried with this script and the one kept.

    python benchmarks/demo_regime.py --setting lora --hidden 96 --pretrain-steps 1500 --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from mergekit_seed.quiet import quiet_libraries
    from mergekit_seed.tools.demo.pipeline import DemoConfig, cached_base, experiment_data, seed_regime
    from mergekit_seed.tools.demo.task import SKILLS, CharVocabulary, accuracy_by_skill, exact_matches
    from mergekit_seed.tools.demo.train import finetune, load_for_eval

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=["lora", "sera", "full"], default="lora")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--skill-share", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--experiment", type=int, default=0)
    arguments = parser.parse_args()

    default = DemoConfig()
    base_config = default.base
    changes = {
        "hidden_size": arguments.hidden,
        "num_hidden_layers": arguments.layers,
        "pretrain_steps": arguments.pretrain_steps,
        "skill_share": arguments.skill_share,
    }
    base_config = replace(base_config, **{k: v for k, v in changes.items() if v is not None})
    if arguments.hidden is not None:
        base_config = replace(base_config, intermediate_size=2 * arguments.hidden)
    finetune_config = default.finetune[arguments.setting]
    changes = {"steps": arguments.steps, "lr": arguments.lr}
    finetune_config = replace(finetune_config, **{k: v for k, v in changes.items() if v is not None})
    config = replace(default, base=base_config, finetune={**default.finetune, arguments.setting: finetune_config})

    torch.set_num_threads(config.threads)
    quiet_libraries()
    vocabulary = CharVocabulary()
    started = time.perf_counter()
    base = cached_base(config.base, vocabulary, quiet=True)
    base_seconds = time.perf_counter() - started
    train, validation, _ = experiment_data(config, arguments.experiment)
    base_accuracy = accuracy_by_skill(
        validation, exact_matches(load_for_eval(base, base, "full"), validation, vocabulary)
    )
    correct = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for index in range(3):
            seed_path = finetune(
                base,
                Path(folder) / f"seed{index}",
                train,
                finetune_config,
                1000 * arguments.experiment + index,
                vocabulary,
                quiet=True,
            )
            correct.append(exact_matches(load_for_eval(base, seed_path, arguments.setting), validation, vocabulary))
    finetune_seconds = (time.perf_counter() - started) / 3
    regime = seed_regime(validation, correct)
    report = {
        "base": config.base.__dict__,
        "finetune": finetune_config.__dict__,
        "base_seconds": round(base_seconds, 1),
        "seconds_per_seed": round(finetune_seconds, 1),
        "base_accuracy": {skill: round(base_accuracy[skill], 3) for skill in list(SKILLS) + ["all"]},
        "seed_accuracy": [round(accuracy_by_skill(validation, c)["all"], 3) for c in correct],
        **regime,
        "mean_seed_accuracy": statistics.fmean(accuracy_by_skill(validation, c)["all"] for c in correct),
    }
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()

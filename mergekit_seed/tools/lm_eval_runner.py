"""Running lm-evaluation-harness on model folders, adapters included (``compare --tasks``,
``select --validation-tasks``): ``lm_eval.simple_evaluate`` with the HF backend on a model
loaded as ``compare`` loads it, one model in memory at a time, writing lm-eval's own files
(``results_*.json``, ``samples_*.jsonl``) into a folder of an open output folder's staging."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import List, Optional, Sequence

from mergekit_seed.errors import UserError
from mergekit_seed.output import staged_path
from mergekit_seed.references.adapter_files import is_adapter_folder
from mergekit_seed.references.hub import local_folder
from mergekit_seed.tools.compare import (
    KeptBase,
    load_model,
    tokenizer_folder,
)


RESULTS_GLOB = "results_*.json"


INSTALL_HINT = "pip install 'mergekit-seed[eval]'"


def evaluate_models(
    models: Sequence[str],
    out: Path,
    tasks: Sequence[str],
    base: Optional[str] = None,
    tokenizer: Optional[str] = None,
    device: str = "cpu",
    batch_size: int = 16,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    include_path: Optional[str] = None,
    quiet: bool = False,
    kept: Optional[KeptBase] = None,
) -> List[Path]:
    """Run lm-eval (HF backend, ``log_samples=True``) on each model, one in memory at a time
    (with ``kept``, adapters on the base it keeps loaded), writing lm-eval's own files to
    ``out/<n>-<name>``; returns those folders."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"--tasks runs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    if quiet:
        logging.getLogger("lm-eval").setLevel(logging.WARNING)
    manager = task_manager(TaskManager, tasks, include_path)
    for name in models:  # before any model is loaded
        tokenizer_folder(name, base, tokenizer)
    folders = []
    for index, name in enumerate(models):
        model, model_tokenizer = load_model(name, base, device, tokenizer, kept)
        lm = HFLM(pretrained=model, tokenizer=model_tokenizer, batch_size=batch_size)
        tracker = EvaluationTracker(output_path=str(staged_path(out)))
        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=True,
                evaluation_tracker=tracker,
                task_manager=manager,
            )
        except ConnectionError as error:  # datasets' "Couldn't reach ... on the Hub", offline or not
            raise UserError(
                f"--tasks {','.join(tasks)}: lm-eval could not fetch a task's dataset ({str(error).splitlines()[0]}); "
                "run once with network access so that the datasets cache holds it, then offline runs read it from "
                "there"
            ) from None
        finally:
            if kept is not None:
                kept.take_off(model)
        if results is None:
            raise UserError(f"{name}: lm-eval returned no results")
        folders.append(_save_run(tracker, results, name, index, base, out))
        del model, lm
        gc.collect()
    return folders


def task_manager(task_manager_class, tasks: Sequence[str], include_path: Optional[str]):
    """lm-eval's task manager, once every task in ``tasks`` is known to it."""
    manager = task_manager_class(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        hint = (
            "; pass --include-path for your own task YAML files"
            if include_path is None
            else f" (nor in {include_path})"
        )
        raise UserError(f"--tasks: lm-eval knows no task {', '.join(unknown)}{hint}")
    return manager


def _save_run(tracker, results: dict, name: str, index: int, base: Optional[str], out: Path) -> Path:
    """Write one model's lm-eval results and samples to ``out/<index>-<name>``, as lm-eval's
    own files, with the model recorded as the user named it; returns that folder."""
    # an LM object carries no model_args: record the model as the user named it
    if is_adapter_folder(local_folder(name)):  # the rule load_model follows
        results["config"]["model_args"] = {"peft": name, **({"pretrained": base} if base else {})}
    else:
        results["config"]["model_args"] = {"pretrained": name}
    tracker.general_config_tracker.model_name = name
    tracker.general_config_tracker.model_name_sanitized = f"{index}-{Path(name).name or 'model'}"
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    folder = out / tracker.general_config_tracker.model_name_sanitized
    if not any(folder.glob(RESULTS_GLOB)):  # lm-eval logs a failed write as a warning
        raise UserError(f"{folder}: lm-eval could not write its results; check the folder is writable")
    return folder

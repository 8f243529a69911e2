"""Running lm-evaluation-harness on model folders, adapters included (``compare --tasks``,
``select --validation-tasks``): ``lm_eval.simple_evaluate`` with the HF backend on a model
loaded as ``compare`` loads it, one model in memory at a time, writing lm-eval's own files
(``results_*.json``, ``samples_*.jsonl``) into a folder of an open output folder's staging."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergekit_seed.errors import UserError
from mergekit_seed.output import staged_path
from mergekit_seed.references.adapter_files import is_adapter_folder, peft_type
from mergekit_seed.references.hub import local_folder
from mergekit_seed.tools.compare import (
    KeptBase,
    checked_model_files,
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
    backend: Optional[LmEvalBackend] = None,
) -> List[Path]:
    """Run lm-eval (``log_samples=True``) on each model, one in memory at a time, writing
    lm-eval's own files to ``out/<n>-<name>``; returns those folders. Each model is loaded as
    ``compare`` loads it (with ``kept``, adapters on the base it keeps loaded) for lm-eval's HF
    backend, or by lm-eval's own ``backend`` with its arguments."""
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
        model, how = _model_for_lm_eval(HFLM, name, base, tokenizer, device, batch_size, kept, backend)
        tracker = EvaluationTracker(output_path=str(staged_path(out)))
        settings = {"num_fewshot": num_fewshot, "limit": limit, "evaluation_tracker": tracker, "task_manager": manager}
        try:
            results = _simple_evaluate(simple_evaluate, how, tasks, backend, settings)
        finally:
            if kept is not None and model is not None:
                kept.take_off(model)
        if results is None:
            raise UserError(f"{name}: lm-eval returned no results")
        folders.append(_save_run(tracker, results, name, index, base, out, backend))
        del model, how
        gc.collect()
    return folders


def _simple_evaluate(simple_evaluate, how: Dict[str, Any], tasks: Sequence[str], backend, settings: dict):
    """lm-eval's ``simple_evaluate`` of the model ``how`` names on ``tasks`` (with
    ``log_samples``), a missing backend package or an unreachable dataset one line."""
    try:
        return simple_evaluate(**how, tasks=list(tasks), log_samples=True, **settings)
    except ImportError as error:
        if backend is None:
            raise
        # a backend whose own package is missing (vllm): lm-eval imports it when the backend is built
        raise UserError(f"--lm-eval-model {backend.model}: {str(error).splitlines()[0]}") from None
    except ConnectionError as error:  # datasets' "Couldn't reach ... on the Hub", offline or not
        raise UserError(
            f"--tasks {','.join(tasks)}: lm-eval could not fetch a task's dataset ({str(error).splitlines()[0]}); "
            "run once with network access so that the datasets cache holds it, then offline runs read it from "
            "there"
        ) from None


def _model_for_lm_eval(hf_lm, name, base, tokenizer, device, batch_size, kept, backend) -> Tuple[Any, Dict[str, Any]]:
    """(the model we loaded, or None; ``simple_evaluate``'s arguments for it): our loader's
    model in lm-eval's HF backend (``hf_lm``), or ``backend``'s name and arguments, for lm-eval
    to load the files load_model would read, checked the same way."""
    if backend is None:
        model, model_tokenizer = load_model(name, base, device, tokenizer, kept)
        return model, {"model": hf_lm(pretrained=model, tokenizer=model_tokenizer, batch_size=batch_size)}
    arguments = backend.arguments(name, base, tokenizer)
    return None, {"model": backend.model, "model_args": arguments, "batch_size": batch_size, "device": device}


# the argument of lm-eval's backend that takes a LoRA adapter's folder (lm-eval's --model_args)
ADAPTER_ARGUMENTS = {"hf": "peft", "vllm": "lora_local_path"}
# what the scored model sets itself, once per model: the rest of --model-args is lm-eval's
OWN_ARGUMENTS = ("pretrained", "peft", "lora_local_path", "tokenizer", "batch_size", "device")
# credentials: --model-args are recorded in select.json, the card and lm-eval's files
SECRET_ARGUMENTS = ("token", "use_auth_token", "api_key", "hf_token")


@dataclass(frozen=True)
class LmEvalBackend:
    """``--lm-eval-model NAME --model-args K=V,...``: lm-eval's own backend (its ``--model``)
    loads each scored model, with the user's arguments (its ``--model_args``) besides the
    model's folder, its adapter's and its tokenizer's, which are set per model."""

    model: str = "hf"
    model_args: str = ""

    @property
    def user_arguments(self) -> Dict[str, Any]:
        """The user's ``--model-args``, as lm-eval parses them."""
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(self.model_args)

    def check(self) -> None:
        """Refuse, in one line, arguments that cannot hold (before anything runs)."""
        for piece in filter(None, (part.strip() for part in self.model_args.split(","))):
            if "=" not in piece:
                raise UserError(f"--model-args {self.model_args}: {piece!r} is not KEY=VALUE (lm-eval's --model_args)")
        try:
            from lm_eval.api.registry import get_model
        except ImportError:
            raise UserError(
                f"--lm-eval-model runs lm-evaluation-harness, which is not installed; {INSTALL_HINT}"
            ) from None
        try:
            get_model(self.model)
        except (ValueError, KeyError, ImportError) as error:
            raise UserError(f"--lm-eval-model {self.model}: {str(error).splitlines()[0]}") from None
        secret = [key for key in self.user_arguments if key in SECRET_ARGUMENTS]
        if secret:
            raise UserError(
                f"--model-args {secret[0]}=...: it would be written into the record and the card; set HF_TOKEN in the "
                "environment instead (its value is never published)"
            )
        taken = [key for key in self.user_arguments if key in OWN_ARGUMENTS]
        if taken:
            raise UserError(
                f"--model-args {taken[0]}=...: set per scored model (the folder, adapter and tokenizer) or by "
                "--batch-size and --device; leave it out"
            )

    def arguments(self, name: str, base: Optional[str], tokenizer: Optional[str]) -> Dict[str, Any]:
        """lm-eval's ``model_args`` for scoring ``name``: its folder (an adapter: its base's,
        and the adapter's under this backend's argument for it), its tokenizer's, and the
        user's."""
        folder = local_folder(name)
        arguments: Dict[str, Any] = {"tokenizer": str(tokenizer_folder(name, base, tokenizer))}
        adapter = checked_model_files(name, base)
        if adapter is None:
            arguments["pretrained"] = str(folder)
        else:
            config, base_folder = adapter
            if peft_type(config) != "LORA" or self.model not in ADAPTER_ARGUMENTS:
                raise UserError(
                    f"{name}: lm-eval's {self.model} backend cannot load this {peft_type(config)} adapter (lm-eval "
                    f"passes LoRA adapters to {' and '.join(ADAPTER_ARGUMENTS)}); leave --lm-eval-model out to score "
                    "it with our loader"
                )
            arguments.update({"pretrained": str(base_folder), ADAPTER_ARGUMENTS[self.model]: str(folder)})
        return {**arguments, **self.user_arguments}


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


def _save_run(
    tracker, results: dict, name: str, index: int, base: Optional[str], out: Path, backend: Optional[LmEvalBackend]
) -> Path:
    """Write one model's lm-eval results and samples to ``out/<index>-<name>``, as lm-eval's
    own files, with the model recorded as the user named it; returns that folder."""
    # an LM object carries no model_args, and a backend's hold local folders: the model as the user named it
    if is_adapter_folder(local_folder(name)):  # the rule load_model follows
        model_args = {"peft": name, **({"pretrained": base} if base else {})}
    else:
        model_args = {"pretrained": name}
    results["config"]["model_args"] = {**model_args, **(backend.user_arguments if backend else {})}
    if backend is not None:
        results["config"]["model"] = backend.model
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

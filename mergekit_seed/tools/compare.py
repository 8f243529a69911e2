"""``mergekit-seed compare``: does the merge beat my best seed, on my data, with an interval?

Every model (full checkpoints, PEFT LoRA or SeRA adapters on their base; local folders or Hub
ids) is scored example by example on a JSONL file, one model in memory at a time:

- ``{"text": ...}`` rows: ``perplexity`` (token level). The per-example score is the mean
  log-probability per token; the model's figure is exp(-total log-probability / total tokens).
- ``{"prompt": ..., "answer": ...}`` rows: ``answer_logprob`` (log-probability of the answer's
  tokens given the prompt's; no generation), ``exact_match`` (lm-eval's rule for a
  ``generate_until`` task: greedy decoding until the end-of-sequence token or a stop string,
  default a newline, and the text before it must be the answer, surrounding whitespace aside)
  or ``prefix_match`` (the first tokens, as many as the answer has, must be the answer, whether
  or not the model stops there: the rule ``exact_match`` had before it matched lm-eval's).

Each model is compared with a reference (``--reference``, default the best of the models that
are not merges: the best seed) by the paired per-example differences, with the bootstrap
interval and verdict of :mod:`mergekit_seed.maths.stats` (the demo's verdict uses the same code).
"""

from __future__ import annotations

import difflib
import gc
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from mergekit_seed.errors import UserError
from mergekit_seed.finite import report_json, require_finite_number
from mergekit_seed.installed import package_version
from mergekit_seed.maths.stats import paired_difference
from mergekit_seed.output import OutputFolder, local_paths, staged_path, write_text
from mergekit_seed.reader import read_lines, read_text
from mergekit_seed.references.adapter_files import is_adapter_folder, peft_type, read_adapter_config
from mergekit_seed.references.hub import local_folder
from mergekit_seed.references.sera_files import load_sera
from mergekit_seed.references.sera_layer import PEFT_TYPE as SERA_TYPE
from mergekit_seed.references.sera_layer import sera_layers, unload_sera
from mergekit_seed.references.weights import safetensors_shapes
from mergekit_seed.untrusted import bounded_safe_load, front_matter


METRICS = ("perplexity", "answer_logprob", "exact_match", "prefix_match")
TEXT_METRICS = ("perplexity",)
ANSWER_METRICS = ("answer_logprob", "exact_match", "prefix_match")
GENERATED = ("exact_match", "prefix_match")
HIGHER_IS_BETTER = {"perplexity": False, "answer_logprob": True, "exact_match": True, "prefix_match": True}
DEFAULT_STOP = ("\n",)  # lm-eval's usual `until` for short answers
# tokens decoded past the longest answer of a batch, for the model to reach its stop (or show it does not)
GENERATION_MARGIN = 16


DEFAULT_GROUP_KEY = "group"


@dataclass(frozen=True)
class Row:
    """One example: ``text`` (perplexity) or ``prompt`` and ``answer``, and the group (a
    sub-skill, a source) it belongs to, if the data says."""

    text: Optional[str] = None
    prompt: Optional[str] = None
    answer: Optional[str] = None
    group: Optional[str] = None


def _group_of(record: dict, key: str, where: str) -> Optional[str]:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f'{where}: "{key}" must be a string or an integer naming the row\'s group')
    return str(value)


def read_data(path: Path, group_by: Optional[str] = None) -> Tuple[str, List[Row]]:
    """The rows of a JSONL file and their kind (``text`` or ``answer``); one line per problem.
    Each row's group is its ``group_by`` field (default ``"group"``): every row has one, or none
    does (a ``group_by`` named explicitly must be there)."""
    key = group_by or DEFAULT_GROUP_KEY
    lines = read_lines(path, "JSONL data file")
    rows: List[Row] = []
    kinds = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply; a row is one flat object") from None
        group = _group_of(record, key, f"{path}:{number}") if isinstance(record, dict) else None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            rows.append(Row(text=record["text"], group=group))
            kinds.add("text")
        elif (
            isinstance(record, dict)
            and isinstance(record.get("prompt"), str)
            and isinstance(record.get("answer"), str)
        ):
            rows.append(Row(prompt=record["prompt"], answer=record["answer"], group=group))
            kinds.add("answer")
        else:
            raise UserError(f'{path}:{number}: needs a string "text", or strings "prompt" and "answer"')
        if len(kinds) > 1:
            raise UserError(f'{path}:{number}: mixes "text" rows with "prompt"/"answer" rows; use one kind per file')
        if (group is None) != (rows[0].group is None):
            raise UserError(
                f'{path}:{number}: has no "{key}" where other rows have one, or the reverse; '
                "give every row a group, or none"
            )
    if not rows:
        raise UserError(f"{path}: no examples (one JSON object per line)")
    if group_by is not None and rows[0].group is None:
        raise UserError(f'--group-by {group_by}: no row of {path} has a "{group_by}" field')
    return kinds.pop(), rows


def groups_of(rows: Sequence[Row]) -> Dict[str, List[int]]:
    """{group: the indices of its rows}, in the order groups first appear; {} without groups."""
    found: Dict[str, List[int]] = {}
    for index, row in enumerate(rows):
        if row.group is not None:
            found.setdefault(row.group, []).append(index)
    return found


def choose_metric(kind: str, metric: Optional[str], path: Path) -> str:
    if metric is None:
        return "perplexity" if kind == "text" else "answer_logprob"
    allowed = TEXT_METRICS if kind == "text" else ANSWER_METRICS
    if metric not in allowed:
        rows = '"text"' if kind == "text" else '"prompt"/"answer"'
        hint = difflib.get_close_matches(metric, METRICS, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint and hint[0] in allowed else ""
        raise UserError(f"--metric {metric}: {path} has {rows} rows, which give {' or '.join(allowed)}{suggestion}")
    return metric


# ------------------------------------------------------------------ models


def is_merge(folder: Path) -> bool:
    """A mergekit or mergekit-seed output: its card is tagged ``merge``, or mergekit's config is there."""
    if (folder / "mergekit_config.yml").is_file():
        return True
    card = folder / "README.md"
    if not card.is_file():
        return False
    try:
        front = front_matter(read_text(card, "model card", within=folder))
        metadata = bounded_safe_load(front, str(card)) if front is not None else None
    except (UserError, yaml.YAMLError):
        return False
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return isinstance(tags, list) and "merge" in tags


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _adapter_config(folder: Path) -> Optional[dict]:
    """The adapter's settings when ``folder`` is an adapter (an ``adapter_config.json`` and no
    full-model weights, the rule merges follow)."""
    return read_adapter_config(folder) if is_adapter_folder(folder) else None


def _base_reference(reference: str, config: dict, base: Optional[str]) -> str:
    base_reference = base or config.get("base_model_name_or_path")
    if not base_reference:
        raise UserError(f"{reference}: an adapter whose config names no base model; pass --base")
    return base_reference


def tokenizer_folder(reference: str, base: Optional[str], tokenizer_path: Optional[str] = None) -> Path:
    """Where the tokenizer of ``reference`` comes from: ``tokenizer_path``, else the model's
    folder, else (adapters) the base's. A folder without tokenizer files is refused: transformers
    5 would build an empty tokenizer that scores nothing."""
    if tokenizer_path is not None:
        folder = local_folder(tokenizer_path)
    else:
        folder = local_folder(reference)
        config = _adapter_config(folder)
        if config is not None and not _has_tokenizer(folder):
            folder = local_folder(_base_reference(reference, config, base))
    if not _has_tokenizer(folder):
        raise UserError(
            f"{reference}: no tokenizer files in {folder} ({', '.join(TOKENIZER_FILES[:2])}, ...); "
            "copy them from the model it was fine-tuned from, or pass --tokenizer PATH"
        )
    return folder


def checked_model_files(reference: str, base: Optional[str]) -> Optional[Tuple[dict, Path]]:
    """Check the weight files of ``reference`` (and of its base, for an adapter) before a
    loader reads them, so that a corrupt or truncated file is one line; for an adapter, return
    (its config, its base's folder), else None."""
    folder = local_folder(reference)
    safetensors_shapes(folder)
    config = _adapter_config(folder)
    if config is None:
        return None
    base_folder = local_folder(_base_reference(reference, config, base))
    safetensors_shapes(base_folder)
    return config, base_folder


class KeptBase:
    """A base model kept loaded in this process for the adapters scored on it one after another
    (``select``'s seeds and candidates): :func:`load_model` puts each adapter on the kept base
    and :meth:`take_off` takes it off after its scoring (PEFT's ``unload``,
    :func:`~mergekit_seed.references.sera_layer.unload_sera`), which leaves the base's modules
    and weights as they were loaded, so that a score is a fresh load's. ``loads`` counts the
    base's loads."""

    def __init__(self) -> None:
        self._key: Optional[Tuple[str, str]] = None
        self._model = None
        self._lent = False
        self.loads = 0

    def model(self, base_folder: Path, device: str):
        """The base loaded from ``base_folder`` on ``device``: the kept one, or a new load."""
        from transformers import AutoModelForCausalLM

        key = (str(base_folder), device)
        if self._key != key or self._model is None:
            self.clear()
            self._model = AutoModelForCausalLM.from_pretrained(base_folder).to(device).eval()
            self._key = key
            self.loads += 1
        model, self._model, self._lent = self._model, None, True  # lent out until take_off gives it back
        return model

    def take_off(self, model) -> None:
        """Take the adapter off ``model`` (what :func:`load_model` gave) and keep its base; a
        full model (not on the kept base) is left alone."""
        if not self._lent:
            return
        self._lent = False
        self._model = unload_sera(model) if sera_layers(model) else model.unload()

    def clear(self) -> None:
        """Let the kept base go."""
        self._key = self._model = None
        self._lent = False
        gc.collect()


def load_model(
    reference: str,
    base: Optional[str],
    device: str,
    tokenizer_path: Optional[str] = None,
    kept: Optional[KeptBase] = None,
):
    """``(model, tokenizer)`` for a full checkpoint, or an adapter applied to its base (with
    ``kept``, to the base it keeps loaded: give the model back with ``kept.take_off``); the
    tokenizer from :func:`tokenizer_folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_folder(reference)
    tokenizer_source = tokenizer_folder(reference, base, tokenizer_path)
    adapter = checked_model_files(reference, base)
    if adapter is not None:
        config, base_folder = adapter
        model = kept.model(base_folder, device) if kept else AutoModelForCausalLM.from_pretrained(base_folder)
        try:
            if peft_type(config) == SERA_TYPE:
                model = load_sera(model, folder)
            else:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, folder)
        except BaseException:
            if kept is not None:  # a base half-changed by a failed adapter is not kept
                kept.clear()
            raise
    else:
        if kept is not None:  # one model in memory at a time: a full model does not sit beside the kept base
            kept.clear()
        model = AutoModelForCausalLM.from_pretrained(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:
        if kept is not None:
            kept.take_off(model)
        raise UserError(
            f"{reference}: no usable tokenizer in {tokenizer_source} ({str(error).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------ scoring


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped by equal length (no padding), at most ``batch_size`` per batch."""
    groups: Dict[int, List[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in groups.values()
        for start in range(0, len(indices), batch_size)
    ]


def score_rows(
    model,
    tokenizer,
    rows: Sequence[Row],
    metric: str,
    batch_size: int = 16,
    device: str = "cpu",
    advance: Callable[[int], None] = lambda _count: None,
    stop: Sequence[str] = DEFAULT_STOP,
) -> List[Tuple[float, int]]:
    """Per row: (score, token count). perplexity: (sum of token log-probabilities, tokens
    predicted); answer_logprob: (log p(answer | prompt), answer tokens); exact_match and
    prefix_match: (1 or 0, answer tokens), :func:`exact_match_hit` and :func:`prefix_match_hit`
    (``stop``: exact match's stop strings)."""
    import torch

    if metric == "perplexity":
        sequences = [_encode(tokenizer, row.text, True) for row in rows]
        starts = [1] * len(rows)
    else:
        prompts = [_encode(tokenizer, row.prompt, True) for row in rows]
        answers = [_encode(tokenizer, row.answer, False) for row in rows]
        sequences = [p + a for p, a in zip(prompts, answers)]
        starts = [len(p) for p in prompts]
    context = context_length(model)
    for index, (sequence, start) in enumerate(zip(sequences, starts)):
        if start < 1 or len(sequence) <= start:
            raise UserError(
                f"example {index + 1}: nothing to score once tokenized (empty text or answer, or no prompt token)"
            )
        if context is not None and len(sequence) > context:
            # past its positions a model either fails (GPT-2) or scores garbage without a word (RoPE)
            raise UserError(
                f"example {index + 1}: {len(sequence)} tokens, more than the model's context of {context}; "
                "shorten or split it, or leave it out (compare does not truncate: that would change what is scored)"
            )
    results: List[Tuple[float, int]] = [(0.0, 0)] * len(rows)
    with torch.no_grad():
        if metric in GENERATED:
            _generated_scores(model, tokenizer, sequences, starts, metric, batch_size, device, stop, results, advance)
            return results
        for batch in _batches([len(s) for s in sequences], batch_size):
            ids = torch.tensor([sequences[i] for i in batch], device=device)
            logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            # position t predicts token t + 1
            token_logprobs = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            for row, row_index in enumerate(batch):
                kept = token_logprobs[row, starts[row_index] - 1 :]
                results[row_index] = (float(kept.double().sum()), int(kept.numel()))
            advance(len(batch))
    return results


def _generated_scores(model, tokenizer, sequences, starts, metric, batch_size, device, stop, results, advance) -> None:
    """exact_match or prefix_match of every row into ``results``, a batch of equal prompts at a time."""
    import torch

    context = context_length(model)
    ends = end_token_ids(model, tokenizer) if metric == "exact_match" else []
    for batch in _batches(starts, batch_size):
        ids = torch.tensor([sequences[i][: starts[i]] for i in batch], device=device)
        longest = max(len(sequences[i]) - starts[i] for i in batch)
        length = longest if metric == "prefix_match" else longest + GENERATION_MARGIN
        if context is not None:
            length = max(longest, min(length, context - ids.shape[1]))
        generated = greedy_continuation(model, ids, length, end_token_ids=ends).tolist()
        for row_index, row in zip(batch, generated):
            start, answer = starts[row_index], sequences[row_index][starts[row_index] :]
            if metric == "exact_match":
                hit = exact_match_hit(tokenizer, row[start:], answer, stop, ends)
            else:
                hit = prefix_match_hit(tokenizer, row[start : start + len(answer)], answer)
            results[row_index] = (float(hit), len(answer))
        advance(len(batch))


def end_token_ids(model, tokenizer) -> List[int]:
    """The tokens that end a generation: the model's generation config's ``eos_token_id`` (one id or
    several, as Llama 3's end of turn and end of text), which is where transformers' ``generate``
    and so lm-eval stop, and the tokenizer's end-of-sequence token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    ends: List[int] = []
    for token in [*ids, tokenizer.eos_token_id]:
        if isinstance(token, int) and token not in ends:
            ends.append(token)
    return ends


def exact_match_hit(
    tokenizer, continuation: List[int], answer: List[int], stop: Sequence[str], end_ids: Sequence[int] = ()
) -> bool:
    """lm-eval's ``exact_match`` of a ``generate_until`` task: the greedy continuation up to and
    including the first of ``end_ids`` (:func:`end_token_ids`), decoded without special tokens,
    cut at the first of the ``stop`` strings (lm-eval's ``until``) and at the tokenizer's
    end-of-sequence text (which lm-eval adds to them), equals the answer, surrounding whitespace
    aside. The answer is compared as the tokenizer decodes its tokens (the answer itself for a
    tokenizer that round-trips text; for one whose decoder joins tokens with spaces, as the
    generation is joined)."""
    for index, token in enumerate(continuation):
        if token in end_ids:
            continuation = continuation[: index + 1]
            break
    text = tokenizer.decode(continuation, skip_special_tokens=True)
    for term in [*stop, tokenizer.eos_token]:
        if isinstance(term, str) and term:
            text = text.split(term)[0]
    return text.strip() == tokenizer.decode(answer, skip_special_tokens=True).strip()


def prefix_match_hit(tokenizer, continuation: List[int], answer: List[int]) -> bool:
    """The continuation's first tokens, as many as the answer has, decode to the answer (whitespace
    normalised): what the model says first, whether or not it stops after it."""
    text, expected = (tokenizer.decode(tokens, skip_special_tokens=True) for tokens in (continuation, answer))
    return " ".join(text.split()) == " ".join(expected.split())


def greedy_continuation(model, ids, length: int, end_token_ids: Sequence[int] = ()):
    """``ids`` (batch, prompt) followed by up to ``length`` greedily decoded tokens: transformers'
    ``generate`` with its KV cache, and nothing but the argmax, stopping a row at any of
    ``end_token_ids`` (the rest of it padded). The model's own generation config (its
    end-of-sequence stop, a repetition penalty, suppressed tokens) is set aside for the call, so
    every model is scored on the same rule."""
    import torch
    from transformers import GenerationConfig

    greedy = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=length,
        eos_token_id=list(end_token_ids),
        pad_token_id=end_token_ids[0] if end_token_ids else 0,
    )
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
    finally:
        model.generation_config = own


def context_length(model) -> Optional[int]:
    """The number of positions the model was built for (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def per_example(scores: Sequence[Tuple[float, int]], metric: str) -> List[float]:
    """The per-example value compared between models, oriented so that higher is better:
    mean log-probability per token for perplexity, the score itself otherwise."""
    if metric == "perplexity":
        return [total / count for total, count in scores]
    return [score for score, _ in scores]


def summary(scores: Sequence[Tuple[float, int]], metric: str) -> float:
    """The model's figure: perplexity exp(-sum log p / tokens); otherwise the mean score."""
    if metric == "perplexity":
        return math.exp(-sum(total for total, _ in scores) / sum(count for _, count in scores))
    return sum(score for score, _ in scores) / len(scores)


# ------------------------------------------------------------------ comparison


def compare(models: Sequence[str], data: Path, out: Path, labels: Optional[Dict[str, str]] = None, **settings) -> dict:
    """Score ``models`` on ``data``, compare each with the reference, and publish compare.json,
    compare.md and compare.png in ``out`` (:class:`~mergekit_seed.output.OutputFolder`: an
    earlier ``compare`` report there is replaced; a folder holding anything else, or an input,
    is refused); ``labels`` name local models in what is published and printed (default: as
    given, absolute paths by their folder names); ``settings`` are :func:`compare_into`'s.
    Returns what compare.json holds."""
    inputs = local_paths([*models, data, settings.get("base"), settings.get("tokenizer")])
    echo = settings.get("echo", print)
    with OutputFolder(out, inputs, command="compare", report=True, labels=labels) as output:
        results = compare_into(models, data, output.staging, **settings)
        output.publish()
    echo(output.public(format_table(results)))
    return results


def score_model(
    name: str,
    rows: Sequence[Row],
    metric: str,
    base: Optional[str],
    tokenizer: Optional[str],
    batch_size: int,
    device: str,
    advance: Callable[[int], None] = lambda _count: None,
    stop: Sequence[str] = DEFAULT_STOP,
    kept: Optional[KeptBase] = None,
) -> List[Tuple[float, int]]:
    """One model's (score, tokens) per row (:func:`score_rows`), each score finite; the model is
    freed before the next one loads (one model in memory at a time), or with ``kept``, an
    adapter is taken off the base ``kept`` keeps loaded."""
    model, model_tokenizer = load_model(name, base, device, tokenizer, kept)
    try:
        scores = score_rows(model, model_tokenizer, rows, metric, batch_size, device, advance, stop)
    finally:
        if kept is not None:
            kept.take_off(model)
    for index, (value, _) in enumerate(scores):
        require_finite_number(
            value, f"example {index + 1}: its {metric} score", "the model's weights or outputs hold NaN or Inf"
        )
    del model
    gc.collect()
    return scores


def _versus_reference(
    values: Dict[str, List[float]], reference: str, confidence: float, resamples: int, seed: int
) -> Dict[str, dict]:
    """Each other model's paired per-example difference with ``reference``, with its interval."""
    return {
        name: paired_difference(
            [[a - b for a, b in zip(mine, values[reference])]], confidence, resamples, seed
        ).to_dict()
        for name, mine in values.items()
        if name != reference
    }


def _checked_models(models: Sequence[str], reference: Optional[str], echo: Callable[[str], None]) -> List[str]:
    """``models`` once each (at least two), with ``reference`` among them when given."""
    models = unique_models(models, echo)
    if len(models) < 2:
        raise UserError("compare needs at least two models")
    if reference is not None and reference not in models:
        raise UserError(f"--reference {reference}: not one of the models given")
    return models


def run_record(confidence: float, resamples: int, seed: int) -> dict:
    """How a comparison was made: the interval's confidence, the bootstrap and the versions."""
    return {
        "confidence": confidence,
        "bootstrap": {"resamples": resamples, "seed": seed},
        "versions": {p: package_version(p) for p in ("torch", "transformers", "peft", "mergekit", "mergekit-seed")},
    }


def compare_into(
    models: Sequence[str],
    data: Path,
    out: Path,
    base: Optional[str] = None,
    metric: Optional[str] = None,
    reference: Optional[str] = None,
    batch_size: int = 16,
    device: str = "cpu",
    tokenizer: Optional[str] = None,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = 10_000,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    stop: Sequence[str] = DEFAULT_STOP,
    group_by: Optional[str] = None,
) -> dict:
    """Score ``models`` on ``data``, compare each with the reference (pooled, and per group when
    the rows have groups, ``group_by``), write compare.json, compare.md and compare.png into the
    folder ``out``; returns what compare.json holds. ``stop``: exact_match's stop strings."""
    models = _checked_models(models, reference, echo)
    kind, rows = read_data(data, group_by)
    metric = choose_metric(kind, metric, data)
    folders = {model: local_folder(model) for model in models}
    for model_name in models:  # before any model is loaded
        tokenizer_folder(model_name, base, tokenizer)
    scoring = dict(base=base, tokenizer=tokenizer, batch_size=batch_size, device=device, stop=stop)
    scores = _score_all(models, rows, metric, data, quiet, scoring)
    values = {name: per_example(scores[name], metric) for name in models}
    merges = {name: is_merge(folders[name]) for name in models}
    if reference is None:
        candidates = [name for name in models if not merges[name]] or list(models)
        reference = max(candidates, key=lambda name: statistics.fmean(values[name]))
    bootstrap = (confidence, resamples, seed)
    results = {
        "data": str(data),
        "examples": len(rows),
        "metric": metric,
        **({"stop": list(stop)} if metric == "exact_match" else {}),
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "compared_on": "mean log-probability per token" if metric == "perplexity" else metric,
        "reference": reference,
        "models": {name: {"score": summary(scores[name], metric), "merge": merges[name]} for name in models},
        "versus_reference": _versus_reference(values, reference, *bootstrap),
        **by_group(rows, scores, values, merges, reference, metric, bootstrap),
        **run_record(confidence, resamples, seed),
    }
    panels = [(f"{metric} on {len(rows)} examples", results["versus_reference"])]
    panels += [
        (f"{group}: {entry['examples']} examples", entry["versus_reference"])
        for group, entry in results.get("groups", {}).items()
    ]
    write_outputs(results, out, format_table(results), panels)
    return results


def _score_all(models: Sequence[str], rows: Sequence[Row], metric: str, data: Path, quiet: bool, scoring: dict):
    """{model: (score, tokens) per row}, one model in memory at a time, under one progress bar."""
    from tqdm import tqdm

    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" per model
    scores: Dict[str, List[Tuple[float, int]]] = {}
    with tqdm(total=len(models) * len(rows), desc="Scoring", unit="example", disable=quiet) as progress:
        for model_name in models:
            progress.set_postfix_str(Path(model_name).name)
            try:
                scores[model_name] = score_model(model_name, rows, metric, advance=progress.update, **scoring)
            except UserError as error:
                raise UserError(f"{data}: {error} for {model_name}") from None
    return scores


def by_group(
    rows: Sequence[Row],
    scores: Dict[str, List[Tuple[float, int]]],
    values: Dict[str, List[float]],
    merges: Dict[str, bool],
    reference: str,
    metric: str,
    bootstrap: Tuple[float, int, int],
) -> dict:
    """``{"groups": ..., "oracle": ...}`` when the rows have groups ({} otherwise): each group's
    examples, every model's figure on it and its paired difference with ``reference`` there, and
    the oracle: the best of the models that are not merges (the seeds) on each group, and the
    figure those picks make together, what merging the seeds could win."""
    groups = groups_of(rows)
    if not groups:
        return {}
    seeds = [name for name in scores if not merges[name]] or list(scores)
    entries, picks = {}, {}
    for group, indices in groups.items():
        subset = {name: [values[name][i] for i in indices] for name in values}
        entries[group] = {
            "examples": len(indices),
            "scores": {name: summary([scores[name][i] for i in indices], metric) for name in scores},
            "versus_reference": _versus_reference(subset, reference, *bootstrap),
        }
        picks[group] = max(seeds, key=lambda name: statistics.fmean(subset[name]))
    oracle = [scores[picks[row.group]][index] for index, row in enumerate(rows)]
    return {"groups": entries, "oracle": {"best_seed_per_group": picks, "score": summary(oracle, metric)}}


def unique_models(models: Sequence[str], echo: Callable[[str], None]) -> List[str]:
    """``models`` without repeats; a model given twice is scored once, and the user is told."""
    unique: List[str] = []
    for model in models:
        if model in unique:
            echo(f"note: {model} is given twice; it is scored once")
        else:
            unique.append(model)
    return unique


def write_outputs(results: dict, out: Path, table: str, panels: Sequence[Tuple[str, Dict[str, dict]]]) -> None:
    """compare.json, compare.md (``table``) and compare.png (one panel per (title, versus_reference)) in ``out``."""
    write_text(out / "compare.json", report_json(results, "compare.json"))
    write_text(out / "compare.md", table + "\n")
    plot(panels, results["reference"], results["confidence"], out / "compare.png")


def comparison_table(
    column: str,
    scores: Dict[str, float],
    merges: Dict[str, bool],
    reference: str,
    versus: Dict[str, dict],
    confidence: float,
) -> str:
    """One Markdown table: each model's score, whether it is a merge, its paired difference
    with ``reference`` (interval) and the verdict."""
    lines = [
        f"| model | {column} | merge | versus {reference} ({int(100 * confidence)}% CI) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, score in scores.items():
        if name == reference:
            cell, verdict = "reference", ""
        else:
            difference = versus[name]
            cell = f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"
            verdict = difference["verdict"]
        lines.append(f"| {name} | {score:.4f} | {'yes' if merges[name] else 'no'} | {cell} | {verdict} |")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    metric = results["metric"]
    unit = "per-token log-prob" if metric == "perplexity" else metric
    table = comparison_table(
        metric,
        {name: entry["score"] for name, entry in results["models"].items()},
        {name: entry["merge"] for name, entry in results["models"].items()},
        results["reference"],
        results["versus_reference"],
        results["confidence"],
    )
    legend = (
        f"{results['examples']} examples of {results['data']}; differences in {unit} are paired per example, "
        f"model minus reference (higher is better); better or worse only when the interval excludes 0."
    )
    if metric == "exact_match":
        stops = ", ".join(json.dumps(term) for term in results.get("stop", [])) or "none"
        legend += (
            f" Exact match: the greedy continuation up to the end-of-sequence token or a stop ({stops}) is the answer."
        )
    return "\n\n".join([table, *group_tables(results), legend])


def group_tables(results: dict) -> List[str]:
    """Per group: every model's figure and its paired difference with the reference there; then
    the oracle (the best seed on each group) against the reference."""
    if "groups" not in results:
        return []
    merges = {name: entry["merge"] for name, entry in results["models"].items()}
    parts = []
    for group, entry in results["groups"].items():
        parts.append(f"Group {group} ({entry['examples']} examples):")
        parts.append(
            comparison_table(
                results["metric"], entry["scores"], merges, results["reference"], entry["versus_reference"],
                results["confidence"],
            )
        )  # fmt: skip
    oracle = results["oracle"]
    picks = ", ".join(f"{name} on {group}" for group, name in oracle["best_seed_per_group"].items())
    reference_score = results["models"][results["reference"]]["score"]
    parts.append(
        f"Oracle (the best seed on each group: {picks}): {results['metric']} {oracle['score']:.4f}, against "
        f"{reference_score:.4f} for the reference: what merging the seeds could win."
    )
    return parts


def plot(panels: Sequence[Tuple[str, Dict[str, dict]]], reference: str, confidence: float, path: Path) -> None:
    """One panel per (title, versus_reference): each model's difference with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels[0][1])
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, len(panels) * (1.2 + 0.5 * len(names))), squeeze=False)
    colors = {"better": "tab:green", "worse": "tab:red"}
    for axis, (title, versus) in zip(axes[:, 0], panels):
        for position, name in enumerate(names):
            difference = versus[name]
            axis.errorbar(
                difference["mean"],
                position,
                xerr=[[difference["mean"] - difference["low"]], [difference["high"] - difference["mean"]]],
                fmt="o",
                capsize=3,
                color=colors.get(difference["verdict"], "tab:gray"),
            )
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(names)), [_short(name) for name in names])
        axis.set_title(title)
    axes[-1, 0].set_xlabel(f"versus {_short(reference)} ({int(100 * confidence)}% interval, positive is better)")
    figure.tight_layout()
    figure.savefig(staged_path(path), dpi=120)
    plt.close(figure)


def _short(name: str) -> str:
    """A plot label: the last two parts of a path or Hub id."""
    return "/".join(Path(name).parts[-2:])

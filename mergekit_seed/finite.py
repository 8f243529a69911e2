"""The one finiteness gate: every number that crosses a boundary of the package is checked here.

Tensors read (inputs) and written (merges), tensors compared (``reproduce --check``), scores
and metrics read (JSONL scoring, lm-eval files) and every report written (compare.json,
analysis.json, results.json) go through these functions, so a NaN is never published, never
compared as equal, and never written into a report. Tensors are duck-typed (no torch import).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Tuple

from mergekit_seed.errors import UserError


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, the range our methods compute in


def is_finite_tensor(tensor: Any) -> bool:
    """Whether every value of ``tensor`` is finite (integer and boolean tensors always are).

    By its minimum and maximum: ``aminmax`` propagates a NaN, and an Inf is one of the two. It
    allocates nothing the size of the tensor, where ``isfinite().all()`` does (the measured
    difference: benchmarks/RESULTS.md, the finiteness gate)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = tensor.aminmax()
    return bool(low.isfinite() & high.isfinite())


def require_finite_tensor(tensor: Any, where: str, fix: str) -> None:
    """Refuse ``tensor`` when it holds a NaN or Inf: one line, ``where`` it is, then ``fix``."""
    if not is_finite_tensor(tensor):
        raise UserError(f"{where} contains NaN or Inf; {fix}")


def largest_difference(a: Any, b: Any) -> float:
    """max |a - b| in float64, where a NaN or Inf on either side, even at the same place in
    both, is an infinite difference: ``reproduce --check`` never calls a NaN equal."""
    if a.numel() == 0:
        return 0.0
    if not (is_finite_tensor(a) and is_finite_tensor(b)):
        return math.inf
    return float((a.double() - b.double()).abs().max())


def require_finite_number(
    value: Any, where: str, why: str = "the file is damaged or was not written by this tool"
) -> float:
    """``value`` as a float, refused in one line naming ``where`` (and ``why`` it may be so)
    unless it is a finite number (a bool counts as 0 or 1)."""
    if isinstance(value, (bool, int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if math.isfinite(number):
            return number
    raise UserError(f"{where}: {value!r} is not a finite number; {why}")


def non_finite_numbers(value: Any, path: str = "") -> Iterator[Tuple[str, float]]:
    """(dotted key path, value) of every NaN or Inf float inside nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "(top level)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from non_finite_numbers(item, f"{path}[{index}]")


def report_json(data: Any, name: str) -> str:
    """``data`` as the indented JSON text of report ``name``; a NaN or Inf anywhere in it is
    refused in one line naming its key (JSON has no such numbers; Python would write ``NaN``)."""
    for path, value in non_finite_numbers(data):
        raise UserError(f"{name}: {path} is {value}; a report never holds NaN or Inf: nothing was published")
    return json.dumps(data, indent=2, allow_nan=False) + "\n"

"""Paired comparisons with a bootstrap confidence interval: is a merge better than a seed?

One implementation for the demo's verdict and for comparing models on a user's data. The
input is, per group (an experiment of the demo; the single data file of a comparison), the
per-example differences ``score(model) - score(reference)`` on the same examples. The
interval is a percentile bootstrap of the mean difference that resamples groups and, inside
each drawn group, examples (a two-stage cluster bootstrap: it carries both the
run-to-run and the example-to-example variation; with one group it is the ordinary paired
bootstrap). A verdict says "better" or "worse" only when the interval excludes zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``model - reference`` over all examples, its bootstrap interval, and the verdict."""

    mean: float
    low: float
    high: float
    confidence: float
    examples: int
    groups: int
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, scale: float = 1.0, unit: str = "") -> str:
        """``+1.2 [-0.4, +2.9]`` in ``scale`` units (100 for percentage points)."""
        return f"{scale * self.mean:+.1f}{unit} [{scale * self.low:+.1f}, {scale * self.high:+.1f}]"


def verdict_for(low: float, high: float) -> str:
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def paired_difference(
    differences: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Bootstrap the mean of per-example paired differences, grouped (list of groups).

    Deterministic for a given ``seed``. Raises ``ValueError`` when there is nothing to compare.
    """
    import numpy

    groups = [numpy.asarray(group, dtype=numpy.float64) for group in differences if len(group)]
    if not groups:
        raise ValueError("no paired examples to compare")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    everything = numpy.concatenate(groups)
    generator = numpy.random.default_rng(seed)
    means = numpy.empty(resamples)
    for index in range(resamples):
        drawn = generator.integers(0, len(groups), len(groups)) if len(groups) > 1 else [0]
        total, count = 0.0, 0
        for group_index in drawn:
            group = groups[group_index]
            picks = group[generator.integers(0, len(group), len(group))]
            total += picks.sum()
            count += len(group)
        means[index] = total / count
    tail = (1 - confidence) / 2
    low, high = numpy.quantile(means, [tail, 1 - tail])
    return PairedDifference(
        mean=float(everything.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        examples=int(everything.size),
        groups=len(groups),
        verdict=verdict_for(float(low), float(high)),
    )

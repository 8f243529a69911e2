"""Where a kernel's time went, for benchmarks.

A :class:`Profile` is a separate object that a caller passes to a kernel when it wants to know
(``MERGEKIT_SEED_PROFILE`` through kernel_timings.py, the benchmarks); it is never part of a kernel's result,
and a kernel given none times nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple


class Profile:
    """Seconds per named step, counts per named event, the largest value seen per name, and
    the (m, n, r) of every matrix a kernel decomposed."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)
        self.largest: Dict[str, int] = defaultdict(int)
        self.shapes: List[Tuple[int, int, int]] = []

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - started

    def count(self, event: str, times: int = 1) -> None:
        self.counts[event] += int(times)

    def see(self, name: str, value: int) -> None:
        self.largest[name] = max(self.largest[name], int(value))


@contextmanager
def timed(profile: Optional[Profile], step: str) -> Iterator[None]:
    """``profile.timed(step)``, or nothing at all without a profile."""
    if profile is None:
        yield
        return
    with profile.timed(step):
        yield

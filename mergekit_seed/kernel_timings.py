"""``MERGEKIT_SEED_PROFILE=FILE``: where our kernels' time went in one process, for the benchmarks.

With the variable set, every method's kernel seconds, SeedFT's steps ("seedft_steps": Gram,
eigh, polar, product, and the (m, n, r) of every matrix) and LoRE's singular value
thresholdings ("lore_svt") are written to FILE as JSON at exit, so that a benchmark can split
a stock ``mergekit-yaml`` run into merge and I/O time. Without it, nothing is timed.
"""

from __future__ import annotations

import atexit
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

from mergekit_seed.maths.profile import Profile, timed


_FILE = os.environ.get("MERGEKIT_SEED_PROFILE")
SEEDFT: Optional[Profile] = Profile() if _FILE else None
LORE: Optional[Profile] = Profile() if _FILE else None
_METHODS: Optional[Profile] = Profile() if _FILE else None


@contextmanager
def method_time(name: str) -> Iterator[None]:
    """Add the seconds of the block to method ``name``'s kernel time (when profiling)."""
    with timed(_METHODS, name):
        yield


def report() -> Dict[str, object]:
    """The JSON the benchmarks read: seconds per method, "seedft_steps" and "lore_svt"."""
    found: Dict[str, object] = dict(_METHODS.seconds)
    if SEEDFT.shapes:
        # (m, n, r) of every matrix: the benchmark counts those at full rank and its floor from them
        found["seedft_steps"] = {
            **{step: SEEDFT.seconds[step] for step in ("gram", "eigh", "polar", "product")},
            "shapes": [list(shape) for shape in SEEDFT.shapes],
        }
    if LORE.counts["matrices"]:
        found["lore_svt"] = {
            **{event: LORE.counts[event] for event in ("matrices", "iterations", "svts", "full_svds", "sketches")},
            "seconds": LORE.seconds["svt"],
            "largest_rank": LORE.largest["rank"],
        }
    return found


def _write() -> None:
    Path(_FILE).write_text(json.dumps(report()), encoding="utf-8")


if _FILE:
    atexit.register(_write)

"""mergekit-seed: multi-seed model merging as a mergekit plugin.

Importing this package is cheap (no torch, no mergekit); :func:`register` loads the
methods and adds them to mergekit's registry.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "register"]


def register() -> None:
    """Add every mergekit-seed method to ``mergekit.merge_methods``; safe to call twice."""
    from mergekit_seed.methods import register_all

    register_all()

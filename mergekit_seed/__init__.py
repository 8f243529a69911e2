"""mergekit-seed: multi-seed model merging as a mergekit plugin.

Importing this package is cheap (no torch, no mergekit); :func:`register` loads the
methods and adds them to mergekit's registry, and :func:`merge` (the Python API, see
docs/python-api.md) runs a recipe as ``mergekit-seed run`` does.
"""

from __future__ import annotations

from mergekit_seed.version import SUPPORTED_MERGEKIT, __version__


__all__ = ["__version__", "SUPPORTED_MERGEKIT", "register", "merge", "MergeResult", "UserError", "RecipeProblems"]


def register() -> list[str]:
    """Add every mergekit-seed method to ``mergekit.merge_methods``; safe to call twice.

    See :func:`mergekit_seed.plugin.register` (imported on first use: it imports torch and
    mergekit, which ``import mergekit_seed`` must not).
    """
    from mergekit_seed.plugin import register as register_methods

    return register_methods()


def __dir__() -> list[str]:
    # the lazily imported API is part of the package's namespace too
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> object:
    # the API is imported on first use, so that `import mergekit_seed` (run from the .pth
    # hook at every interpreter start) stays cheap
    if name in ("merge", "MergeResult"):
        from mergekit_seed import runner

        return getattr(runner, name)
    if name in ("UserError", "RecipeProblems"):
        from mergekit_seed import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mergekit_seed' has no attribute {name!r}")

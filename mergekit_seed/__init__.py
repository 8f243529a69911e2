"""mergekit-seed: multi-seed model merging as a mergekit plugin.

Importing this package is cheap (no torch, no mergekit); :func:`register` loads the
methods and adds them to mergekit's registry, and :func:`merge` (the Python API, see
docs/python-api.md) runs a recipe as ``mergekit-seed run`` does.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# the mergekit release this package is built and tested against (pyproject pins it)
SUPPORTED_MERGEKIT = "0.1.5"

__all__ = ["__version__", "SUPPORTED_MERGEKIT", "register", "merge", "MergeResult", "UserError", "RecipeProblems"]

_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def register() -> list[str]:
    """Add every mergekit-seed method to ``mergekit.merge_methods``; safe to call twice.

    A name that another package already registered keeps that package's method (ours is not
    registered under it) and is reported. Returns those reports, each also printed once as a
    warning line, with one about a mergekit release other than :data:`SUPPORTED_MERGEKIT`.
    Raises whatever registration raises (the import hook catches it).
    """
    from importlib.metadata import version

    from mergekit_seed.methods import register_all

    installed = version("mergekit")
    if installed != SUPPORTED_MERGEKIT:
        _warn_once(
            f"mergekit-seed {__version__} is built for mergekit {SUPPORTED_MERGEKIT} but mergekit {installed} "
            f"is installed; its methods are registered anyway (install mergekit=={SUPPORTED_MERGEKIT} if a merge fails)"
        )
    problems = register_all()
    for problem in problems:
        _warn_once(problem)
    return problems


def __getattr__(name: str) -> object:
    # the API is imported on first use, so that `import mergekit_seed` (run from the .pth
    # hook at every interpreter start) stays cheap
    if name in ("merge", "MergeResult", "RecipeProblems"):
        from mergekit_seed import runner

        return getattr(runner, name)
    if name == "UserError":
        from mergekit_seed.errors import UserError

        return UserError
    raise AttributeError(f"module 'mergekit_seed' has no attribute {name!r}")

"""Run a function right after a module is first imported.

``after_import(name, callback)`` puts a ``sys.meta_path`` finder in place that lets the real
loader execute ``name`` and then calls ``callback()``; if ``name`` is already imported, the
callback runs at once. Cheap to import (no torch, no mergekit): the interpreter-start hook
uses it.
"""

from __future__ import annotations

import importlib.machinery
import sys


if False:  # for type checkers only: importing typing or collections at every interpreter start costs time
    from collections.abc import Callable


class _CallbackLoader:
    # Duck-typed loader: importing importlib.abc here would slow every interpreter start.
    def __init__(self, wrapped, callback: Callable[[], None]):
        self._wrapped = wrapped
        self._callback = callback

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        self._callback()


class AfterImportFinder:
    """Waits for ``target`` to be imported, then calls ``callback`` (once)."""

    def __init__(self, target: str, callback: Callable[[], None]):
        self.target = target
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        remove(self.target)
        spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


def after_import(target: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` after ``target`` is imported, or now if it already is; one finder per target."""
    if target in sys.modules:
        callback()
        return
    if not any(isinstance(f, AfterImportFinder) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImportFinder(target, callback))


def remove(target: str) -> None:
    """Take the finder waiting for ``target`` off ``sys.meta_path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, AfterImportFinder) and f.target == target)]

"""Interpreter-start hook: register our methods when mergekit's registry is imported.

Imported from ``mergekit_seed.pth`` at every interpreter start, so it must stay cheap:
it imports neither torch nor mergekit. It installs a ``sys.meta_path`` finder that
waits for ``mergekit.merge_methods`` to be imported, lets the real loader execute it,
then calls :func:`mergekit_seed.register`.
"""

from __future__ import annotations

import importlib.machinery
import sys

_TARGET = "mergekit.merge_methods"


class _RegisteringLoader:
    # Duck-typed loader/finder: importing importlib.abc here would slow every interpreter start.
    def __init__(self, wrapped):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        if "mergekit_seed.methods" in sys.modules:
            return  # mid-import of our methods module, which registers on its last line
        register_softly()


class _RegistryFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        _uninstall()
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register_softly() -> None:
    """Register our methods; if that fails, say so in one line and let mergekit carry on.

    A plugin must never take its host down: with our package broken (a partial install, a
    mergekit release that changed an API we use), mergekit's own methods still run.
    """
    try:
        from mergekit_seed import register

        register()
    except Exception as error:  # any failure of ours must stay ours
        from importlib.metadata import PackageNotFoundError, version

        def installed(package: str) -> str:
            try:
                return version(package)
            except PackageNotFoundError:
                return "?"

        reason = (str(error).splitlines() or [""])[0] or type(error).__name__
        sys.stderr.write(
            f"warning: mergekit-seed {installed('mergekit-seed')} could not register its merge methods with "
            f"mergekit {installed('mergekit')} ({type(error).__name__}: {reason}); mergekit's own methods work as usual; "
            "run `mergekit-seed methods` to check\n"
        )


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegistryFinder)]


def install() -> None:
    """Install the finder once (no-op when the registry is already imported)."""
    if _TARGET in sys.modules:
        register_softly()
        return
    if not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


install()

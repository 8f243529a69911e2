"""Interpreter-start hook: register our methods when mergekit's registry is imported.

Imported from ``mergekit_seed.pth`` at every interpreter start, so it must stay cheap:
it imports neither torch nor mergekit. It installs a ``sys.meta_path`` finder
(:func:`mergekit_seed.import_hooks.after_import`) that waits for ``mergekit.merge_methods``
to be imported, lets the real loader execute it, then calls :func:`mergekit_seed.register`.
"""

from __future__ import annotations

import sys

from mergekit_seed.import_hooks import after_import, remove

_TARGET = "mergekit.merge_methods"


def _on_registry_import() -> None:
    if "mergekit_seed.methods" in sys.modules:
        return  # mid-import of our methods module, which registers on its last line
    register_softly()


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
    remove(_TARGET)


def install() -> None:
    """Register once mergekit's registry is imported (now, if it already is)."""
    after_import(_TARGET, _on_registry_import)


install()

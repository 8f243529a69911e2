"""What ``mergekit_seed.pth`` runs at every interpreter start: register our methods once
mergekit's registry is imported.

It must stay cheap: it imports neither torch nor mergekit. It installs a ``sys.meta_path``
finder (:func:`mergekit_seed.after_import.after_import`) that waits for
``mergekit.merge_methods`` to be imported, lets the real loader execute it, then calls
:func:`mergekit_seed.register` (which imports :mod:`mergekit_seed.plugin`).
"""

from __future__ import annotations

import sys

from mergekit_seed.after_import import after_import, remove


_TARGET = "mergekit.merge_methods"


def _on_registry_import() -> None:
    if "mergekit_seed.plugin" in sys.modules:
        return  # mid-import of our plugin module, which registers on its last line
    methods = sys.modules.get("mergekit_seed.methods")
    if methods is not None and getattr(getattr(methods, "__spec__", None), "_initializing", False):
        # our methods module, mid-import, imported mergekit's registry: it cannot be registered
        # yet, and every route of ours calls register() before it looks a method up
        return
    _register_or_warn()


def _register_or_warn() -> None:
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
            f"mergekit {installed('mergekit')} ({type(error).__name__}: {reason}); mergekit's own methods work as "
            "usual; "
            "run `mergekit-seed methods` to check\n"
        )


def _uninstall() -> None:
    remove(_TARGET)


def install() -> None:
    """Register once mergekit's registry is imported (now, if it already is)."""
    after_import(_TARGET, _on_registry_import)


install()

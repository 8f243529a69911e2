"""``--quiet``: other libraries' progress bars, log lines and warnings silenced, so that what a
quiet command prints is only its own lines (its result, and our ``warning:``/``error:`` lines)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator


ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
LOGGERS = ("lm-eval", "lm_eval", "mergekit", "accelerate", "datasets")


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's progress bars and logs, lm-eval's, datasets'
    and mergekit's log lines below errors, and Python warnings (FutureWarning,
    DeprecationWarning) for the rest of the process: what a command does at its start.

    Through the environment variables these libraries read when they are imported, so nothing
    is imported here (an adapter merge never imports transformers); a library already imported
    is told directly."""
    os.environ.update(ENVIRONMENT)
    warnings.filterwarnings("ignore")
    _silence_imported()
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _silence_imported() -> None:
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def libraries_quieted() -> Iterator[None]:
    """:func:`quiet_libraries` for the length of a ``with`` block, everything put back after it:
    what a Python call (``select()``) does, so that its caller's warnings filters, log levels and
    progress bars are theirs again when it returns. A library first imported inside the block is
    left at its defaults."""
    environment = {name: os.environ.get(name) for name in ENVIRONMENT}
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    before = _library_state()
    with warnings.catch_warnings():
        quiet_libraries()
        try:
            yield
        finally:
            for name, value in environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            _restore_library_state(before)


def _library_state() -> dict:
    state = {}
    if "huggingface_hub" in sys.modules:
        state["hub_bars_disabled"] = sys.modules["huggingface_hub"].utils.are_progress_bars_disabled()
    if "transformers" in sys.modules:
        logs = sys.modules["transformers"].utils.logging
        state["transformers"] = (logs.get_verbosity(), logs.is_progress_bar_enabled())
    return state


def _restore_library_state(state: dict) -> None:
    if "huggingface_hub" in sys.modules:
        utils = sys.modules["huggingface_hub"].utils
        (utils.disable_progress_bars if state.get("hub_bars_disabled", False) else utils.enable_progress_bars)()
    if "transformers" in sys.modules:
        logs = sys.modules["transformers"].utils.logging
        verbosity, bars = state.get("transformers", (logging.WARNING, True))
        logs.set_verbosity(verbosity)
        (logs.enable_progress_bar if bars else logs.disable_progress_bar)()

"""``--quiet``: other libraries' progress bars, log lines and warnings silenced, so that what a
quiet command prints is only its own lines (its result, and our ``warning:``/``error:`` lines)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's progress bars and logs, lm-eval's, datasets'
    and mergekit's log lines below errors, and Python warnings (FutureWarning,
    DeprecationWarning) for the rest of the process.

    Through the environment variables these libraries read when they are imported, so nothing
    is imported here (an adapter merge never imports transformers); a library already imported
    is told directly."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.filterwarnings("ignore")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    for name in ("lm-eval", "lm_eval", "mergekit", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)

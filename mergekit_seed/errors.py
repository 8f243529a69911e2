"""The one error model: every refusal is a :class:`UserError` (or a subclass), raised where the
problem is known.

A ``UserError`` is a problem the user can fix: its message is one line naming the file, tensor
or parameter and what to do. It is a ``click.ClickException``, so every command (ours, and
stock ``mergekit-yaml`` running our methods) prints it as ``error: MESSAGE`` and exits with
status 1, without a traceback. Anything else that escapes is a bug, and keeps its traceback.

``MERGEKIT_SEED_DEBUG=1`` in the environment (or ``-v`` where a command has it) prints the full
traceback of a refusal too, above its line: what a bug report needs.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import IO, List, Optional, Tuple

import click


DEBUG_VARIABLE = "MERGEKIT_SEED_DEBUG"
_debug = False  # set by show_tracebacks (a command's -v)


def show_tracebacks(on: bool = True) -> None:
    """Print the traceback of every refusal from now on (``-v``), as ``MERGEKIT_SEED_DEBUG=1`` does."""
    global _debug
    _debug = on


def debugging() -> bool:
    return _debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def first_validation_problem(error) -> Tuple[str, str]:
    """(dotted location, message) of the first problem in a pydantic ``ValidationError``."""
    first = error.errors()[0]
    message = str(first.get("msg", error)).removeprefix(
        "Value error, "
    )  # pydantic's prefix for a validator's ValueError
    return ".".join(str(part) for part in first.get("loc", ())), message


class UserError(click.ClickException):
    """A problem the user can fix; the message is one line naming the file, tensor or parameter."""

    def __init__(self, message: str):
        super().__init__(message)

    def lines(self) -> List[str]:
        """What is printed, one ``error:`` line each."""
        return [self.message]

    def show(self, file: Optional[IO] = None) -> None:
        file = file or sys.stderr
        if debugging():
            traceback.print_exception(self, file=file)
        for line in self.lines():
            click.echo(f"error: {line}", file=file)


class RecipeProblems(UserError):
    """A recipe that cannot run. ``problems`` holds every problem found, one line each; the
    message is the first."""

    def __init__(self, problems: List[str]):
        super().__init__(problems[0])
        self.problems = problems

    def lines(self) -> List[str]:
        return list(self.problems)


class MergeRefused(UserError, ValueError):
    """A refusal by one of our methods inside mergekit (a non-finite input or result, a bad
    parameter, a model file that is not a regular file inside its folder): one line under stock
    ``mergekit-yaml`` too, and a ``ValueError`` for callers of mergekit's Python API."""

"""The one exception type for user errors (shown as one line, exit status 1)."""

from typing import Tuple


def first_validation_problem(error) -> Tuple[str, str]:
    """(dotted location, message) of the first problem in a pydantic ``ValidationError``."""
    first = error.errors()[0]
    return ".".join(str(part) for part in first.get("loc", ())), first.get("msg", str(error))


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, tensor or parameter."""

"""The one exception type for user errors (shown as one line, exit status 1)."""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, tensor or parameter."""

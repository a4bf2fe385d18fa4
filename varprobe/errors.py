"""The one exception type that means "the user's input is wrong" (exit code 2)."""


class VarprobeError(Exception):
    """A problem the user can fix: bad target, bad input, bad option, model raised.

    The message is one line that says what went wrong, where, and what to do.
    """

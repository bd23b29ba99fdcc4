"""The one exception type for failures the user can cause and fix.

The CLI prints a FedkbError as a single line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class FedkbError(Exception):
    """A clear, user-facing error: bad input, a missing file, an impossible setting."""

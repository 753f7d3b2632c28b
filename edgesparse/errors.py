"""The one exception type users see. The CLI prints its message on one line and exits non-zero."""


class EdgesparseError(Exception):
    """A problem with the user's input or environment, explained in one line."""

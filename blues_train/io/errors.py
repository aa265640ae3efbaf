"""The one exception type for user errors: the CLI prints its message, never a traceback."""


class BluesError(Exception):
    """Bad input or a bad state the user can fix; the message says what and where."""

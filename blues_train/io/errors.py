"""The one exception type for user errors: the CLI prints its message, never a traceback."""


class BluesError(Exception):
    """Bad input or a bad state the user can fix; the message says what and where."""


def require_extra(module: str, extra: str, purpose: str):
    """The optional package `module`, imported; a BluesError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BluesError(f"{purpose} needs the {module} package, which is not installed: "
                         f"pip install 'blues[{extra}]'") from None

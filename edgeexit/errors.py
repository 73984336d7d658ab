"""Errors with a user-facing one-line message. The CLI turns them into exit code 2."""


class UserError(Exception):
    """Bad usage or bad input: the message says what is wrong and how to fix it."""


class ArtifactError(UserError):
    """A missing or incompatible artifact (manifest schema, engine for another GPU/TensorRT)."""


def describe(exc: BaseException) -> str:
    """One line for an unexpected failure (the CLI prints it instead of a traceback)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]} (set EDGEEXIT_DEBUG=1 for the traceback)"

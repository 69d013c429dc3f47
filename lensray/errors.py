"""Errors that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LensrayInputError(ValueError):
    """Bad user input: a config, CSV, dataset, model id or storage path.

    The message must be one line and name the offending field, row or column.
    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    """

    exit_code = 2


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """``exc``'s message on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text

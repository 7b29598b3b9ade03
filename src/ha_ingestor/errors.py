"""Exceptions and error texts shared across sources, sinks and the CLI."""

from __future__ import annotations


class CheckError(Exception):
    """``ha-ingestor check``: the target answered, or failed to, in a way that stops the
    service working. The message names the target and what to change."""


def describe(exc: BaseException) -> str:
    """``Type: message`` (or just the type when the message is empty), for logs and status."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

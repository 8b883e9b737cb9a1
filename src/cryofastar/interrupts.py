"""Ctrl-C (SIGINT) or SIGTERM received while the command line was loading, remembered.

A Python signal handler can stop the program only by raising an exception in the main
thread, and the code it lands in may swallow it (typer validates options through pydantic,
whose compiled core drops an exception raised inside a callback) or break on it (an
import left half-done; a C++ extension's callback aborts the process). A session whose
SIGINT was swallowed would start and watch for ever. So :mod:`cryofastar.cli` only
records a Ctrl-C here while its modules load (:func:`remember` is the handler then) and
exits after the imports; from then on its handler records and raises. The places that
start long work (:func:`cryofastar.options.settings_command`, before a command runs, and
:func:`cryofastar.services.watch.run_service`, once its own handlers are in place) ask
:func:`received` first.

This module imports nothing of ``cryofastar`` and nothing slow: the command line installs
its handler before anything else is imported.
"""

from __future__ import annotations

__all__ = ["received", "remember"]

_SIGNALS: list[int] = []


def remember(signum: int, _frame: object = None) -> None:
    """Record that signal ``signum`` arrived: the handler while the command line loads, then called by its own."""
    _SIGNALS.append(signum)


def received() -> bool:
    """Whether SIGINT or SIGTERM arrived before the command's own handlers took over."""
    return bool(_SIGNALS)

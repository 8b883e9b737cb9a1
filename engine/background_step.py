"""One long computation at a time in a worker thread, its result collected later by the thread that owns the state.

The live session's accumulator thread owns the map; some of refinement's steps take a
minute (the ab initio bootstrap, the class poses' probe and confirmation). They compute
from inputs they are given (images read, a reference made) and touch no shared state, so
they run here while the accumulator goes on inserting new particles; the accumulator
polls :meth:`BackgroundStep.done` and applies the result itself, so the map keeps one writer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BackgroundStep", "Cancelled"]

T = TypeVar("T")


class Cancelled(Exception):  # noqa: N818 - it says what happened
    """Raised inside a computation asked to stop (:meth:`BackgroundStep.check`)."""


class BackgroundStep(Generic[T]):
    """At most one computation running in a worker thread (module docstring); not itself shared between owners.

    Parameters
    ----------
    name: str
        Names the worker thread (``cryofastar-<name>``), for logs and profiles.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self._label = ""
        self._started = 0.0
        self._cancel = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a computation was started and its outcome not yet taken (:meth:`take`)."""
        return self._thread is not None

    @property
    def label(self) -> str:
        """What the computation started last is (given to :meth:`start`)."""
        return self._label

    def done(self) -> bool:
        """Whether a started computation has finished (its outcome waits for :meth:`take`)."""
        return self._thread is not None and not self._thread.is_alive()

    def seconds(self) -> float:
        """Wall time since the computation started (s)."""
        return time.monotonic() - self._started if self._thread is not None else 0.0

    def start(self, label: str, work: Callable[[], T]) -> None:
        """Run ``work()`` in a new worker thread; ``label`` says what it is. Refused while one is busy."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: {self._label!r} is still running or not taken")
        self._result, self._error, self._label, self._started = None, None, label, time.monotonic()
        self._cancel.clear()

        def run() -> None:
            try:
                self._result = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the owner by take()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"cryofastar-{self.name}", daemon=True)
        self._thread.start()

    def take(self) -> T:
        """The finished computation's result (raises what it raised); the step is then free for the next.

        Raises RuntimeError if nothing finished (see :meth:`done`).
        """
        if not self.done():
            raise RuntimeError(f"{self.name}: nothing finished to take")
        result, error = self._result, self._error
        self._thread, self._result, self._error = None, None, None
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def check(self) -> None:
        """Raise :class:`Cancelled` if :meth:`cancel` was called (a computation calls this between its steps)."""
        if self._cancel.is_set():
            raise Cancelled(f"{self._label} cancelled")

    def cancel(self, timeout: float) -> bool:
        """Ask the computation to stop (at its next :meth:`check`), wait at most ``timeout`` s for it, and drop
        its outcome; whether it ended (a thread left running must not be doing torch work when the process
        exits). The step is free again if it did."""
        if self._thread is None:
            return True
        self._cancel.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._thread, self._result, self._error = None, None, None
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the computation finished (or ``timeout`` s); whether it did. For callers that must wait
        (a command run to completion, a test), never the accumulator thread."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done()

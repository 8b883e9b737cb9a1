"""Watch a microscope session directory and hand over particle files once they are complete.

:class:`StackWatcher` watches a root directory recursively and calls ``on_ready(path)`` once for every complete
particle file it sees: names ending (case-insensitively) in ``.mrcs``, ``.mrc`` or ``.star``.

What is ignored
---------------
- hidden names: any path component below the root that starts with ``.`` (``.x.mrcs``, ``.tmp/x.mrcs``);
- names ending in ``~``, ``.tmp``, ``.part`` or ``.partial`` (editor backups, downloads in progress);
- anything under one of the ``ignore`` directories. The daemon's own output directory may sit inside the watched
  directory, and its maps (``.mrc``) must not be fed back in as particles.

When a file is complete
-----------------------
Acquisition and pre-processing software writes files in one of two ways, and the watcher handles both:

- **Rename into place.** The writer fills a temporary (usually hidden) name, then renames it to its final name.
  ``rename(2)`` is atomic, so a file that *arrives by a move inside the watched tree* is complete at once.
- **In-place writers.** The writer opens the final name and appends to it, possibly over several seconds (a stack
  that grows as particles are extracted, a STAR file rewritten with more rows). Nothing on the file system says when
  such a writer is done, so the watcher waits until the file's signature ``(size, mtime_ns)`` has stayed unchanged
  for ``settle_seconds`` and its size is non-zero. A checker thread re-stats the pending files every
  ``settle_seconds / 4``. A file that is deleted before it settles is dropped silently.

A file moved in from *outside* the watched tree looks like a newly created file to inotify and is treated as an
in-place write, so it is delivered after ``settle_seconds``. Empty files are never delivered: one that stays empty
for ``settle_seconds`` stops being tracked, and is taken again when a write gives it content.

Files already present when :meth:`StackWatcher.start` is called are taken too, in order of modification time then
path. The same stability rule applies, except that a file whose mtime is older than ``settle_seconds`` counts as
stable at once.

Each path is delivered once per signature. If a delivered file changes later (a STAR file rewritten with more
rows, a stack that grew) and settles again, it is delivered again; an unchanged file is never delivered twice, even
if it is touched by ``chmod`` or read.

Native events or polling
------------------------
With ``poll_seconds=None`` the watcher uses watchdog's native observer (inotify on Linux): events are immediate and
cheap. inotify only reports changes made through the local kernel, so on network file systems (NFS, SMB, GPFS and
other cluster file systems) written by the microscope PC it sees *nothing*. On those, pass ``poll_seconds`` to use
watchdog's :class:`~watchdog.observers.polling.PollingObserver`, which re-lists the tree every ``poll_seconds``
and compares snapshots. Polling costs a directory walk per interval and may see a quick write-then-rename as a single
creation, which then waits ``settle_seconds``.

Threads and back-pressure
-------------------------
The observer and checker threads only ever put ready paths on an internal, unbounded FIFO. One dedicated dispatcher
thread takes them off in order and calls ``on_ready``, so ``on_ready`` is never called concurrently and may block as
long as it likes (the daemon applies back-pressure through it) without losing events. An exception raised by
``on_ready`` is logged and the watcher carries on.

Examples
--------
>>> watcher = StackWatcher(Path("/data/session"), print, settle_seconds=2.0)  # doctest: +SKIP
>>> with watcher:  # doctest: +SKIP
...     run_until_interrupted()
"""

from __future__ import annotations

import logging
import math
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

__all__ = ["PARTICLE_SUFFIXES", "StackWatcher", "is_particle_name"]

logger = logging.getLogger(__name__)

PARTICLE_SUFFIXES: tuple[str, ...] = (".mrcs", ".mrc", ".star")
"""Lower-case name endings of the files the watcher delivers."""

_PARTIAL_SUFFIXES: tuple[str, ...] = ("~", ".tmp", ".part", ".partial")

# Only the events that can make a file appear, change or go away. Leaving out opened / closed-without-write and
# directory-modified events keeps our own reads of delivered files (and directory listings) from waking us up.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

Signature = tuple[int, int]
"""``(st_size, st_mtime_ns)`` of a file."""

_UNKNOWN: Signature = (-1, -1)  # stat failed for another reason than the file being gone: keep it, try again


def is_particle_name(name: str) -> bool:
    """Whether a file name looks like a finished particle file (not whether its directory is watched).

    Parameters
    ----------
    name
        A bare file name, without directories.

    Returns
    -------
    bool
        True for names ending (case-insensitively) in one of :data:`PARTICLE_SUFFIXES` that are neither hidden nor
        marked as partial (``~``, ``.tmp``, ``.part``, ``.partial``).
    """
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(PARTICLE_SUFFIXES) and not lower.endswith(_PARTIAL_SUFFIXES)


def _signature(path: Path) -> Signature | None:
    """``(size, mtime_ns)`` of a regular file; None if it is gone or not a regular file; ``_UNKNOWN`` on I/O errors."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # EIO, ESTALE, a timed-out network mount: not a reason to forget the file
        logger.warning("cannot stat %s (will retry): %s", path, exc)
        return _UNKNOWN
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Pending:
    """A file waiting to become stable: its last signature and when (monotonic clock) it was first seen."""

    signature: Signature
    since: float


class _EventForwarder(FileSystemEventHandler):
    """Hands every watchdog event to a callback; an exception must never kill the observer thread."""

    def __init__(self, callback: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._callback = callback

    def dispatch(self, event: FileSystemEvent) -> None:
        """Forward `event`; log, never raise."""
        try:
            self._callback(event)
        except Exception:
            logger.exception("error while handling %r", event)


class StackWatcher:
    """Watch ``root`` recursively and call ``on_ready(path)`` for every complete particle file.

    See the module docstring for which files are taken and when a file counts as complete.

    Parameters
    ----------
    root
        Existing directory to watch, recursively.
    on_ready
        Called with the absolute path of each complete particle file, always from the watcher's single dispatcher
        thread, never concurrently, in the order the files became ready. It may block (back-pressure) without losing
        events. Exceptions are logged and ignored.
    poll_seconds
        None to use the native observer (inotify on Linux). A positive number to poll the tree every
        ``poll_seconds`` instead, for network file systems (NFS, SMB, GPFS) where inotify sees nothing.
    settle_seconds
        How long a file written in place must keep the same ``(size, mtime_ns)`` before it counts as complete.
    ignore
        Directories whose contents are never delivered (for example the daemon's own output directory when it sits
        inside ``root``).

    Raises
    ------
    ValueError
        If ``root`` is not an existing directory, or ``settle_seconds`` / ``poll_seconds`` are not positive.
    TypeError
        If ``on_ready`` is not callable.

    Examples
    --------
    >>> ready = []
    >>> with StackWatcher(Path("/data/session"), ready.append, poll_seconds=2.0) as watcher:  # doctest: +SKIP
    ...     time.sleep(60)
    >>> watcher.delivered  # doctest: +SKIP
    12
    """

    def __init__(
        self,
        root: Path,
        on_ready: Callable[[Path], None],
        *,
        poll_seconds: float | None = None,
        settle_seconds: float = 1.0,
        ignore: Sequence[Path] = (),
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"watch root {str(root)!r} is not an existing directory")
        if not callable(on_ready):
            raise TypeError(f"on_ready must be callable, got {type(on_ready).__name__}")
        if not (isinstance(settle_seconds, int | float) and math.isfinite(settle_seconds) and settle_seconds > 0):
            raise ValueError(f"settle_seconds must be a positive number of seconds, got {settle_seconds!r}")
        if poll_seconds is not None and not (
            isinstance(poll_seconds, int | float) and math.isfinite(poll_seconds) and poll_seconds > 0
        ):
            raise ValueError(
                f"poll_seconds must be None (native events) or a positive number of seconds, got {poll_seconds!r}"
            )
        self._root = root.resolve()
        self._on_ready = on_ready
        self._poll_seconds = None if poll_seconds is None else float(poll_seconds)
        self._settle_seconds = float(settle_seconds)
        self._ignore = tuple(Path(d).resolve() for d in ignore)

        self._lock = threading.Lock()  # guards _pending, _signatures, _outstanding, _delivered
        self._pending: dict[Path, _Pending] = {}
        self._signatures: dict[Path, Signature] = {}  # last signature put on the ready queue, per path
        self._outstanding = 0  # put on the ready queue, on_ready not finished yet
        self._delivered = 0
        self._ready: queue.SimpleQueue[Path | None] = queue.SimpleQueue()  # None wakes the dispatcher to stop

        self._state_lock = threading.Lock()
        self._state = "new"  # -> "running" -> "stopped"
        self._stop_event = threading.Event()
        self._observer: BaseObserver | None = None
        self._checker: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None

    # ------------------------------------------------------------------ public API

    @property
    def root(self) -> Path:
        """The watched directory, resolved to an absolute path."""
        return self._root

    @property
    def pending(self) -> int:
        """Number of files seen but not yet stable."""
        with self._lock:
            return len(self._pending)

    @property
    def queued(self) -> int:
        """Number of complete files not yet through ``on_ready``: the back-pressure backlog plus the call in progress.

        ``pending == 0 and queued == 0`` means the watcher has handed over everything it has seen.
        """
        with self._lock:
            return self._outstanding

    @property
    def delivered(self) -> int:
        """Number of ``on_ready`` calls that have finished, including those that raised."""
        with self._lock:
            return self._delivered

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._state == "running"

    def start(self) -> None:
        """Start the observer, the checker and the dispatcher threads, then take the files already present.

        Raises
        ------
        RuntimeError
            If the watcher was started before (a stopped watcher cannot be restarted either).
        """
        with self._state_lock:
            if self._state != "new":
                raise RuntimeError(f"{self!r} was already started; a StackWatcher can be started only once")
            self._state = "running"

        observer: BaseObserver
        if self._poll_seconds is None:
            observer = Observer()
        else:
            observer = PollingObserver(timeout=self._poll_seconds)
        observer.name = f"stackwatcher-observer[{self._root.name}]"
        observer.schedule(_EventForwarder(self._on_event), str(self._root), recursive=True, event_filter=_EVENT_FILTER)
        try:
            # Watches (inotify) or the first snapshot (polling) are in place once observer.start() returns, so the
            # initial scan below cannot miss a file written in between.
            observer.start()
        except OSError:
            self._state = "stopped"
            logger.error(
                "cannot watch %s with %s; if the inotify watch limit is exhausted, pass poll_seconds to poll instead",
                self._root,
                type(observer).__name__,
            )
            raise
        self._observer = observer
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name=f"stackwatcher-dispatch[{self._root.name}]", daemon=True
        )
        self._checker = threading.Thread(
            target=self._check_loop, name=f"stackwatcher-check[{self._root.name}]", daemon=True
        )
        self._dispatcher.start()
        self._checker.start()
        self._initial_scan()
        logger.info("%r started", self)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observer and the threads and wait for them; calling it again does nothing.

        The dispatcher finishes the ``on_ready`` call in progress; ready files not yet handed over are dropped
        (and counted in the log).

        Parameters
        ----------
        timeout
            Seconds to wait, in total, for the threads to finish. A thread still busy afterwards (an ``on_ready``
            that does not return) is left behind as a daemon thread and a warning is logged.
        """
        with self._state_lock:
            if self._state != "running":
                return
            self._state = "stopped"
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        self._ready.put(None)
        threads: list[threading.Thread] = []
        if self._observer is not None:
            self._observer.stop()
            threads.append(self._observer)
        threads += [t for t in (self._checker, self._dispatcher) if t is not None]
        for thread in threads:
            if thread is threading.current_thread():  # stop() called from within on_ready
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s still running %.1f s after stop() was called", thread.name, timeout)
        for _ in self._drain_ready():
            pass
        in_flight = int(self._dispatcher is not None and self._dispatcher.is_alive())  # inside a slow on_ready
        with self._lock:
            in_flight = min(in_flight, self._outstanding)
            dropped = self._outstanding - in_flight
            self._outstanding = in_flight
        self._ready.put(None)  # the drain took the wake-up; a dispatcher still inside on_ready needs it
        if dropped:
            logger.warning("stopped with %d complete file(s) never handed to on_ready", dropped)
        logger.info("%r stopped", self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "inotify/native" if self._poll_seconds is None else f"polling every {self._poll_seconds:g} s"
        return (
            f"{type(self).__name__}(root={str(self._root)!r}, {mode}, settle_seconds={self._settle_seconds:g}, "
            f"state={self._state}, pending={self.pending}, delivered={self.delivered})"
        )

    # ------------------------------------------------------------------ which paths count

    def _excluded(self, path: Path) -> bool:
        """Whether `path` is outside the root, hidden below it, or under an ignored directory."""
        try:
            rel = path.relative_to(self._root)
        except ValueError:
            return True
        if any(part.startswith(".") for part in rel.parts):
            return True
        return any(path.is_relative_to(d) for d in self._ignore)

    def _wanted(self, path: Path) -> bool:
        return is_particle_name(path.name) and not self._excluded(path)

    def _walk(self, top: Path) -> Iterator[Path]:
        """Wanted files under directory `top`, skipping hidden and ignored subtrees."""
        if self._excluded(top):
            return

        def on_error(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):
                logger.warning("cannot list %s: %s", exc.filename, exc)

        for dirpath, dirnames, filenames in os.walk(top, onerror=on_error):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not any((here / d) == ig for ig in self._ignore)
            )
            for name in sorted(filenames):
                if is_particle_name(name):
                    yield here / name

    # ------------------------------------------------------------------ producers (observer, checker, start)

    def _on_event(self, event: FileSystemEvent) -> None:
        """Observer thread: turn one watchdog event into pending or ready files."""
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, FileSystemMovedEvent):
            dest = Path(os.fsdecode(event.dest_path))
            self._forget(src, tree=event.is_directory)
            if event.is_directory:
                for path in self._walk(dest):
                    self._take_moved(path)
            elif self._wanted(dest):
                self._take_moved(dest)
        elif isinstance(event, FileDeletedEvent | DirDeletedEvent):
            self._forget(src, tree=event.is_directory)
            if event.is_directory and src == self._root:
                logger.error("watched directory %s disappeared or became unreadable; no new files will be seen", src)
        elif event.is_directory:  # created, perhaps with files in it already (or moved in from outside)
            for path in self._walk(src):
                self._take_written(path)
        elif self._wanted(src):  # created, modified, closed after writing
            self._take_written(src)

    def _forget(self, path: Path, *, tree: bool) -> None:
        """Drop a deleted or moved-away file (or every file under a directory) from the books."""
        with self._lock:
            for books in (self._pending, self._signatures):
                if tree:
                    for p in [p for p in books if p.is_relative_to(path)]:
                        del books[p]
                else:
                    books.pop(path, None)

    def _take_moved(self, path: Path) -> None:
        """A file renamed into place is complete now."""
        sig = _signature(path)
        with self._lock:
            if sig is None:
                self._pending.pop(path, None)
            elif sig[0] <= 0:  # empty or unknown: not complete; give a writer settle_seconds to fill it
                self._add_pending(path, sig, time.monotonic())
            else:
                self._pending.pop(path, None)
                self._enqueue(path, sig)

    def _take_written(self, path: Path) -> None:
        """A file written in place: (re)start its settle clock if its signature changed."""
        sig = _signature(path)
        with self._lock:
            if sig is None:
                self._pending.pop(path, None)
            else:
                self._add_pending(path, sig, time.monotonic())

    def _add_pending(self, path: Path, sig: Signature, now: float) -> None:
        # caller holds self._lock
        entry = self._pending.get(path)
        if entry is None or entry.signature != sig:
            self._pending[path] = _Pending(sig, now)

    def _enqueue(self, path: Path, sig: Signature) -> None:
        # caller holds self._lock
        if self._signatures.get(path) == sig:
            logger.debug("%s unchanged since it was delivered; not delivered again", path)
            return
        self._signatures[path] = sig
        self._outstanding += 1
        self._ready.put(path)

    def _initial_scan(self) -> None:
        """Take the files present at start, oldest first; those older than settle_seconds are ready at once."""
        found = [(sig[1], str(path), path, sig) for path in self._walk(self._root) if (sig := _signature(path))]
        found.sort()
        settle_ns = int(self._settle_seconds * 1e9)
        now_ns = time.time_ns()
        now = time.monotonic()
        n_ready = 0
        with self._lock:
            for mtime_ns, _, path, sig in found:
                if sig[0] > 0 and now_ns - mtime_ns >= settle_ns:
                    self._pending.pop(path, None)
                    self._enqueue(path, sig)
                    n_ready += 1
                else:
                    self._add_pending(path, sig, now)
        n_settling = len(found) - n_ready
        logger.info("initial scan of %s: %d file(s) ready, %d still settling", self._root, n_ready, n_settling)

    def _check_loop(self) -> None:
        interval = self._settle_seconds / 4
        while not self._stop_event.wait(interval):
            try:
                self._check_pending()
            except Exception:
                logger.exception("error while checking pending files")

    def _check_pending(self) -> None:
        """Checker thread: re-stat pending files and enqueue those that have been stable for settle_seconds."""
        with self._lock:
            snapshot = sorted(self._pending.items(), key=lambda item: (item[1].since, str(item[0])))
        if not snapshot:
            return
        stats = [(path, entry, _signature(path)) for path, entry in snapshot]  # outside the lock: NFS can be slow
        now = time.monotonic()
        with self._lock:
            for path, entry, sig in stats:
                if self._pending.get(path) is not entry:  # an event changed or removed it meanwhile
                    continue
                if sig is None:
                    logger.debug("%s vanished before it was complete", path)
                    del self._pending[path]
                elif sig == _UNKNOWN:  # transient stat failure: keep the entry as it was, try again next round
                    continue
                elif sig != entry.signature:
                    self._pending[path] = _Pending(sig, now)
                elif now - entry.since >= self._settle_seconds:
                    del self._pending[path]
                    if sig[0] > 0:
                        self._enqueue(path, sig)
                    else:  # the write that fills it will bring it back
                        logger.info(
                            "%s stayed empty for %g s; ignored until it has content", path, self._settle_seconds
                        )

    # ------------------------------------------------------------------ consumer

    def _dispatch_loop(self) -> None:
        """Dispatcher thread: the only caller of on_ready."""
        while True:
            path = self._ready.get()
            if path is None or self._stop_event.is_set():  # stop() accounts for what is not handed over
                return
            called = False
            try:
                if path.exists():
                    called = True
                    self._on_ready(path)
                else:
                    logger.info("%s vanished before on_ready could take it; skipped", path)
            except Exception:
                logger.exception("on_ready(%s) raised; the watcher carries on", path)
            finally:
                with self._lock:
                    self._outstanding -= 1
                    if called:
                        self._delivered += 1

    def _drain_ready(self) -> Iterator[Path]:
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                yield item

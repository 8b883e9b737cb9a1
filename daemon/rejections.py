"""The session's record of rejected input: ``rejected.tsv`` and the recent rows of status messages.

``rejected.tsv`` in ``--out`` has a header ``unix_time  path  reason`` and one
tab-separated UTF-8 row per rejection (a whole file, or some of a file's particles); a
rejection already in the file (the same path and reason: the same bad file seen again
after a restart, or rewritten unchanged) is not written again, so the file holds at most
one row per distinct bad file and reason, however often the session restarts. In
the path and the reason, tabs, newlines, other control and line-break characters and
bytes of a file name that are not UTF-8 are written as backslash escapes (``\t``, ``\n``,
``\xff``; :func:`~cryofastar.recon.io.names.printable`), so every row is one line
whatever a file is called (docs/conventions.md, "File names"). The last
:data:`RECENT_REJECTIONS` rows are also kept in memory for the ``rejected_recent`` field
of status messages; a restarted session reads them back from the file.

A crash in the middle of a row (``kill -9``) leaves a torn last line: the next session
cuts it off before it appends (the rejection it held comes again, since the same bad
file is seen again). A row that cannot be written (the disk is full, the folder became
read-only) is logged once, kept, and written before the next row once writing works
again (at the next rejection, or when the status message next asks for the recent rows, every
second); it is in the status messages' recent rows all the same.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from cryofastar.recon.io.names import printable

logger = logging.getLogger(__name__)

__all__ = ["RECENT_REJECTIONS", "REJECTED_NAME", "RejectionLog", "recent_rejections"]

REJECTED_NAME = "rejected.tsv"
RECENT_REJECTIONS = 20  # rejected files listed in status messages (all of them are in rejected.tsv)
_HEADER = "unix_time\tpath\treason\n"


def recent_rejections(path: Path, keep: int) -> collections.deque:
    """The last ``keep`` rows of a session's ``rejected.tsv`` as status entries.

    Parameters
    ----------
    path: Path
        The ``rejected.tsv`` file (it may not exist yet).
    keep: int
        How many of the last rows to return.

    Returns
    -------
    collections.deque
        ``{"time": float, "path": str, "reason": str}`` per row, oldest first, at most
        ``keep`` of them (``maxlen=keep``); empty when the file is missing or unreadable.
        A torn last line (a crash mid-write) is left out; the other rows still come back.
    """
    recent: collections.deque = collections.deque(maxlen=keep)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return recent
    for line in lines[-keep:]:
        fields = line.split("\t", 2)
        try:
            recent.append({"time": float(fields[0]), "path": fields[1], "reason": fields[2]})
        except (ValueError, IndexError):
            continue  # a torn last line after a crash: the rest still shows
    return recent


def _cut_torn_line(path: Path) -> None:
    """Cut a torn last line (no newline: a crash mid-row) off ``path``, so the next row starts a line of its own."""
    try:
        data = path.read_bytes()  # read whole at start anyway (recent rows, recorded rows)
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1  # 0: not even the header is whole
        os.truncate(path, keep)
    except OSError:
        return
    logger.warning("%s: cut a torn last row (%d bytes) left by a crash", path, len(data) - keep)


def _recorded_rows(path: Path) -> set[tuple[str, str]]:
    """``(path, reason)`` of every complete row of ``rejected.tsv`` (empty if missing or unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return set()
    return {(fields[1], fields[2]) for fields in (line.split("\t", 2) for line in lines) if len(fields) == 3}


class RejectionLog:
    """The one writer of a session's ``rejected.tsv``, and its recent rows (thread-safe).

    Parameters
    ----------
    out: Path
        The session's output directory; the file is ``out / "rejected.tsv"``, created
        with its header by the first rejection.
    keep: int
        Rows returned by :meth:`recent` (the file keeps all of them).
    """

    def __init__(self, out: Path, keep: int = RECENT_REJECTIONS) -> None:
        self.path = Path(out) / REJECTED_NAME
        self._lock = threading.Lock()
        _cut_torn_line(self.path)
        self._unwritten: list[str] = []  # rows a failed write kept, oldest first
        self._write_error: str | None = None
        self._recent = recent_rejections(self.path, keep)
        self._recorded = _recorded_rows(self.path)  # (path, reason) of every row in the file

    def record(self, path: Path | str, reason: str) -> dict[str, object]:
        """Append one row (now, ``path``, ``reason``) to the file and the recent list, unless the file
        already holds that path and reason (then nothing is written).

        Returns
        -------
        dict
            The status entry recorded: ``{"time", "path", "reason"}`` (time rounded to ms,
            path and reason as :func:`~cryofastar.recon.io.names.printable` shows them).
        """
        now, path, reason = time.time(), printable(str(path)), printable(reason)
        entry = {"time": round(now, 3), "path": path, "reason": reason}
        line = f"{now:.3f}\t{path}\t{reason}\n"
        with self._lock:
            if (path, reason) in self._recorded:
                return entry
            self._recorded.add((path, reason))
            self._recent.append(entry)
            self._unwritten.append(line)
            self._write_rows()
        return entry

    def _write_rows(self) -> None:
        """Append the rows not yet written (caller holds the lock); on failure keep them and log once."""
        size = None
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.write((_HEADER if size == 0 else "") + "".join(self._unwritten))
        except OSError as exc:
            if size is not None:  # a full disk may have taken part of a row: cut it, the rows are written again
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
            if str(exc) != self._write_error:
                logger.error("%s not written (%s); %d row(s) kept in memory, written once writing works again",
                             self.path, exc, len(self._unwritten))
            self._write_error = str(exc)
            return
        self._unwritten.clear()
        self._write_error = None

    def recent(self) -> list[dict[str, object]]:
        """The last rows, oldest first (a copy: the status message's ``rejected_recent``); rows a failed
        write kept are tried again first."""
        with self._lock:
            if self._unwritten:
                self._write_rows()
            return list(self._recent)

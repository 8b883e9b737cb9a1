"""Write a file atomically: a temporary file in the same directory, then rename.

A crash (``kill -9``, power loss) in the middle of a write leaves the previous file
as it was and, at worst, a temporary file ``.NAME.XXXXXXXX.tmp`` beside it;
:func:`remove_stale_temporaries` removes those when the writer starts again. A write
that fails (the disk is full, the directory became read-only) removes its temporary
file and raises an :class:`OSError` that names the file:
``[Errno 28] no space left on device while writing /out/checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_temporaries"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") makes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    Readers never see a half-written file; on error the temporary file is removed
    and any previous ``path`` is left as it was. The temporary name starts with
    ``.`` and ends in ``.tmp``, so watchers filtering on ``*.mrcs`` / ``*.star``
    never see it. The file gets the usual permissions for a new file (``0o666`` less
    the umask), not the owner-only mode of a temporary file. The rename is made
    durable by syncing the directory too (where the file system allows it).

    Raises
    ------
    OSError
        Creating, writing or renaming failed (full disk, read-only or missing
        permission): the same errno, with the message
        ``"<strerror, lower case> while writing <path>"``. Other exceptions of the
        caller's block pass through unchanged (after the temporary file is removed).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        tmp = None
        _sync_directory(path.parent)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise _naming(exc, path) from exc
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that interrupted :func:`atomic_path` writes left in ``directory``.

    Only regular files named as :func:`atomic_path` names them (``.NAME.XXXXXXXX.tmp``,
    eight characters from ``tempfile``), directly in ``directory``, are removed: call it
    where one writer owns the directory, before that writer starts (a daemon's ``--out``
    at start-up), never while another writer may be mid-write there.

    Returns
    -------
    list[Path]
        The files removed (empty when ``directory`` is missing or none were left).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _naming(exc: OSError, path: Path) -> OSError:
    """The same kind of OSError (errno kept), its message naming the file being written."""
    if exc.errno is None or exc.strerror is None:
        return OSError(f"{exc} while writing {path}")
    reason = exc.strerror[:1].lower() + exc.strerror[1:]
    return type(exc)(exc.errno, f"{reason} while writing {path}")


def _sync_directory(directory: Path) -> None:
    """fsync a directory (makes a rename inside it durable); silently skipped where not supported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

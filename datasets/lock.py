"""The lock file ``structures.lock.json``: which structures each role keeps, and why others are skipped.

The lock sits next to this module (package data) and records, per role, the pinned
archives, the kept files (package, member, sha256 of the extracted file, atoms,
residues, PDB ids) and the skipped ones with their reason, plus the filters and the
gemmi version that produced it. :func:`check_against_lock` makes every fetch reproduce
it; ``python -m cryofastar.datasets --write-lock`` rewrites it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import gemmi

from . import sources
from .records import FILTERS, Record

__all__ = ["LOCK_PATH", "check_against_lock", "lock_payload", "read_lock", "write_lock"]

LOCK_PATH = Path(__file__).with_name("structures.lock.json")
"""The shipped lock file (the default of every function here, read at call time)."""

REGENERATE = "python -m cryofastar.datasets --role train --write-lock --write-manifest model/TRAINING_DATA.md"
"""The command that rewrites the lock and the training-data document."""


def _lock_entry(record: Record) -> list[object]:
    if record.kept:
        return [record.package, record.member, record.sha256, record.atoms, record.residues, list(record.ids)]
    return [record.package, record.member, record.reason]


def lock_payload(records: dict[str, Sequence[Record]]) -> dict[str, object]:
    """The lock file's content for the given roles' records.

    Parameters
    ----------
    records: dict of str to sequence of Record
        Role -> every record of that role (kept or skipped).
    """
    roles = {}
    for role, recs in records.items():
        roles[role] = {
            "sources": [{"package": s.package, "version": s.version, "archive": s.archive, "sha256": s.sha256}
                        for s in sources.sources_for(role)],
            "kept": [_lock_entry(r) for r in recs if r.kept],
            "skipped": [_lock_entry(r) for r in recs if not r.kept],
        }
    return {"about": "written by `python -m cryofastar.datasets --write-lock`; kept: package, member, "
                     "sha256 of the extracted file, atoms, residues, PDB ids; skipped: package, member, reason",
            "filters": FILTERS, "gemmi": gemmi.__version__, "roles": roles}


def write_lock(records: dict[str, Sequence[Record]], path: Path | None = None) -> None:
    """Write (merge) the lock file, one entry per line.

    Parameters
    ----------
    records: dict of str to sequence of Record
        Role -> records; roles not given keep their entries from the existing file.
    path: Path, optional
        Default :data:`LOCK_PATH`.
    """
    path = LOCK_PATH if path is None else Path(path)
    old = read_lock(path)
    payload = lock_payload(records)
    payload["roles"] = {**old.get("roles", {}), **payload["roles"]}
    payload["roles"] = {role: payload["roles"][role] for role in sources.ROLES if role in payload["roles"]}
    lines = ["{", f' "about": {json.dumps(payload["about"])},', f' "filters": {json.dumps(payload["filters"])},',
             f' "gemmi": {json.dumps(payload["gemmi"])},', ' "roles": {']
    for r, (role, body) in enumerate(payload["roles"].items()):
        lines.append(f'  "{role}": {{')
        for k, key in enumerate(("sources", "kept", "skipped")):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in body[key])
            lines.append(f'   "{key}": [\n{rows}\n   ]' + ("," if k < 2 else ""))
        lines.append("  }" + ("," if r < len(payload["roles"]) - 1 else ""))
    lines += [" }", "}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_lock(path: Path | None = None) -> dict[str, object]:
    """The lock file's content (``{"roles": {}}`` when absent).

    Parameters
    ----------
    path: Path, optional
        Default :data:`LOCK_PATH`.
    """
    path = LOCK_PATH if path is None else Path(path)
    return json.loads(path.read_text()) if path.is_file() else {"roles": {}}


def check_against_lock(role: str, records: Sequence[Record], path: Path | None = None) -> None:
    """Raise ``RuntimeError`` if the kept structures differ from the lock's (no-op without one).

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"``.
    records: sequence of Record
        The role's records.
    path: Path, optional
        Default :data:`LOCK_PATH`.
    """
    path = LOCK_PATH if path is None else Path(path)
    locked = read_lock(path)["roles"].get(role)
    if locked is None:
        return
    expected = {(e[0], e[1], e[2]) for e in locked["kept"]}
    actual = {(r.package, r.member, r.sha256) for r in records if r.kept}
    if expected != actual:
        missing = sorted(f"{p}:{m}" for p, m, _ in expected - actual)
        extra = sorted(f"{p}:{m}" for p, m, _ in actual - expected)
        raise RuntimeError(f"{role} structures differ from {path.name}: missing {missing}, unexpected {extra}. "
                           f"If this is intended (new sources, filters or gemmi), rerun `{REGENERATE}`.")

"""The lock file (cryofastar.datasets.lock): the shipped lock's invariants, and a round trip offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryofastar.datasets import lock, records, sources, structures
from structure_fixtures import HEX64


def test_lock_matches_the_manifest_and_roles_do_not_overlap() -> None:
    shipped = lock.read_lock()
    assert set(shipped["roles"]) == set(sources.ROLES), "regenerate with --write-lock"
    assert shipped["about"] == lock.lock_payload({})["about"]
    kept = {}
    for role in sources.ROLES:
        body = shipped["roles"][role]
        assert body["sources"] == [
            {"package": s.package, "version": s.version, "archive": s.archive, "sha256": s.sha256}
            for s in sources.sources_for(role)
        ]
        kept[role] = body["kept"]
        for package, member, sha, atoms, residues, _ids in body["kept"]:
            assert HEX64.match(sha) and atoms >= records.FILTERS["min_atoms"] and residues > 0, member
            assert package in {s.package for s in sources.sources_for(role)}
        assert all(reason for *_, reason in body["skipped"])
    for key in (2, 1):  # extracted sha256, then archive member names
        train_keys = {entry[key] for entry in kept["train"]}
        assert not train_keys & {entry[key] for entry in kept["eval"]}
    names = [{Path(e[1]).name.split(".")[0].lower() for e in kept[role]} for role in sources.ROLES]
    assert not names[0] & names[1]
    ids = [{i for e in kept[role] for i in e[5]} for role in sources.ROLES]
    assert not ids[0] & ids[1]
    assert len(kept["train"]) >= 50 and len(kept["eval"]) >= 10


def test_the_lock_ships_with_the_package() -> None:
    assert lock.LOCK_PATH.parent == Path(sources.__file__).parent and lock.LOCK_PATH.is_file()


def test_lock_round_trip_and_mismatch(fake_sources: Path) -> None:
    recs = {role: structures.collect(role, fake_sources) for role in sources.ROLES}
    lock.write_lock(recs)
    assert lock.read_lock()["roles"]["train"]["kept"][0][0] == "trainpkg"
    assert len(structures.fetch_structures("train", fake_sources)) == 2  # agrees with the lock
    lock.write_lock({"train": [r for r in recs["train"] if r.name != "a.pdb"]})
    with pytest.raises(RuntimeError, match="unexpected"):
        structures.fetch_structures("train", fake_sources)

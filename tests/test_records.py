"""One structure file (cryofastar.datasets.records): PDB ids, inspection and filters, selection."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryofastar.datasets import records, sources
from structure_fixtures import pdb_text


@pytest.mark.parametrize(
    ("name", "header", "expected"),
    [
        ("1ahsA.pdb", "", ("1AHS",)),
        ("addH_pdb3enl.pdb", "", ("3ENL",)),
        ("mmcif_6zu5.cif", "6ZU5", ("6ZU5",)),
        ("d256ba_.ent", "", ("256B",)),
        ("pdb2nwl-opm.pdb", "", ("2NWL",)),
        ("7CFN_aligned.cif", "7CFN_aligned", ("7CFN",)),
        ("5digitResid.pdb", "", ()),
        ("boltz2_olanzapine_P28335.cif", "model", ()),
        ("test.pdb", "1VII", ("1VII",)),
    ],
)
def test_pdb_ids(name: str, header: str, expected: tuple[str, ...]) -> None:
    assert records.pdb_ids(name, header) == expected


def test_aliases() -> None:
    assert records.pdb_ids("adk_open.pdb", "", (("adk_open.pdb", "4ake"),)) == ("4AKE",)


SOURCE = sources.Source("train", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, ("pkg==1.0",), ("pkg-1.0/*",))


def _inspect(tmp_path: Path, name: str, text: str) -> records.Record:
    (tmp_path / "pkg-1.0").mkdir(exist_ok=True)
    (tmp_path / "pkg-1.0" / name).write_text(text)
    return records.inspect_member(SOURCE, f"pkg-1.0/{name}", f"pkg-1.0/{name}", text.encode(), tmp_path)


def test_inspect_member_applies_the_filters(tmp_path: Path) -> None:
    kept = _inspect(tmp_path, "1xyz.pdb", pdb_text(1))
    assert kept.kept and kept.atoms >= records.FILTERS["min_atoms"] and kept.ids == ("1XYZ",)
    assert kept.polymer_fraction == kept.element_fraction == 1.0 and len(kept.fingerprint) == 64
    assert _inspect(tmp_path, "tiny.pdb", pdb_text(2, 40)).reason == "40 atoms < 300"
    assert _inspect(tmp_path, "junk.pdb", "not a structure\n").reason.startswith("unreadable")
    failed = records.inspect_member(SOURCE, "pkg-1.0/x.pdb.gz", "pkg-1.0/x.pdb", OSError("bad"), tmp_path)
    assert failed.reason == "decompression failed: bad" and failed.path == "" and failed.name == "x.pdb.gz"


def test_select_keeps_the_largest_copy_and_drops_held_out_ones() -> None:
    def record(package: str, member: str, atoms: int, ids: tuple[str, ...], sha: str) -> records.Record:
        return records.Record(package, "1", member, member, sha, atoms=atoms, ids=ids, fingerprint="f" + sha)

    small, large = record("p", "a.pdb", 400, ("1ABC",), "1"), record("q", "b.pdb", 500, ("1ABC",), "2")
    other, seen = record("p", "c.pdb", 400, (), "3"), record("t", "d.pdb", 300, (), "3")
    out = records.select([small, large, other], held_out=[seen], order=["p", "q"])
    assert [r.kept for r in out] == [False, True, False]
    assert out[0].reason.startswith("duplicate (same PDB id 1ABC) of q:b.pdb")
    assert out[2].reason.startswith("in training (same file 3: t:d.pdb)")

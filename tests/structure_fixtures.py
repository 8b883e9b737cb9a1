"""Fake pinned archives for the tests of cryofastar.datasets (imported by tests/conftest.py's
``fake_sources`` fixture; ``pythonpath = ["tests"]`` in pyproject.toml).

The archives are real .tar.gz and wheel files of small procedural molecules written as
PDB/mmCIF, placed in the cache's ``archives/`` folder so that nothing is downloaded:
the pipeline finds them, checks their sha256 and runs as on the real archives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import gemmi
import pytest
from cryofastar.datasets import lock, sources
from cryofastar.recon.simulate.procedural import ProceduralSettings, procedural_molecule

HEX64 = re.compile(r"^[0-9a-f]{64}$")
SMALL = ProceduralSettings(min_residues=50, max_residues=60, oligomer_probability=0.0)


def pdb_text(seed: int, n_atoms: int | None = None) -> str:
    """A PDB file of a small procedural molecule: ALA residues of 8 atoms, element column set."""
    atoms = procedural_molecule(seed, SMALL)
    xyz = atoms.xyz_angstrom.tolist()[:n_atoms]
    lines = []
    for i, ((x, y, z), element) in enumerate(zip(xyz, atoms.elements, strict=False)):
        name = f"{element}{i % 8}"
        lines.append(f"ATOM  {i + 1:5d} {name:<4s} ALA A{i // 8 + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 30.00"
                     f"          {element:>2s}")
    return "\n".join([*lines, "END", ""])


def as_mmcif(pdb: str, tmp_path: Path) -> bytes:
    """The same structure as mmCIF bytes (gemmi's writer)."""
    path = tmp_path / "convert.pdb"
    path.write_text(pdb)
    structure = gemmi.read_structure(str(path))
    structure.setup_entities()
    out = tmp_path / "convert.cif"
    structure.make_mmcif_document().write_file(str(out))
    return out.read_bytes()


def tar_gz(path: Path, members: dict[str, bytes]) -> None:
    """Write a .tar.gz holding ``members`` (name -> bytes)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def zip_file(path: Path, members: dict[str, bytes]) -> None:
    """Write a zip (wheel) holding ``members`` (name -> bytes)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_source_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with one training tar.gz and one evaluation wheel already downloaded; SOURCES point at them.

    ``sources.SOURCES`` and ``lock.LOCK_PATH`` (a file under ``tmp_path``) are replaced
    for the test; returns the cache folder.
    """
    cache = tmp_path / "cache"
    archives = cache / "archives"
    archives.mkdir(parents=True)
    a = pdb_text(1).encode()
    assert len(procedural_molecule(1, SMALL)) >= 300
    tar_gz(archives / "trainpkg-1.0.tar.gz", {
        "trainpkg-1.0/data/a.pdb": a,
        "trainpkg-1.0/data/a_copy.pdb.gz": gzip.compress(a),  # same bytes once decompressed
        "trainpkg-1.0/data/1abc.pdb": pdb_text(2).encode(),
        "trainpkg-1.0/data/pdb1abcA.pdb": pdb_text(3, 320).encode(),  # same PDB id, fewer atoms
        "trainpkg-1.0/data/tiny.pdb": pdb_text(4, 40).encode(),
        "trainpkg-1.0/data/junk.pdb": b"this is not a structure\n",
        "trainpkg-1.0/data/broken.pdb.gz": b"not gzip",
        "trainpkg-1.0/data/synthetic.pdb": pdb_text(5).encode(),
        "trainpkg-1.0/data/readme.txt": b"not a structure file",
        "trainpkg-1.0/other/outside.pdb": pdb_text(6).encode(),
    })
    zip_file(archives / "evalpkg-2.0-py3-none-any.whl", {
        "evalpkg/tests/2xyz.pdb": pdb_text(7).encode(),
        "evalpkg/tests/copy_of_train.pdb": a,
        "evalpkg/tests/1abc_again.pdb": pdb_text(8).encode(),
        "evalpkg/tests/a_as_cif.cif": as_mmcif(a.decode(), tmp_path),
    })
    fake = (
        sources.Source("train", "trainpkg", "1.0", "trainpkg-1.0.tar.gz", sha(archives / "trainpkg-1.0.tar.gz"),
                       ("trainpkg==1.0",), ("trainpkg-1.0/data/*",), ("*/synthetic.pdb",)),
        sources.Source("eval", "evalpkg", "2.0", "evalpkg-2.0-py3-none-any.whl",
                       sha(archives / "evalpkg-2.0-py3-none-any.whl"), ("evalpkg==2.0",), ("evalpkg/tests/*",)),
    )
    monkeypatch.setattr(sources, "SOURCES", fake)
    monkeypatch.setattr(lock, "LOCK_PATH", tmp_path / "lock.json")
    return cache

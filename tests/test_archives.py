"""Download, checksum and safe extraction (cryofastar.datasets.archives), offline on fake archives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryofastar.datasets import archives, sources
from structure_fixtures import pdb_text, sha, tar_gz


def test_destination_names() -> None:
    names = archives.destination_names(["a/x.pdb", "a/x.pdb.gz", "a/x.pdb.bz2", "a/y.cif.gz"])
    assert names == {"a/x.pdb": "a/x.pdb", "a/x.pdb.gz": "a/x.gz.pdb", "a/x.pdb.bz2": "a/x.bz2.pdb",
                     "a/y.cif.gz": "a/y.cif"}


def test_checksum_mismatch_is_a_clear_error(fake_sources: Path) -> None:
    source = sources.SOURCES[0]
    bad = dataclasses.replace(source, sha256="0" * 64)
    with pytest.raises(archives.ArchiveChecksumError, match="sha256"):
        archives.download_archive(bad, fake_sources / "archives")
    assert not (fake_sources / "archives" / source.archive).exists()


def test_present_archive_is_checked_not_downloaded(fake_sources: Path) -> None:
    source = sources.SOURCES[0]
    path = archives.download_archive(source, fake_sources / "archives")
    assert path == fake_sources / "archives" / source.archive
    assert archives.sha256_file(path) == source.sha256 == sha(path)


def test_extraction_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    tar_gz(tmp_path / "evil-1.0.tar.gz", {"evil-1.0/data/../../escape.pdb": pdb_text(1).encode()})
    source = sources.Source("train", "evil", "1.0", "evil-1.0.tar.gz", sha(tmp_path / "evil-1.0.tar.gz"),
                            ("evil==1.0",), ("evil-1.0/data/*",))
    with pytest.raises(ValueError, match="unsafe"):
        archives.extract_archive(tmp_path / "evil-1.0.tar.gz", source, tmp_path / "out")
    assert not (tmp_path / "escape.pdb").exists()


def test_extraction_decompresses_and_drops_the_sdist_folder(fake_sources: Path, tmp_path: Path) -> None:
    source = sources.SOURCES[0]
    out = archives.extract_archive(fake_sources / "archives" / source.archive, source, tmp_path / "x")
    by_member = {Path(m).name: (relative, content) for m, relative, content in out}
    assert set(by_member) == {"a.pdb", "a_copy.pdb.gz", "1abc.pdb", "pdb1abcA.pdb", "tiny.pdb", "junk.pdb",
                              "broken.pdb.gz", "synthetic.pdb"}
    relative, content = by_member["a_copy.pdb.gz"]
    assert relative == "trainpkg-1.0/data/a_copy.pdb"
    assert (tmp_path / "x" / relative).read_bytes() == content == by_member["a.pdb"][1]
    relative, content = by_member["broken.pdb.gz"]
    assert isinstance(content, Exception) and not (tmp_path / "x" / relative).exists()

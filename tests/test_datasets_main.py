"""``python -m cryofastar.datasets`` (cryofastar.datasets.__main__): every option, offline on fake archives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryofastar.datasets import lock, structures, training_doc
from cryofastar.datasets.__main__ import main


def test_help_names_every_option() -> None:
    done = subprocess.run([sys.executable, "-m", "cryofastar.datasets", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m cryofastar.datasets")
    for option in ("--role", "--cache-dir", "--write-manifest", "--write-lock", "--show-skipped"):
        assert option in done.stdout


def test_lock_table_and_manifest(fake_sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "TRAINING_DATA.md"
    assert main(["--role", "train", "--cache-dir", str(fake_sources), "--write-lock", "--show-skipped",
                 "--write-manifest", str(manifest)]) == 0
    printed = capsys.readouterr().out.splitlines()
    train, evaluation = structures.collect("train", fake_sources), structures.collect("eval", fake_sources)
    atoms = sum(r.atoms for r in train if r.kept)
    assert printed[-1] == f"train: 2 structures, {atoms:,} atoms; 6 files skipped"
    assert sum(line.startswith("skipped trainpkg:") for line in printed) == 6
    assert [line.split()[0] for line in printed[1:3]] == ["1abc.pdb", "a.pdb"]
    assert set(lock.read_lock()["roles"]) == {"train", "eval"}  # --write-lock's default: LOCK_PATH
    assert manifest.read_text(encoding="utf-8") == training_doc.render_training_doc(train, evaluation)
    assert main(["--role", "eval", "--cache-dir", str(fake_sources)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("eval: 1 structures")


def test_a_lock_mismatch_fails(fake_sources: Path, tmp_path: Path) -> None:
    lock.write_lock({"train": []})
    with pytest.raises(RuntimeError, match="python -m cryofastar.datasets --role train --write-lock"):
        main(["--role", "train", "--cache-dir", str(fake_sources)])
    other = tmp_path / "other.lock.json"
    assert main(["--role", "eval", "--cache-dir", str(fake_sources), "--write-lock", str(other)]) == 0
    assert set(lock.read_lock(other)["roles"]) == {"train", "eval"}
    assert lock.read_lock()["roles"]["train"]["kept"] == []  # the default lock is left alone

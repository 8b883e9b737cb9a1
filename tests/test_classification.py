"""engine.classification and ``cryofastar-stream classify``: the offline 2D job through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from cryofastar.engine.classification import ClassifySettings
from cryofastar.recon.io.class_files import CLASS_STAR_COLUMNS

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=600, check=False)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classify") / "session"
    done = _cli("simulate", "--out", str(out), "--n", "600", "--box", "32", "--apix", "3", "--snr", "1", "--ctf",
                "--junk", "0.2", "--seed", "3", "--per-stack", "200")
    assert done.returncode == 0, done.stderr
    return out


def test_classify_writes_what_relion_users_open(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "classes"
    done = _cli("classify", str(session / "particles.star"), "-o", str(out), "--classes", "6", "--passes", "2",
                "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "600 particles in 6 classes" in done.stdout
    with mrcfile.open(out / "class_averages.mrcs") as mrc:
        assert mrc.data.shape == (6, 32, 32)
        assert float(mrc.voxel_size.x) == pytest.approx(3.0)
        assert np.isfinite(mrc.data).all()
    classes = starfile.read(out / "classes.star")
    assert list(classes.columns) == list(CLASS_STAR_COLUMNS)
    assert list(classes["rlnClassNumber"]) == list(range(1, 7))
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-6)
    assert classes["rlnCryofastarParticleCount"].sum() == pytest.approx(600, rel=1e-5)
    particles = starfile.read(out / "particles.star")
    rows = particles["particles"]
    truth = starfile.read(session / "particles.star")["particles"]
    assert len(rows) == 600
    for column in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                   "rlnMaxValueProbDistribution", "rlnCryofastarJunk", "rlnDefocusU", "rlnCryofastarSimulatedJunk"):
        assert column in rows.columns, column
    assert rows["rlnClassNumber"].between(1, 6).all()
    assert rows["rlnAnglePsi"].between(0, 360).all()
    assert (rows["rlnDefocusU"].to_numpy() == truth["rlnDefocusU"].to_numpy()).all()
    # the image names resolve from the output directory
    stack = rows["rlnImageName"].iloc[0].split("@")[1]
    assert (out / stack).resolve() == (session / "particles_00001.mrcs").resolve()
    assert "optics" in particles
    # the selection: the same rows without the junk, readable as a particle set
    selected = starfile.read(out / "selected_particles.star")["particles"]
    keep = rows["rlnCryofastarJunk"] == 0
    assert list(selected["rlnImageName"]) == list(rows.loc[keep, "rlnImageName"])
    assert f"{int((~keep).sum())} of 600 particles flagged as junk" in done.stdout


def test_more_classes_than_particles_is_a_clear_error(session: Path, tmp_path: Path) -> None:
    done = _cli("classify", str(session / "particles.star"), "-o", str(tmp_path / "o"), "--classes", "601",
                "--no-progress")
    assert done.returncode == 2
    assert "600 particles cannot fill 601 classes" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "classes.star").exists()


def test_nan_images_are_reported_and_left_out(session: Path, tmp_path: Path) -> None:
    copy = tmp_path / "session"
    copy.mkdir()
    for path in session.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with mrcfile.open(copy / "particles_00002.mrcs", mode="r+") as mrc:
        mrc.data[5, 3, 3] = np.nan
    done = _cli("classify", str(copy / "particles.star"), "-o", str(tmp_path / "o"), "--classes", "4", "--passes",
                "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "NaN" in done.stderr or "non-finite" in done.stderr
    rows = starfile.read(tmp_path / "o" / "particles.star")["particles"]
    assert len(rows) == 599
    assert not rows["rlnImageName"].str.startswith("000006@particles_00002").any()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("classes", 0, "--classes"), ("diameter", -5.0, "--diameter"), ("max_shift", float("nan"), "--max-shift"),
    ("passes", 0, "--passes")])
def test_bad_settings(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifySettings(**{field: value})

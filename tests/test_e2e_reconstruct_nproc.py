"""End to end through the real console script: ``reconstruct --nproc 2`` (a real 2-rank gloo group started by
torch's launcher) against one process, and a rank killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.rotations import geodesic_degrees
from session_helpers import ENV, SCRIPT, launched_workers
from session_helpers import run_cli as run

N = 300
NAN_IMAGE = "000050@particles_00003.mrcs"  # read by rank 1 when the ranks check the images (the last block)


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("session")
    run("simulate", "--out", str(out), "--n", str(N), "--box", "40", "--apix", "3", "--snr", "1", "--ctf",
        "--per-stack", "100", "--seed", "1000000005")
    with mrcfile.open(out / "particles_00003.mrcs", mode="r+") as mrc:
        mrc.data[49, 5, 5] = np.nan  # one image the ranks must leave out alike, with one warning
    return out / "particles.star"


def _poses(path: Path) -> tuple[list[str], torch.Tensor, np.ndarray, np.ndarray]:
    particles = starfile.read(path)["particles"]
    angles = torch.tensor(particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(copy=True))
    origins = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(copy=True)
    return (particles["rlnImageName"].tolist(), euler_to_matrix(*angles.unbind(-1)), origins,
            particles["rlnCryofastarConfidence"].to_numpy(copy=True))


@pytest.mark.slow
def test_two_ranks_write_the_one_process_map_and_poses(star: Path, tmp_path: Path) -> None:
    args = ("reconstruct", str(star), "--views", "32", "--no-refine", "--no-progress")
    one = run(*args, "-o", str(tmp_path / "one"))
    two = run(*args, "-o", str(tmp_path / "two"), "--nproc", "2")
    for result in (one, two):  # the NaN image left out with one warning, by rank 0 alone
        assert f"{N - 1} particles posed" in result.stdout
        assert result.stderr.count("WARNING") == 1 and NAN_IMAGE in result.stderr and "Traceback" not in result.stderr
    assert "2 ranks: 1 all-reduce of the half-set grids (6.5 MiB each)" in two.stdout
    for name in ("volume.mrc", "volume_half1.mrc", "volume_half2.mrc"):
        expected = mrcfile.read(tmp_path / "one" / name).astype(np.float64)
        got = mrcfile.read(tmp_path / "two" / name).astype(np.float64)
        assert np.abs(got - expected).max() <= 1e-4 * expected.std(), name
    names1, rotations1, origins1, confidence1 = _poses(tmp_path / "one" / "particles.star")
    names2, rotations2, origins2, confidence2 = _poses(tmp_path / "two" / "particles.star")
    assert names1 == names2 and len(names1) == N - 1  # the same rows, in the input's order
    assert float(geodesic_degrees(rotations1, rotations2).max()) < 1e-3  # the network's passes held the same views
    assert np.abs(origins1 - origins2).max() < 1e-4 and np.abs(confidence1 - confidence2).max() < 1e-4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_a_killed_rank_ends_the_command_with_one_error_line(star: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    process = subprocess.Popen([str(SCRIPT), "reconstruct", str(star), "-o", str(tmp_path / "out"), "--views", "32",
                                "--no-progress", "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    try:
        workers: list[int] = []
        while len(workers) < 2 and process.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.05)
            workers = launched_workers(process.pid)
        assert len(workers) == 2, "the launcher did not start two workers"
        os.kill(workers[-1], signal.SIGKILL)  # one of the ranks (ours: started by this test's command)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert time.monotonic() - started < 90  # the launcher stopped the other rank: no hang
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank ") and "of 2 failed (exit code -9)" in lines[0]
    assert "SIGKILL" in lines[0] and "Traceback" not in stderr
    assert stdout == "" and not (tmp_path / "out" / "volume.mrc").exists()


def test_impossible_process_counts_are_refused_before_any_work(star: Path, tmp_path: Path) -> None:
    bad = run("reconstruct", str(star), "-o", str(tmp_path / "r"), "--nproc", "0", ok=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --nproc must be at least 1, got 0"
    if torch.cuda.device_count() < 2:
        gpus = run("reconstruct", str(star), "-o", str(tmp_path / "r"), "--nproc", "2", "--device", "cuda", ok=False)
        assert gpus.returncode == 2 and "--nproc 2 with --device cuda needs 2 GPUs" in gpus.stderr
    assert not (tmp_path / "r").exists()

"""Our conventions against RELION's own programs (RELION 3.1, Debian's ``relion``; scripts/setup.sh --test installs it).

The same STAR files go to ``relion_reconstruct`` and to ``cryofastar-stream backproject``: particles
written by ``cryofastar-stream simulate`` with shifts up to 4 px, with and without a CTF. If our
reading of rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, the CTF parameters or the map's axes and centre
departed from RELION's, the two maps would disagree (a shift sign error blurs and a half-pixel centre
error flips the sign of the FSC at high frequency). Both maps must also match the simulator's
``reference.mrc``. And 2D: the Class2D columns ``classify`` writes, applied by
``relion_stack_create --apply_transformation``, must turn each particle into its class average.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from conftest import blob_phantom
from cryofastar.recon import fsc
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.io import read_images, read_volume, write_particles, write_stack
from cryofastar.recon.simulate.particles import simulate_particles

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
RELION = shutil.which("relion_reconstruct")

pytestmark = pytest.mark.skipif(RELION is None and os.environ.get("CI") is None,
                                reason="relion_reconstruct not installed: bash scripts/setup.sh --test installs it")


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _maps(tmp_path: Path, ctf: bool, negate_origins: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION's map, ours and the true one, for one simulated set (box 48, 2 Å/px, SNR 20, shifts up to 4 px)."""
    assert RELION is not None, "relion_reconstruct not found: bash scripts/setup.sh --test installs Debian's relion"
    sim = tmp_path / "sim"
    _run([str(SCRIPT), "simulate", "--out", str(sim), "--n", "1500", "--box", "48", "--apix", "2", "--snr", "20",
          "--seed", "4242", "--ctf" if ctf else "--no-ctf"])
    if negate_origins:
        blocks = starfile.read(sim / "particles.star", always_dict=True)
        for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
            blocks["particles"][column] = -blocks["particles"][column]
        starfile.write(blocks, sim / "particles.star", overwrite=True)
    # RELION resolves image names against the working directory: run it where the STAR file is. Its
    # booleans are presence flags: "--ctf false" turns CTF correction ON (and, on particles without
    # rlnDefocusU/V, corrects for a defocus-0 CTF, which flips the map's sign beyond ~8 Å here).
    _run([RELION, "--i", "particles.star", "--o", str(tmp_path / "relion.mrc"), *(["--ctf"] if ctf else [])],
         cwd=sim)
    _run([str(SCRIPT), "backproject", str(sim / "particles.star"), "-o", str(tmp_path / "ours.mrc")])
    return (read_volume(tmp_path / "relion.mrc")[0], read_volume(tmp_path / "ours.mrc")[0],
            read_volume(sim / "reference.mrc")[0])


@pytest.mark.slow
@pytest.mark.parametrize("ctf", [False, True], ids=["no-ctf", "ctf"])
def test_relion_reconstruct_and_backproject_make_the_same_map(tmp_path: Path, ctf: bool) -> None:
    relion, ours, truth = _maps(tmp_path, ctf)
    shells = slice(1, int(0.9 * 24))  # DC excluded, up to 0.9 Nyquist
    between = fsc(relion, ours)[shells]
    assert float(between.min()) > 0.9, f"RELION's map and ours differ: FSC {between.tolist()}"
    for name, volume in (("RELION", relion), ("ours", ours)):
        vs_truth = fsc(volume, truth)[shells]
        assert float(vs_truth.min()) > 0.5, f"{name} vs reference.mrc: FSC {vs_truth.tolist()}"


@pytest.mark.slow
def test_negated_origins_break_the_agreement_with_the_truth_for_both(tmp_path: Path) -> None:
    """The check above can fail: with the other shift sign both maps lose the truth beyond low resolution."""
    relion, ours, truth = _maps(tmp_path, ctf=False, negate_origins=True)
    high = slice(8, 20)
    assert float(fsc(relion, truth)[high].mean()) < 0.5 and float(fsc(ours, truth)[high].mean()) < 0.5
    assert float(fsc(relion, ours)[1:20].min()) > 0.85  # wrong the same way: the same meaning of rlnOrigin


def test_class2d_columns_mean_what_relion_means(tmp_path: Path) -> None:
    """``classify``'s rlnAnglePsi / rlnOriginX/YAngst, applied by ``relion_stack_create --apply_transformation``,
    turn every particle into its class average; with psi negated they do not."""
    stack_create = shutil.which("relion_stack_create")
    assert stack_create is not None, "relion_stack_create not found: bash scripts/setup.sh --test installs relion"
    box, apix, n = 48, 2.0, 40
    g = torch.Generator().manual_seed(0)
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360
    zero = torch.zeros(n, dtype=torch.float64)
    view = euler_to_matrix(zero + 30, zero + 60, zero)
    sim = simulate_particles(blob_phantom(box, seed=3), n, apix, 20.0, g, max_shift_px=3.0,
                             rotations=euler_to_matrix(zero, zero, psi) @ view)
    session = tmp_path / "session"
    session.mkdir()
    write_stack(session / "p.mrcs", sim.images, apix)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_particles(session / "particles.star", pd.DataFrame(
        {"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)], "rlnOpticsGroup": 1}), optics)
    _run([str(SCRIPT), "classify", str(session / "particles.star"), "-o", str(tmp_path / "out"), "--classes", "1",
          "--no-progress"])
    average = read_images(tmp_path / "out" / "class_averages.mrcs")[0].numpy()

    def aligned(star: Path, name: str) -> np.ndarray:
        _run([stack_create, "--i", str(star), "--o", name, "--apply_transformation"], cwd=tmp_path / "out")
        return read_images(tmp_path / "out" / f"{name}.mrcs").numpy()

    def correlation(images: np.ndarray) -> float:
        return float(np.median([np.corrcoef(x.ravel(), average.ravel())[0, 1] for x in images]))

    assert correlation(aligned(tmp_path / "out" / "particles.star", "relion_aligned")) > 0.9
    table = starfile.read(tmp_path / "out" / "particles.star")
    table["particles"]["rlnAnglePsi"] = -table["particles"]["rlnAnglePsi"]
    starfile.write(table, tmp_path / "out" / "negated.star", overwrite=True)
    assert correlation(aligned(tmp_path / "out" / "negated.star", "negated")) < 0.6

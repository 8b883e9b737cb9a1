"""End to end through the real console script: simulate a session, reconstruct it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryofastar.recon import fsc
from cryofastar.recon.io import read_volume
from session_helpers import run_cli as run


@pytest.mark.slow
@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_noise_free_session_reconstructs_to_near_nyquist(tmp_path: Path, interpolation: str) -> None:
    run("simulate", "--out", str(tmp_path), "--n", "1500", "--box", "48", "--apix", "2.5",
        "--no-noise", "--per-stack", "500", "--seed", "4")
    out = run("backproject", str(tmp_path / "particles.star"), "-o", str(tmp_path / "map.mrc"),
              "--interpolation", interpolation, "--reference", str(tmp_path / "reference.mrc"))
    assert "FSC 0.5 resolution against" in out.stdout
    assert float(out.stdout.split("reference.mrc:")[1].split("Å")[0]) == pytest.approx(5.0, abs=0.3)  # Nyquist
    table = (tmp_path / "map_fsc.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["shell", "resolution_angstrom", "fsc_half_maps", "fsc_vs_reference"]
    assert len(table) == 1 + 25
    ours, apix = read_volume(tmp_path / "map.mrc")
    truth, _ = read_volume(tmp_path / "reference.mrc")
    assert apix == pytest.approx(2.5)
    curve = fsc(ours, truth)
    assert float(curve[1 : int(0.9 * 24) + 1].min()) > 0.95


@pytest.mark.slow
def test_ctf_session_with_noise_gives_a_gold_standard_resolution(tmp_path: Path) -> None:
    run("simulate", "--out", str(tmp_path), "--n", "2000", "--box", "48", "--apix", "3.0", "--snr", "1",
        "--ctf", "--defocus-min", "0.8", "--defocus-max", "2.0", "--per-stack", "1000", "--seed", "5")
    out = run("backproject", str(tmp_path / "particles.star"), "-o", str(tmp_path / "map.mrc"),
              "--half-maps", "--interpolation", "nearest")
    reported = float(out.stdout.split("resolution")[1].split("Å")[0])
    assert 2 * 3.0 <= reported < 15.0
    ours, _ = read_volume(tmp_path / "map.mrc")
    truth, _ = read_volume(tmp_path / "reference.mrc")
    curve = fsc(ours, truth)
    assert float(curve[1:8].min()) > 0.9  # low resolution, before the first CTF zero
    no_ctf = run("backproject", str(tmp_path / "particles.star"), "-o", str(tmp_path / "raw.mrc"), "--no-ctf",
                 "--interpolation", "nearest")
    assert "resolution" in no_ctf.stdout
    raw, _ = read_volume(tmp_path / "raw.mrc")
    # beyond the first CTF zero (~20 Å here) only CTF-weighted insertion gets the phases right
    beyond = slice(9, 17)
    assert float(curve[beyond].mean()) > 0.8
    assert float(fsc(raw, truth)[beyond].mean()) < float(curve[beyond].mean()) - 0.3

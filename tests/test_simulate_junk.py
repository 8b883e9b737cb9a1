"""Junk in simulated sessions (recon/simulate/junk.py, session.py, ``simulate --junk``): each type is what it
claims, the shares are right, the particles are untouched, and the truth column reaches the readers."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from cryofastar.recon.io import ParticleSource, read_particles
from cryofastar.recon.io.columns import SIMULATED_JUNK_COLUMN
from cryofastar.recon.simulate import (
    CtfRange,
    JunkScale,
    JunkType,
    ProceduralSettings,
    atoms_to_volume,
    procedural_molecule,
    simulate_junk,
    simulate_particles,
    write_session,
)
from cryofastar.recon.simulate.junk import EDGE_CONTRAST, OFF_CENTRE_MAX, OFF_CENTRE_MIN
from scipy import ndimage
from typer.testing import CliRunner

from cryofastar.cli import app

BOX, APIX, N = 64, 2.0, 40


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    """A small procedural molecule (~22 px across) in a 64-px box, so that a pair of them fits."""
    return atoms_to_volume(procedural_molecule(1, ProceduralSettings(max_residues=200)), BOX, APIX)


@pytest.fixture(scope="module")
def scale(volume: torch.Tensor) -> JunkScale:
    return JunkScale.measure(volume, torch.Generator().manual_seed(0))


def _junk(volume: torch.Tensor, scale: JunkScale, kind: JunkType, seed: int = 1, **kwargs: object):  # noqa: ANN202
    return simulate_junk(volume, torch.full((N,), int(kind)), APIX, torch.Generator().manual_seed(seed), scale,
                         **kwargs)


def _particles(volume: torch.Tensor, ctf: CtfRange | None = None) -> torch.Tensor:
    return simulate_particles(volume, N, APIX, None, torch.Generator().manual_seed(2), ctf=ctf).images


def _coherence(images: torch.Tensor) -> torch.Tensor:
    """`(n,)` coherence of the gradient structure tensor: 1 when every gradient is parallel (one direction)."""
    gy, gx = torch.gradient(images.double(), dim=(-2, -1))
    jxx, jyy, jxy = (gx * gx).sum((-2, -1)), (gy * gy).sum((-2, -1)), (gx * gy).sum((-2, -1))
    trace = jxx + jyy
    return 2 * (trace**2 / 4 - (jxx * jyy - jxy**2)).clamp(min=0).sqrt() / trace


def _blobs(image: torch.Tensor, level: float, min_area: float) -> int:
    """Connected regions above ``level`` of the image smoothed by a 2-px Gaussian, each of ``min_area`` px or more."""
    labels, _ = ndimage.label(ndimage.gaussian_filter(image.numpy(), 2.0) > level)
    return int((np.bincount(labels.ravel())[1:] >= min_area).sum())


def test_scale_measures_the_molecule(volume: torch.Tensor, scale: JunkScale) -> None:
    projections = _particles(volume)
    assert scale.peak == pytest.approx(float(projections.amax((-2, -1)).mean()), rel=0.15)
    radius = procedural_molecule(1, ProceduralSettings(max_residues=200)).radius_angstrom() / APIX
    assert 1.6 * radius <= scale.diameter_px <= 2.4 * radius


def test_noise_box_has_no_signal(volume: torch.Tensor, scale: JunkScale) -> None:
    assert float(_junk(volume, scale, JunkType.NOISE, ctf=CtfRange()).images.abs().max()) == 0.0
    sigma = 0.7
    noisy = _junk(volume, scale, JunkType.NOISE, noise_sigma=sigma)
    assert float(noisy.images.square().mean()) == pytest.approx(sigma**2, rel=0.03)
    assert float(noisy.images.mean()) == pytest.approx(0.0, abs=0.01)
    assert noisy.noise_sigma == sigma and noisy.ctf is None
    assert len(_junk(volume, scale, JunkType.NOISE, ctf=CtfRange()).ctf) == N  # the row's CTF is complete


def test_carbon_edge_is_a_strong_straight_step(volume: torch.Tensor, scale: JunkScale) -> None:
    edges = _junk(volume, scale, JunkType.CARBON_EDGE).images
    height = EDGE_CONTRAST * scale.peak
    # a step: nearly every pixel on one of two levels (film and ice), both present, one height apart
    on_level = ((edges.abs() < 0.05 * height) | ((edges - height).abs() < 0.05 * height)).float().mean((-2, -1))
    assert float(on_level.min()) > 0.85
    assert torch.allclose(edges.amax((-2, -1)) - edges.amin((-2, -1)), torch.full((N,), height), rtol=0.02)
    assert height > 5 * float(_particles(volume).std(dim=(-2, -1)).mean())  # several times the particle's std
    # one direction: every gradient parallel, with or without the CTF's fringes; a particle has none
    assert float(_coherence(edges).min()) > 0.95
    with_ctf = _junk(volume, scale, JunkType.CARBON_EDGE, ctf=CtfRange()).images
    assert float(_coherence(with_ctf).min()) > 0.95
    assert float(_coherence(_particles(volume, CtfRange())).max()) < 0.5
    assert float(with_ctf.var(dim=(-2, -1)).mean()) > 3 * float(_particles(volume, CtfRange()).var(dim=(-2, -1)).mean())
    # the CTF's fringes: sign changes across the edge, where the clean step has none below zero
    assert float(edges.min()) > -0.02 * height and float(with_ctf.amin((-2, -1)).max()) < 0


def test_aggregate_is_two_particles(volume: torch.Tensor, scale: JunkScale) -> None:
    single = _particles(volume)
    pairs = _junk(volume, scale, JunkType.AGGREGATE).images
    threshold = 0.05 * float(single.amax((-2, -1)).median())
    support = (single > threshold).float().sum((-2, -1)).median()
    ratio = (pairs > threshold).float().sum((-2, -1)) / support
    assert 1.7 <= float(ratio.median()) <= 2.3
    assert float(pairs.sum()) == pytest.approx(2 * float(single.sum()), rel=0.05)  # two molecules' density
    smooth_peak = float(ndimage.gaussian_filter(single.numpy(), (0, 2, 2)).max((-2, -1)).mean())
    min_area = 0.25 * float(support)
    two = [_blobs(p, 0.2 * smooth_peak, min_area) == 2 for p in pairs]
    one = [_blobs(p, 0.2 * smooth_peak, min_area) == 1 for p in single]
    assert sum(two) >= 0.9 * N and all(one)


def test_off_centre_particle_sits_near_the_edge_and_is_cut(volume: torch.Tensor, scale: JunkScale) -> None:
    sim = _junk(volume, scale, JunkType.OFF_CENTRE)
    displacement = -sim.origins_angstrom / APIX  # the recorded origin re-centres it
    distance = displacement.norm(dim=-1) / BOX
    assert float(distance.min()) >= OFF_CENTRE_MIN and float(distance.max()) <= OFF_CENTRE_MAX
    weights = sim.images.double().clamp(min=0)
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    mass = weights.sum((-2, -1))
    centre = torch.stack([(weights * c).sum((-2, -1)), (weights * c[:, None]).sum((-2, -1))], -1) / mass[:, None]
    # the visible part's centre of mass lies towards the recorded displacement, >= 0.28 B out (the cut-off
    # part pulls it in from the displacement's >= 0.3 B)
    assert float((centre.norm(dim=-1) / BOX).min()) >= 0.28 and float((centre.norm(dim=-1) / BOX).median()) >= 0.33
    cosine = (centre * displacement).sum(-1) / (centre.norm(dim=-1) * displacement.norm(dim=-1))
    assert float(cosine.min()) > 0.99
    whole = float(_particles(volume).sum((-2, -1)).mean())
    assert float(sim.images.sum((-2, -1)).min()) < 0.9 * whole  # some are partly cut off, not wrapped round
    assert float(sim.images.sum((-2, -1)).max()) <= 1.05 * whole


def test_junk_types_outside_1_to_4_are_refused(volume: torch.Tensor, scale: JunkScale) -> None:
    with pytest.raises(ValueError, match=r"junk types must be 1\.\.4"):
        simulate_junk(volume, torch.tensor([1, 0]), APIX, torch.Generator(), scale)
    with pytest.raises(ValueError, match="junk fraction must be in"):
        write_session("unused", volume, APIX, 10, None, 0, junk_fraction=1.0)


def _stack_images(directory: Path) -> np.ndarray:
    return np.concatenate([mrcfile.read(p) for p in sorted(directory.glob("particles_*.mrcs"))])


def test_session_junk_shares_truth_column_and_untouched_particles(tmp_path: Path) -> None:
    vol = atoms_to_volume(procedural_molecule(3, ProceduralSettings(max_residues=150)), 32, 3.0)
    ctf = CtfRange()
    junky = write_session(tmp_path / "junk", vol, 3.0, 103, snr=0.5, seed=5, per_stack=30, ctf=ctf,
                          junk_fraction=0.2)
    clean = write_session(tmp_path / "clean", vol, 3.0, 103, snr=0.5, seed=5, per_stack=30, ctf=ctf)
    table = read_particles(junky).particles
    kinds = table[SIMULATED_JUNK_COLUMN].to_numpy()
    assert np.issubdtype(kinds.dtype, np.integer)
    counts = np.bincount(kinds, minlength=5)
    assert counts[0] == 103 - 21 and sorted(counts[1:].tolist()) == [5, 5, 5, 6]  # round(0.2 * 103) = 21
    assert len({i // 30 for i in np.flatnonzero(kinds)}) > 1  # spread over the stacks
    info = json.loads((tmp_path / "junk" / "simulation.json").read_text())
    assert info["junk_fraction"] == 0.2
    assert info["junk_counts"] == {"noise": counts[1], "carbon_edge": counts[2], "aggregate": counts[3],
                                   "off_centre": counts[4]}
    info_clean = json.loads((tmp_path / "clean" / "simulation.json").read_text())
    assert info["noise_sigma"] == info_clean["noise_sigma"]  # the particles still define the noise
    assert info_clean["junk_counts"] == {"noise": 0, "carbon_edge": 0, "aggregate": 0, "off_centre": 0}
    assert SIMULATED_JUNK_COLUMN not in read_particles(clean).particles.columns

    a, b = _stack_images(tmp_path / "junk"), _stack_images(tmp_path / "clean")
    real = kinds == 0
    assert a[real].tobytes() == b[real].tobytes()  # the real particles are the junk-free session's
    assert not np.any(np.all(a[~real] == b[~real], axis=(-2, -1)))
    # every junk row is complete: poses and CTF from the session's distribution
    junk_rows = table[~real]
    assert np.isfinite(junk_rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                                  "rlnOriginYAngst"]].to_numpy()).all()
    assert junk_rows["rlnDefocusU"].between(ctf.defocus_min_angstrom, ctf.defocus_max_angstrom).all()
    # the noise boxes hold noise of the session's sigma
    sigma = info["noise_sigma"]
    assert float(a[kinds == JunkType.NOISE].std()) == pytest.approx(sigma, rel=0.05)

    again = write_session(tmp_path / "again", vol, 3.0, 103, snr=0.5, seed=5, per_stack=30, ctf=ctf,
                          junk_fraction=0.2)
    assert _stack_images(tmp_path / "again").tobytes() == a.tobytes()  # seeded
    assert (read_particles(again).particles[SIMULATED_JUNK_COLUMN].to_numpy() == kinds).all()
    other = write_session(tmp_path / "other", vol, 3.0, 103, snr=0.5, seed=6, per_stack=30, ctf=ctf,
                          junk_fraction=0.2)
    assert (read_particles(other).particles[SIMULATED_JUNK_COLUMN].to_numpy() != kinds).any()


def test_junk_free_session_keeps_the_particles_random_stream(tmp_path: Path) -> None:
    """junk 0 writes exactly the images of the recipe before junk existed: one generator seeded ``seed``, drawn
    stack by stack, with the noise level of a 64-particle probe seeded ``seed + 1``."""
    vol = atoms_to_volume(procedural_molecule(4, ProceduralSettings(max_residues=100)), 32, 3.0)
    ctf = CtfRange()
    write_session(tmp_path, vol, 3.0, 25, snr=0.3, seed=9, per_stack=10, ctf=ctf, junk_fraction=0.0)
    probe = simulate_particles(vol, 64, 3.0, 0.3, torch.Generator().manual_seed(10), ctf=ctf)
    generator = torch.Generator().manual_seed(9)
    expected = [simulate_particles(vol, count, 3.0, None, generator, ctf=ctf, noise_sigma=probe.noise_sigma).images
                for count in (10, 10, 5)]
    assert _stack_images(tmp_path).tobytes() == torch.cat(expected).numpy().tobytes()


def test_simulate_junk_on_the_cli_reaches_the_readers(tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), "--n", "40", "--box", "32", "--apix", "3",
                                      "--snr", "1", "--ctf", "--junk", "0.2", "--per-stack", "20", "--seed", "2"])
    assert result.exit_code == 0, result.output
    star = out / "particles.star"
    table = read_particles(star)
    assert np.bincount(table.particles[SIMULATED_JUNK_COLUMN].to_numpy(), minlength=5).tolist() == [32, 2, 2, 2, 2]
    source, skipped = ParticleSource.from_star(star).finite(warn=False)
    assert len(source) == 40 and len(skipped) == 0
    images = source.images(np.arange(40)).all_images()
    assert images.shape == (40, 32, 32) and bool(torch.isfinite(images).all())

    rec = CliRunner().invoke(app, ["reconstruct", str(star), "-o", str(tmp_path / "r"), "--no-refine", "--views",
                                   "16", "--no-progress", "--device", "cpu"])
    assert rec.exit_code == 0, rec.output
    assert rec.stdout.startswith("40 particles posed in ")
    written = read_particles(tmp_path / "r" / "particles.star").particles
    assert len(written) == 40


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_bad_junk_values_are_one_clear_error(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--n", "8", "--box", "16",
                                      "--no-noise", "--junk", value])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    shown = "nan" if value == "nan" else str(float(value))
    assert f"--junk must be a fraction in [0, 1) (the share of particles replaced by junk), got {shown}" in lines[0]
    assert not (tmp_path / "s").exists()


def test_junk_that_is_not_a_number_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--junk", "lots"])
    assert result.exit_code == 2 and "--junk" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()

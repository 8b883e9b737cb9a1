"""Pose-accuracy metrics (cryofastar.model.evaluation) and the ``evaluate`` command.

The alignment formulas (a global rotation of the map acts as ``A -> A @ Q``, its mirror
as ``A -> J @ A @ M``) are checked against real projections of an asymmetric map.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cryofastar.model.evaluation import (
    apply_alignment_to_rotations,
    chance_level,
    fit_map_translation,
    geodesic_degrees,
    global_alignment,
    mirror_rotations,
    pose_errors,
)
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.io import write_particles, write_stack
from cryofastar.recon.rotations import random_rotations
from scipy.ndimage import map_coordinates
from scipy.ndimage import shift as scipy_shift

J = np.diag([1.0, 1.0, -1.0])
# median of |w| for w ~ N(0, I_3) (chi distribution, 3 degrees of freedom)
CHI3_MEDIAN = 1.5381722544550522


def _perturb(rot: torch.Tensor, sigma_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """``rot @ exp([w]x)`` with rotation vectors ``w ~ N(0, sigma^2 I)``: geodesic error ``|w|``."""
    w = torch.randn(rot.shape[0], 3, generator=generator, dtype=torch.float64) * math.radians(sigma_degrees)
    zero = torch.zeros_like(w[:, 0])
    skew = torch.stack([zero, -w[:, 2], w[:, 1], w[:, 2], zero, -w[:, 0], -w[:, 1], w[:, 0], zero], -1)
    return rot @ torch.linalg.matrix_exp(skew.reshape(-1, 3, 3))


# --------------------------------------------------------------------------- metrics


def test_identity_gives_zero_error() -> None:
    true = random_rotations(100, torch.Generator().manual_seed(0))
    shifts = torch.randn(100, 2, dtype=torch.float64)
    errors = pose_errors(true, true, shifts, shifts)
    assert not errors.alignment.mirrored
    torch.testing.assert_close(errors.alignment.rotation, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert errors.frobenius.max() < 1e-12
    assert errors.geodesic_degrees.max() < 1e-6
    assert errors.translation_median_px == 0.0 and errors.translation_mean_px == 0.0


def test_global_rotation_is_removed() -> None:
    g = torch.Generator().manual_seed(1)
    true = random_rotations(200, g)
    q = random_rotations(1, g)[0]
    errors = pose_errors(true @ q, true)
    assert not errors.alignment.mirrored
    torch.testing.assert_close(errors.alignment.rotation, q.T, atol=1e-10, rtol=0)
    assert errors.frobenius_mean < 1e-10 and errors.geodesic_median_degrees < 1e-6
    torch.testing.assert_close(apply_alignment_to_rotations(true @ q, errors.alignment), true, atol=1e-10, rtol=0)


def test_mirrored_and_rotated_is_removed_with_mirrored_flag() -> None:
    g = torch.Generator().manual_seed(2)
    true = random_rotations(200, g)
    q = random_rotations(1, g)[0]
    errors = pose_errors(mirror_rotations(true) @ q, true)
    assert errors.alignment.mirrored
    assert errors.alignment.median_degrees[1] < 1e-6 < errors.alignment.median_degrees[0]
    assert errors.frobenius.max() < 1e-10 and errors.geodesic_degrees.max() < 1e-6


def test_mirror_is_rot_and_psi_plus_180() -> None:
    angles = torch.tensor([[30.0, 50.0, -70.0], [-120.0, 140.0, 10.0]], dtype=torch.float64)
    a = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    b = euler_to_matrix(angles[:, 0] + 180, angles[:, 1], angles[:, 2] + 180)
    torch.testing.assert_close(mirror_rotations(a), b, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(mirror_rotations(a)), torch.ones(2, dtype=torch.float64))


def test_geodesic_and_frobenius_agree_with_known_angles() -> None:
    angle = torch.tensor([0.0, 1e-5, 10.0, 90.0, 179.9], dtype=torch.float64)
    rz = euler_to_matrix(angle, torch.zeros_like(angle), torch.zeros_like(angle))
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    torch.testing.assert_close(geodesic_degrees(eye, rz), angle, atol=1e-9, rtol=0)
    errors = pose_errors(rz, eye, alignment=global_alignment(eye, eye))
    expected = 2 * math.sqrt(2) * torch.sin(torch.deg2rad(angle) / 2)  # ||R - I||_F, not squared
    torch.testing.assert_close(errors.frobenius, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sigma", [2.0, 8.0])
def test_noisy_poses_give_expected_median_geodesic(sigma: float) -> None:
    g = torch.Generator().manual_seed(3)
    true = random_rotations(4000, g)
    q = random_rotations(1, g)[0]
    pred = mirror_rotations(_perturb(true, sigma, g)) @ q
    errors = pose_errors(pred, true)
    assert errors.alignment.mirrored
    assert errors.geodesic_median_degrees == pytest.approx(CHI3_MEDIAN * sigma, rel=0.04)
    # small angles: ||dR||_F = 2 sqrt(2) sin(theta / 2) ~ sqrt(2) theta
    assert errors.frobenius_median == pytest.approx(math.sqrt(2) * math.radians(CHI3_MEDIAN * sigma), rel=0.04)


def test_alignment_is_robust_to_outliers() -> None:
    g = torch.Generator().manual_seed(4)
    true = random_rotations(400, g)
    q = random_rotations(1, g)[0]
    pred = true @ q
    pred[:160] = random_rotations(160, g)  # 40% garbage
    errors = pose_errors(pred, true)
    assert not errors.alignment.mirrored
    assert errors.geodesic_degrees[160:].max() < 1e-6


def test_random_poses_are_at_chance_level() -> None:
    g = torch.Generator().manual_seed(5)
    true = random_rotations(3000, g)
    chance = chance_level(true, g)
    # uniform SO(3): median angle 132.3 deg, mean 126.5 deg, mean ||dR||_F = 16 sqrt(2) / (3 pi) = 2.40
    assert 125 < chance.geodesic_median_degrees < 135
    assert 120 < chance.geodesic_mean_degrees < 130
    assert chance.frobenius_mean == pytest.approx(16 * math.sqrt(2) / (3 * math.pi), abs=0.05)
    assert chance.translation_px is None
    shifts = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    with_shifts = chance_level(true, g, shifts, shifts)
    assert with_shifts.translation_median_px == pytest.approx(math.sqrt(2 * math.log(2)) * math.sqrt(2), rel=0.1)


def test_bad_shapes_raise() -> None:
    true = random_rotations(5, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="same shape"):
        global_alignment(true[:4], true)
    with pytest.raises(ValueError, match="both"):
        pose_errors(true, true, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="shifts"):
        pose_errors(true, true, torch.zeros(4, 2), torch.zeros(4, 2))


def test_fit_translation_removes_an_off_centre_map() -> None:
    """Shifts of an off-centre map, (A t)[:2] away from the truth, score as exact once t is fitted."""
    g = torch.Generator().manual_seed(11)
    true = random_rotations(400, g)
    true_shift = torch.randn(400, 2, generator=g, dtype=torch.float64) * 3
    t = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    noise = torch.randn(400, 2, generator=g, dtype=torch.float64) * 0.05
    pred_shift = true_shift + true[:, :2, :] @ t + noise
    pred_shift[:40] = torch.randn(40, 2, generator=g, dtype=torch.float64) * 4  # 10 % lost particles
    plain = pose_errors(true, true, pred_shift, true_shift)
    fitted = pose_errors(true, true, pred_shift, true_shift, fit_translation=True)
    assert plain.translation_median_px > 1.0 and plain.map_translation_px is None
    torch.testing.assert_close(fitted.map_translation_px, t, atol=0.02, rtol=0)
    assert fitted.translation_median_px < 0.1
    assert fitted.summary()["map_translation_px"] == pytest.approx(t.tolist(), abs=0.02)
    # the same fit on centred poses finds nothing to remove
    centred = fit_map_translation(true, true_shift + noise, true_shift)
    assert centred.norm() < 0.02


# --------------------------------------------------------------------------- formulas vs projections


def _resample(volume: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The map ``V'(r) = V(m @ r)``, r = (x, y, z) relative to the centre B // 2 (cubic spline)."""
    box = volume.shape[0]
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    src = m @ np.stack([xx.ravel(), yy.ravel(), zz.ravel()])
    coords = np.stack([src[2], src[1], src[0]]) + box // 2
    return map_coordinates(volume, coords, order=3, mode="constant", cval=0.0).reshape(volume.shape)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_alignment_formulas_match_projections(make_phantom, projector) -> None:
    """V_pred(r) = V_true(Q r) is seen at A_true @ Q; V_true(M r) (det M = -1) at J @ A_true @ M.

    Both predicted sets project to the true images pixel for pixel (so shifts carry over
    unchanged, not negated), and global_alignment recovers G = Q.T (mirrored for M = Q J).
    """
    box = 24
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    inside = np.sqrt(xx**2 + yy**2 + zz**2) < box / 2 - 2  # nothing leaves the box when rotated
    true_map = make_phantom(box).numpy().astype(np.float64) * inside
    g = torch.Generator().manual_seed(7)
    poses = random_rotations(4, g).numpy()
    q = random_rotations(1, g).numpy()[0]
    m = q @ J
    frames = {
        "rotated": (_resample(true_map, q), poses @ q, poses @ q.T),  # (map, formula, wrong formula)
        "mirrored": (_resample(true_map, m), J @ poses @ m, J @ poses @ J @ q.T),
    }
    for name, (pred_map, pred_poses, wrong_poses) in frames.items():
        pred_tensor = torch.as_tensor(pred_map, dtype=torch.float32)
        for a_true, a_pred, a_wrong in zip(poses, pred_poses, wrong_poses, strict=True):
            image = projector(torch.as_tensor(true_map, dtype=torch.float32), a_true)
            seen = projector(pred_tensor, a_pred)
            inverted = np.roll(image[::-1, ::-1], 1, axis=(0, 1))  # (x, y) -> (-x, -y) about B // 2
            assert _corr(seen, image) > 0.995, name
            assert _corr(projector(pred_tensor, a_wrong), image) < 0.95, name
            assert _corr(seen, inverted) < 0.95, name
        alignment = global_alignment(torch.as_tensor(pred_poses), torch.as_tensor(poses))
        assert alignment.mirrored == (name == "mirrored")
        np.testing.assert_allclose(alignment.rotation.numpy(), q.T, atol=1e-10)
        aligned = apply_alignment_to_rotations(torch.as_tensor(pred_poses), alignment)
        np.testing.assert_allclose(aligned.numpy(), poses, atol=1e-10)


def test_map_translation_moves_images_by_rows_of_a(make_phantom, projector) -> None:
    """V_pred(r) = V_true(r - t) is seen at pose A as the true image moved by (A t)[:2] (x, y)."""
    box = 24
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    true_map = make_phantom(box).numpy().astype(np.float64) * (np.sqrt(xx**2 + yy**2 + zz**2) < box / 2 - 4)
    t = np.array([2.0, -1.0, 1.5])
    moved_map = scipy_shift(true_map, t[::-1], order=3)  # [z, y, x] indexing
    for a in random_rotations(3, torch.Generator().manual_seed(8)).numpy():
        dx, dy = (a @ t)[:2]
        image = projector(torch.as_tensor(true_map, dtype=torch.float32), a)
        seen = projector(torch.as_tensor(moved_map, dtype=torch.float32), a)
        assert _corr(seen, scipy_shift(image, (dy, dx), order=3)) > 0.99
        assert _corr(seen, scipy_shift(image, (-dy, -dx), order=3)) < 0.9


# --------------------------------------------------------------------------- the console script


SCRIPT = str(Path(sys.executable).parent / "cryofastar-stream")


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
OPTICS = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [8]})


def _write_star(path: Path, names: list[str], rot: torch.Tensor, origins_angstrom: torch.Tensor,
                **extra: np.ndarray) -> None:
    angles = torch.stack(matrix_to_euler(rot), -1).numpy()
    origins = origins_angstrom.numpy()
    write_particles(path, pd.DataFrame({
        "rlnImageName": names, "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2], "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
        "rlnOpticsGroup": 1, **extra,
    }), OPTICS)


def test_evaluate_command(tmp_path: Path) -> None:
    n, apix = 60, 2.0
    g = torch.Generator().manual_seed(8)
    write_stack(tmp_path / "stack.mrcs", torch.zeros(n, 8, 8), apix)
    true = random_rotations(n, g)
    true_origins = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3 * apix
    _write_star(tmp_path / "truth.star", [f"{i:06d}@stack.mrcs" for i in range(1, n + 1)], true, true_origins)

    kept = np.arange(10, n)  # the prediction lacks the first 10 particles; names written as 11@, not 000011@
    pred = mirror_rotations(_perturb(true, 2.0, g)) @ random_rotations(1, g)[0]
    # the predicted map sits off-centre by t (px), which moves particle i by (A_i t)[:2]; on top of
    # that every particle is 0.5 px off, which no map translation explains
    t = torch.tensor([2.0, -1.5, 3.0], dtype=torch.float64)
    off_centre = (true[:, :2, :] @ t) * apix
    pred_origins = true_origins + off_centre + torch.tensor([0.3 * apix, -0.4 * apix], dtype=torch.float64)
    confidence = np.linspace(1, 0, len(kept))
    _write_star(tmp_path / "pred.star", [f"{i + 1}@stack.mrcs" for i in kept], pred[kept], pred_origins[kept],
                rlnCryofastarConfidence=confidence)
    write_stack(tmp_path / "elsewhere.mrcs", torch.zeros(3, 8, 8), apix)
    # a valid set with no image in common with the truth
    _write_star(tmp_path / "other.star", [f"{i}@elsewhere.mrcs" for i in (1, 2, 3)], true[:3], true_origins[:3])

    argv = {
        "good": ["evaluate", "pred.star", "truth.star", "--json", "out/figures.json"],
        "raw": ["evaluate", "pred.star", "truth.star", "--raw-shifts", "--json", "raw.json"],
        "disjoint": ["evaluate", "other.star", "truth.star"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(subprocess.run, [SCRIPT, *a], cwd=tmp_path, env=ENV, text=True,
                                  capture_output=True, timeout=120) for k, a in argv.items()}
        runs = {k: f.result() for k, f in futures.items()}

    good = runs["good"]
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr
    assert "matched 50 particles" in good.stdout and "0 only in pred.star, 10 only in truth.star" in good.stdout
    for label in ("handedness", "mirrored", "median geodesic (°)", "random poses (chance)", "Spearman"):
        assert label in good.stdout
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["n_matched"] == 50 and figures["only_in_truth"] == 10
    predicted, chance = figures["predicted"], figures["chance"]
    assert predicted["mirrored"] is True
    assert predicted["n_particles"] == chance["n_particles"] == 50
    assert 1.0 < predicted["geodesic_median_degrees"] < 6.0
    assert chance["geodesic_median_degrees"] > 90
    # the fitted map translation (|t| = 3.9 px) is removed; the constant 0.5 px is not a map translation
    # and stays (50 particles, refitted on the best half: part of it leaks into t)
    assert predicted["map_translation_px"] == pytest.approx(t.tolist(), abs=0.6)
    assert predicted["translation_median_px"] == pytest.approx(0.5, abs=0.15)
    assert "map translation removed (px)" in good.stdout and "after removing" in good.stdout
    assert chance["translation_median_px"] > 1.0
    assert figures["shift_errors"].startswith("after removing")

    raw = runs["raw"]
    assert raw.returncode == 0, raw.stderr
    raw_figures = json.loads((tmp_path / "raw.json").read_text())
    assert raw_figures["shift_errors"] == "as written" and raw_figures["predicted"]["map_translation_px"] is None
    assert raw_figures["predicted"]["translation_median_px"] > 2.0  # |(A t)[:2]| of a 4 px t, plus the 0.5 px
    assert "map translation removed" not in raw.stdout
    assert figures["confidence_spearman"] is not None and -1 <= figures["confidence_spearman"] <= 1

    bad = runs["disjoint"]
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "rlnImageName" in lines[0], bad.stderr


def test_evaluate_compares_shifts_as_written_below_the_fitting_minimum(tmp_path: Path) -> None:
    from cryofastar.model.evaluation import MIN_PARTICLES_TO_FIT_TRANSLATION, EvaluateSettings, evaluate_particle_sets

    n, apix = MIN_PARTICLES_TO_FIT_TRANSLATION - 1, 2.0
    g = torch.Generator().manual_seed(3)
    write_stack(tmp_path / "stack.mrcs", torch.zeros(n, 8, 8), apix)
    true = random_rotations(n, g)
    true_origins = torch.zeros(n, 2, dtype=torch.float64)
    names = [f"{i}@stack.mrcs" for i in range(1, n + 1)]
    _write_star(tmp_path / "truth.star", names, true, true_origins)
    # every particle 1 px off in x: three unknowns fitted to so few particles would absorb part of it
    _write_star(tmp_path / "pred.star", names, true, true_origins + torch.tensor([apix, 0.0], dtype=torch.float64))
    result = evaluate_particle_sets(EvaluateSettings(tmp_path / "pred.star", tmp_path / "truth.star"))
    assert not result.translation_fitted and result.predicted.map_translation_px is None
    assert result.predicted.translation_median_px == pytest.approx(1.0, abs=1e-9)
    assert result.to_dict()["shift_errors"] == "as written"

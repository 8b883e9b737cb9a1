"""bench/classify_eval.py: the figures of a 2D classification against a simulation's truth (issue 21).

Built on real projections of a procedural molecule (box 32): class averages that are exact projections, rotated
and shifted, must be found at correlation ~1 at the right pose; particles that are exact in-plane rotations of
them must get an in-plane error ~0 through ``A_pred = Rz(psi) @ A_c``, and a scrambled psi a large one; junk
precision/recall on a handmade table; and the whole evaluation from real MRC/STAR files.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from torch_fourier_slice import project_3d_to_2d

_PATH = Path(__file__).parents[1] / "bench" / "classify_eval.py"
_SPEC = importlib.util.spec_from_file_location("classify_eval", _PATH)
ce = importlib.util.module_from_spec(_SPEC)
sys.modules["classify_eval"] = ce
_SPEC.loader.exec_module(ce)

BOX = 32


@pytest.fixture(scope="module")
def truth_map() -> tuple[torch.Tensor, float]:
    """A procedural molecule (held-out seed) whose diameter spans 0.7 of a 32-px box."""
    atoms = procedural_molecule(1_000_000_005).centered()
    apix = round(2 * atoms.radius_angstrom() / (0.7 * BOX) / 0.05) / 20
    return atoms_to_volume(atoms, BOX, apix), apix


def _project(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The simulator's projector: the particle at RELION matrix A samples the map at A.T @ x."""
    return project_3d_to_2d(volume.float(), rotations.transpose(-1, -2).float(), pad_factor=2.0)


def _shifted(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Images with their content moved by +shift px (Fourier phase ramp)."""
    return irfft2_centered(phase_shift_rfft2(rfft2_centered(images), shifts_px, BOX), BOX)


@pytest.fixture(scope="module")
def exact_classes(truth_map):
    """Three class averages that are exact projections at random poses, moved by known shifts, and their match."""
    volume, apix = truth_map
    poses = random_rotations(3, torch.Generator().manual_seed(7))
    shifts = torch.tensor([[1.5, -2.0], [0.0, 0.5], [-2.25, 1.0]], dtype=torch.float64)
    averages = _shifted(_project(volume, poses), shifts)
    return poses, shifts, averages, ce.match_class_averages(averages, volume, apix)


def test_rotating_a_projection_in_plane_is_composing_rz_psi(truth_map):
    """The image at Rz(psi) @ A is the image at A resampled by rotate_images, and not with the opposite angle."""
    volume, _ = truth_map
    poses = random_rotations(4, torch.Generator().manual_seed(3))
    psi = torch.tensor([30.0, 75.0, -120.0, 170.0], dtype=torch.float64)
    at_a = _project(volume, poses)
    at_composed = _project(volume, ce.inplane_rotations(psi) @ poses)
    mask = ce.soft_circular_mask(BOX, 12.0)
    right = ce.masked_pearson(ce.rotate_images(at_a, psi), at_composed, mask)
    wrong = ce.masked_pearson(ce.rotate_images(at_a, -psi), at_composed, mask)
    assert (right > 0.99).all(), right
    assert (wrong < 0.9).all(), wrong
    # and the composition is RELION's Euler angles with psi added (rot, tilt unchanged)
    rot, tilt, p = matrix_to_euler(poses)
    composed = euler_to_matrix(rot, tilt, p + psi)
    assert torch.allclose(composed, ce.inplane_rotations(psi) @ poses, atol=1e-12)


def test_exact_projections_are_found_at_correlation_one_and_the_right_pose(exact_classes):
    poses, shifts, _, match = exact_classes
    assert match.n_directions >= 3000
    assert (match.correlation > 0.99).all(), match.correlation
    assert (match.correlation_unfiltered > 0.98).all(), match.correlation_unfiltered
    errors = geodesic_degrees(torch.as_tensor(match.rotations), poses)
    assert (errors < 1.5).all(), errors
    assert np.abs(match.shifts_px - shifts.numpy()).max() < 0.3, match.shifts_px


def test_a_wrong_map_does_not_correlate(truth_map, exact_classes):
    """The same search against another molecule's map stays far from 1: the figure can fail."""
    _, apix = truth_map
    _, _, averages, _ = exact_classes
    other = atoms_to_volume(procedural_molecule(1_000_000_011).centered(), BOX, apix)
    match = ce.match_class_averages(averages, other, apix, direction_step_degrees=6.0)
    assert (match.correlation < 0.9).all(), match.correlation


def test_exact_inplane_rotations_of_the_classes_have_zero_inplane_error(truth_map, exact_classes):
    volume, _ = truth_map
    poses, shifts, averages, match = exact_classes
    g = torch.Generator().manual_seed(11)
    members = torch.arange(3).repeat_interleave(10)
    psi = torch.rand(30, generator=g, dtype=torch.float64) * 360 - 180
    true_rot = ce.inplane_rotations(psi) @ poses[members]
    # the particle is the class average turned by psi (Class2D's meaning), and that is the projection at true_rot
    centred = _shifted(averages, -shifts)[members]
    mask = ce.soft_circular_mask(BOX, 12.0)
    assert (ce.masked_pearson(ce.rotate_images(centred, psi), _project(volume, true_rot), mask) > 0.99).all()
    class_rot = torch.as_tensor(match.rotations)[members]
    twist, swing = ce.inplane_errors(psi, class_rot, true_rot)
    assert float(twist.median()) < 1.0 and float(twist.max()) < 2.0, twist
    assert float(swing.max()) < 2.0, swing
    scrambled = psi[torch.randperm(30, generator=g)] + 90.0
    twist_bad, _ = ce.inplane_errors(scrambled, class_rot, true_rot)
    assert float(twist_bad.median()) > 30.0, twist_bad


def test_swing_twist_separates_inplane_from_out_of_plane():
    delta = torch.tensor([10.0, -40.0, 120.0], dtype=torch.float64)
    beta = torch.tensor([0.0, 25.0, 60.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    rz = euler_to_matrix(zero, zero, delta)  # about the beam
    ry = euler_to_matrix(zero, beta, zero)  # a tilt: out of plane
    twist, swing = ce.swing_twist_degrees(rz)
    assert torch.allclose(twist.abs(), delta.abs(), atol=1e-9) and torch.allclose(swing, zero, atol=1e-9)
    twist, swing = ce.swing_twist_degrees(ry)
    assert torch.allclose(twist, zero, atol=1e-9) and torch.allclose(swing, beta, atol=1e-9)
    twist, swing = ce.swing_twist_degrees(ry @ rz)
    assert torch.allclose(twist.abs(), delta.abs(), atol=1e-9) and torch.allclose(swing, beta, atol=1e-9)


def test_inplane_errors_score_the_nearest_symmetry_mate():
    poses = random_rotations(5, torch.Generator().manual_seed(5))
    zero1 = torch.zeros((), dtype=torch.float64)
    c2 = euler_to_matrix(zero1, zero1, torch.tensor(180.0, dtype=torch.float64))
    symmetry = torch.stack([torch.eye(3, dtype=torch.float64), c2])
    zero = torch.zeros(5, dtype=torch.float64)
    # A_c is the true class pose times a symmetry operator: the images are identical, the error must be 0
    twist, _ = ce.inplane_errors(zero, poses @ c2, poses, symmetry)
    assert float(twist.max()) < 1e-6
    twist_plain, swing_plain = ce.inplane_errors(zero, poses @ c2, poses)
    assert float((twist_plain + swing_plain).min()) > 90.0


def test_junk_metrics_on_a_handmade_table():
    truth = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    flagged = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0])
    out = ce.junk_metrics(flagged, truth)
    assert out["n_junk"] == 8 and out["n_flagged"] == 6 and out["true_positives"] == 5
    assert out["precision"] == pytest.approx(5 / 6) and out["recall"] == pytest.approx(5 / 8)
    assert out["real_flagged"] == 1
    assert out["recall_by_type"] == {"noise": 1.0, "carbon_edge": 0.5, "aggregate": 1.0, "off_centre": 0.0}
    empty = ce.junk_metrics(np.zeros(3), np.zeros(3, dtype=int))
    assert math.isnan(empty["precision"]) and math.isnan(empty["recall"])
    with pytest.raises(ValueError, match="flags for"):
        ce.junk_metrics(np.zeros(2), np.zeros(3, dtype=int))


def test_good_class_fraction_weights_each_class_by_its_real_particles():
    correlation = np.array([0.95, 0.5, 0.91])
    class_index = np.array([0, 0, 0, 1, 2, 1, 1])
    real = np.array([True, True, True, True, True, False, False])  # the junk in class 1 does not count
    assert ce.good_class_fraction(class_index, correlation, real) == pytest.approx(4 / 5)


def test_filters_and_masks():
    h = ce.lowpass_filter(64, 2.0, 10.0)
    assert h[0, 0] == 1.0 and h[0, 32] == 0.0  # 10 Å at 2 Å/px is 0.2 cycles/px: Nyquist is cut
    assert float(h[0, 11]) == 1.0 and float(h[0, 14]) == 0.0  # 0.2 x 64 = 12.8 px, a 2-px cosine edge
    assert torch.all(ce.lowpass_filter(32, 2.0, None) == 1)
    mask = ce.soft_circular_mask(32, 10.0, 3.0)
    assert mask[16, 16] == 1.0 and mask[16, 26] == 1.0 and mask[16, 30] == 0.0 and 0 < mask[16, 28] < 1


def test_map_radius_is_the_molecules(truth_map):
    volume, apix = truth_map
    atoms = procedural_molecule(1_000_000_005).centered()
    assert ce.map_radius_px(volume) == pytest.approx(atoms.radius_angstrom() / apix, abs=2.0)


def _write_stack(path: Path, images: torch.Tensor, apix: float) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images.numpy().astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = apix


def test_evaluate_classification_from_the_files(tmp_path, truth_map, exact_classes):
    """The three exact classes plus a noise class flagged junk, written as the classifier's files."""
    volume, apix = truth_map
    poses, shifts, averages, _ = exact_classes
    g = torch.Generator().manual_seed(13)
    noise_class = torch.randn(1, BOX, BOX, generator=g)
    session, out = tmp_path / "session", tmp_path / "out"
    session.mkdir()
    out.mkdir()
    with mrcfile.new(session / "reference.mrc") as mrc:
        mrc.set_data(volume.numpy().astype(np.float32))
        mrc.voxel_size = apix
    _write_stack(out / "class_averages.mrcs", torch.cat([averages, noise_class]), apix)
    # 30 real particles in the exact classes, 1 real particle in the junk class, 6 junk (types 1..4)
    members = torch.cat([torch.arange(3).repeat_interleave(10), torch.tensor([3]), torch.full((6,), 3)])
    junk_type = np.array([0] * 31 + [1, 2, 3, 4, 1, 2])
    n = len(members)
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    true_rot = random_rotations(n, g)
    true_rot[:30] = ce.inplane_rotations(psi[:30]) @ poses[members[:30]]
    rot, tilt, true_psi = matrix_to_euler(true_rot)
    names = [f"{i + 1:06d}@particles_00001.mrcs" for i in range(n)]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [apix], "rlnImageSize": [BOX]})
    starfile.write({"optics": optics, "particles": pd.DataFrame({
        "rlnImageName": names, "rlnAngleRot": rot.numpy(), "rlnAngleTilt": tilt.numpy(),
        "rlnAnglePsi": true_psi.numpy(), "rlnOpticsGroup": 1, ce.SIMULATED_JUNK_COLUMN: junk_type})},
        session / "particles.star")
    flagged = (members == 3).numpy().astype(int)
    # rows in another order, stacks named from the output directory (as classify names them): matched on
    # (index, resolved stack)
    order = np.random.default_rng(0).permutation(n)
    out_names = np.array([name.replace("@", "@../session/") for name in names])
    starfile.write({"optics": optics, "particles": pd.DataFrame({
        "rlnImageName": out_names[order], "rlnClassNumber": (members.numpy() + 1)[order],
        "rlnAnglePsi": psi.numpy()[order], "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0, "rlnOpticsGroup": 1,
        ce.JUNK_COLUMN: flagged[order]})}, out / "particles.star")
    starfile.write({"model_classes": pd.DataFrame({
        "rlnReferenceImage": [f"{i + 1:06d}@class_averages.mrcs" for i in range(4)], "rlnClassNumber": [1, 2, 3, 4],
        "rlnClassDistribution": [10 / n, 10 / n, 10 / n, 7 / n], "rlnEstimatedResolution": [12.0, 12.0, 12.0, 40.0],
        "rlnAccuracyRotations": [2.0, 2.0, 2.0, 30.0], "rlnCryofastarParticleCount": [10, 10, 10, 7],
        ce.JUNK_COLUMN: [0, 0, 0, 1], "rlnCryofastarJunkScore": [0.1, 0.1, 0.1, 0.9]})}, out / "classes.star")

    report = ce.evaluate_classification(out, session, direction_step_degrees=5.0)
    assert report["n_particles"] == n and report["n_real"] == 31
    assert report["good_fraction"] == pytest.approx(30 / 31)
    assert [c["correlation"] > 0.99 for c in report["classes"]] == [True, True, True, False]
    assert report["inplane"]["n_particles"] == 30 and report["inplane"]["median_degrees"] < 1.5
    junk = report["junk"]
    assert junk["precision"] == pytest.approx(6 / 7) and junk["recall"] == pytest.approx(1.0)
    assert junk["recall_by_type"]["aggregate"] == 1.0

    # the same names read from the wrong directory are other images: a clear error
    table = starfile.read(out / "particles.star", always_dict=True)
    wrong = table["particles"].assign(rlnImageName=table["particles"]["rlnImageName"].str.replace("../session/", ""))
    starfile.write({"optics": optics, "particles": wrong}, out / "particles.star")
    with pytest.raises(ValueError, match="not in the session"):
        ce.evaluate_classification(out, session, direction_step_degrees=5.0)
    # a classification without its junk column, when the truth has junk, is a clear error
    starfile.write({"optics": optics, "particles": table["particles"].drop(columns=[ce.JUNK_COLUMN])},
                   out / "particles.star")
    with pytest.raises(ValueError, match=ce.JUNK_COLUMN):
        ce.evaluate_classification(out, session, direction_step_degrees=5.0)


def test_ceiling_from_true_poses_beats_one_class_of_everything(tmp_path, truth_map):
    """On a real simulated session (CTF, junk): classes made from the true poses recover psi and score high on
    the band-passed correlation; one class of all views (a blob) does not, and its junk rows are left out."""
    from cryofastar.recon.simulate.particles import CtfRange
    from cryofastar.recon.simulate.session import write_session

    volume, apix = truth_map
    session = tmp_path / "session"
    write_session(session, volume, apix, 240, 1.0, seed=3, per_stack=100, ctf=CtfRange(), junk_fraction=0.2)
    ceiling = ce.evaluate_classification(ce.ceiling_classification(session, tmp_path / "ceiling", 8), session,
                                         direction_step_degrees=5.0)
    floor = ce.evaluate_classification(ce.ceiling_classification(session, tmp_path / "floor", 1), session,
                                       direction_step_degrees=5.0)
    assert ceiling["n_particles"] == ceiling["n_real"] == 192  # 20 % of 240 are junk, left out
    assert ceiling["inplane"]["n_particles"] > 0 and ceiling["inplane"]["median_degrees"] < 5.0
    assert ceiling["median_class_correlation_bandpass"] > floor["median_class_correlation_bandpass"] + 0.2

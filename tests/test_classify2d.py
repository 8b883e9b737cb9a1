"""recon.classify2d: the physics of the class sums and the search, and the classifier's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_phantom
from cryofastar.recon.classify2d import (
    ClassifierSettings,
    StreamingClassifier,
    class_set,
    particle_columns,
    particle_junk,
)
from cryofastar.recon.classify2d.class_sums import ClassSums
from cryofastar.recon.classify2d.fourier_sampling import padded_spectra
from cryofastar.recon.classify2d.inplane_search import (
    PolarGrid,
    PolarReferences,
    polar_samples,
    score_alignments,
    shift_disc,
)
from cryofastar.recon.ctf import ctf_at, ctf_rfft
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.fourier import rfft_frequencies_2d
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles
from torch_fourier_rescale import fourier_rescale_2d

BOX, APIX = 32, 3.0


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _turned_copies(n: int, ctf: CtfRange | None, seed: int = 0, shift: float = 2.0):
    """``n`` noise-free particles: one view turned in plane by known psi and displaced; and the view itself."""
    volume = blob_phantom(BOX, seed=3)
    g = torch.Generator().manual_seed(seed)
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360
    zeros = torch.zeros(n, dtype=torch.float64)
    view = euler_to_matrix(zeros + 30.0, zeros + 60.0, zeros)
    rotations = euler_to_matrix(zeros, zeros, psi) @ view
    particles = simulate_particles(volume, n, APIX, None, g, max_shift_px=shift, ctf=ctf, rotations=rotations)
    truth = simulate_particles(volume, 1, APIX, None, g, max_shift_px=0.0, rotations=view[:1]).images[0]
    return particles, psi, -particles.origins_angstrom / APIX, truth


@pytest.mark.parametrize("ctf", [None, CtfRange()])
def test_average_of_turned_copies_recovers_the_view(ctf: CtfRange | None) -> None:
    sim, psi, shifts, truth = _turned_copies(24, ctf)
    sums = ClassSums(1, BOX, APIX)
    terms = sums.contributions(padded_spectra(sim.images), torch.ones(24, dtype=torch.bool), sim.ctf, psi, shifts)
    sums.add(torch.zeros(24, dtype=torch.long), torch.ones(24, dtype=torch.long), torch.ones(24), terms)
    average = sums.images(sums.wiener())[0]
    assert _corr(average, truth) > (0.99 if ctf is None else 0.97)
    # a wrong rotation sense does not: the check can fail
    wrong = ClassSums(1, BOX, APIX)
    wrong.add(torch.zeros(24, dtype=torch.long), torch.ones(24, dtype=torch.long), torch.ones(24),
              wrong.contributions(padded_spectra(sim.images), torch.ones(24, dtype=torch.bool), sim.ctf, -psi, shifts))
    assert _corr(wrong.images(wrong.wiener())[0], truth) < 0.8


def test_remove_is_exact() -> None:
    sim, psi, shifts, _ = _turned_copies(20, CtfRange(), seed=1)
    spectra = padded_spectra(sim.images)
    classes = torch.tensor([0, 1] * 10)
    halves = torch.tensor([1, 2, 2, 1] * 5)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(2))
    every = ClassSums(2, BOX, APIX)
    every.add(classes, halves, weights,
              every.contributions(spectra, torch.ones(20, dtype=torch.bool), sim.ctf, psi, shifts))
    gone = torch.arange(20) % 3 == 0
    every.add(classes[gone], halves[gone], weights[gone],
              every.contributions(spectra, gone, sim.ctf[gone], psi, shifts), sign=-1.0)
    rest = ~gone
    fresh = ClassSums(2, BOX, APIX)
    fresh.add(classes[rest], halves[rest], weights[rest],
              fresh.contributions(spectra, rest, sim.ctf[rest], psi, shifts))
    scale = float(fresh.num.abs().max())
    assert float((every.num - fresh.num).abs().max()) < 1e-9 * scale
    assert torch.allclose(every.den, fresh.den, rtol=0, atol=1e-9 * float(fresh.den.max()))
    assert torch.allclose(every.mass, fresh.mass)


def test_search_finds_rotation_and_shift() -> None:
    sim, psi, shifts, truth = _turned_copies(12, CtfRange(), seed=4)
    grid = PolarGrid.for_radius(BOX // 2 - 2)
    particles = polar_samples(padded_spectra(sim.images), grid)
    ctf = ctf_at(sim.ctf, (grid.frequencies / (BOX * APIX)).expand(12, -1, -1, -1))
    refs = PolarReferences.of(polar_samples(padded_spectra(truth[None]), grid))
    trial = shift_disc(3.0)
    result = score_alignments(particles, ctf, trial, refs, torch.ones(grid.r_max - grid.r_min + 1), grid, BOX)
    best = result.scores.reshape(12, -1).argmax(-1)
    found_psi = (best % grid.n_angles).double() * grid.step_degrees
    found_shift = trial[best // grid.n_angles]
    error = (found_psi - psi + 180) % 360 - 180
    assert float(error.abs().max()) <= grid.step_degrees
    assert float((found_shift.double() - shifts).abs().max()) <= 0.5 + 1e-6


def test_ctf_at_matches_the_grid_ctf() -> None:
    params = CtfRange(max_astigmatism_angstrom=1500).sample(4, torch.Generator().manual_seed(0))
    grid = ctf_rfft(params, BOX, APIX)
    anywhere = ctf_at(params, (rfft_frequencies_2d(BOX) / APIX).expand(4, -1, -1, -1))
    assert float((grid - anywhere).abs().max()) < 1e-3


def _two_views(n: int, snr: float, seed: int = 0):
    """Particles of two very different views of a phantom, turned and displaced at random, noisy."""
    volume = blob_phantom(BOX, seed=5)
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    zeros = torch.zeros(n, dtype=torch.float64)
    tilt = torch.where(label == 0, zeros, zeros + 90.0)
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360
    rotations = euler_to_matrix(zeros, tilt, psi)
    sim = simulate_particles(volume, n, APIX, snr, g, max_shift_px=2.0, ctf=CtfRange(), rotations=rotations)
    return sim, label.numpy(), psi.numpy()


def _classifier(k: int = 2, start: int = 40) -> StreamingClassifier:
    settings = ClassifierSettings(n_classes=k, diameter_angstrom=0.8 * BOX * APIX, max_shift_px=3,
                                  init_particles=start, batch=16)
    return StreamingClassifier(settings, BOX, APIX)


def test_classifier_separates_two_views_and_finds_the_angles() -> None:
    sim, label, psi = _two_views(240, snr=1.0)
    clf = _classifier()
    clf.add(sim.images[:120], sim.ctf[torch.arange(120)])
    clf.add(sim.images[120:], sim.ctf[torch.arange(120, 240)])
    for _ in range(3):
        rows = clf.due(240)
        clf.realign(rows, sim.images[rows], sim.ctf[torch.from_numpy(rows)])
    best = clf.table.classes[:240, 0]
    purity = max(np.mean(best == label), np.mean(best != label))
    assert purity > 0.95
    # within a class the 2D angle is the true psi up to one offset per class
    for k in range(2):
        members = best == k
        diff = np.deg2rad(clf.table.psi[:240, 0][members] - psi[members])
        centre = np.angle(np.exp(1j * diff).mean())
        error = np.rad2deg(np.abs(np.angle(np.exp(1j * (diff - centre)))))
        assert np.median(error) < 5.0


def test_a_large_box_is_classified_as_its_fourier_cropped_copy() -> None:
    """Box 128 works at WORKING_BOX (64): the same classes, angles and origins in Å as the caller's own crop to 64,
    and averages at the particles' box and pixel size."""
    box, apix, n = 128, 1.5, 120
    volume = blob_phantom(box, seed=5)
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 2, (n,), generator=g)
    zeros = torch.zeros(n, dtype=torch.float64)
    rotations = euler_to_matrix(zeros, torch.where(label == 0, zeros, zeros + 90.0),
                                torch.rand(n, generator=g, dtype=torch.float64) * 360)
    sim = simulate_particles(volume, n, apix, 1.0, g, max_shift_px=4.0, ctf=CtfRange(), rotations=rotations)
    cropped = fourier_rescale_2d(sim.images, target_shape=(64, 64))[0].float()
    runs = []
    for images, b, a, shift in ((sim.images, box, apix, 6.0), (cropped, 64, 2 * apix, 3.0)):
        settings = ClassifierSettings(n_classes=2, diameter_angstrom=0.8 * box * apix, max_shift_px=shift,
                                      init_particles=40, batch=16)
        clf = StreamingClassifier(settings, b, a)
        clf.add(images, sim.ctf)
        clf.realign(clf.due(n), images, sim.ctf)
        runs.append((clf, class_set(clf)))
    (large, large_set), (small, small_set) = runs
    assert (large.box, large.apix, large.particle_box) == (64, 2 * apix, box)
    assert np.array_equal(large.table.classes[:n], small.table.classes[:n])
    assert np.allclose(large.table.psi[:n], small.table.psi[:n], atol=1e-3)
    large_cols, small_cols = particle_columns(large, large_set), particle_columns(small, small_set)
    assert np.allclose(large_cols["rlnOriginXAngst"], small_cols["rlnOriginXAngst"], atol=1e-3)
    assert large_set.averages.shape == (2, box, box) and large_set.apix == apix
    padded = fourier_rescale_2d(small_set.averages, target_shape=(box, box))[0]
    assert torch.allclose(large_set.averages, padded, atol=1e-4 * float(padded.abs().max()))
    assert torch.equal(large_set.junk, small_set.junk)


def _sums_from_table(clf: StreamingClassifier, images: torch.Tensor, ctf) -> ClassSums:
    fresh = ClassSums(clf.settings.n_classes, clf.box, clf.apix)
    t = clf.table
    spectra = padded_spectra(images)
    for slot in range(t.keep):
        present = t.classes[: t.n, slot] >= 0
        mask = torch.from_numpy(present)
        terms = fresh.contributions(spectra, mask, ctf[mask], torch.from_numpy(t.psi[: t.n, slot]),
                                    torch.from_numpy(t.shifts[: t.n, slot]))
        fresh.add(torch.from_numpy(t.classes[: t.n, slot][present]), torch.from_numpy(t.halves[: t.n][present]),
                  torch.from_numpy(t.weights[: t.n, slot][present]), terms)
    return fresh


def test_sums_always_equal_what_the_current_assignments_contribute() -> None:
    """After adds, re-alignments, centring moves and re-seeding: the sums are those of the table, exactly."""
    sim, _, _ = _two_views(160, snr=0.5, seed=3)
    clf = _classifier(k=4, start=60)
    clf.add(sim.images[:100], sim.ctf[torch.arange(100)])
    clf.add(sim.images[100:], sim.ctf[torch.arange(100, 160)])
    for _ in range(2):
        rows = clf.due(70)
        clf.realign(rows, sim.images[rows], sim.ctf[torch.from_numpy(rows)])
    assert float(clf.offsets_px.abs().sum()) > 0, "no class was centred: the test would not cover the moves"
    fresh = _sums_from_table(clf, sim.images, sim.ctf)
    scale = float(fresh.num.abs().max())
    assert float((clf.sums.num - fresh.num).abs().max()) < 1e-6 * scale
    assert torch.allclose(clf.sums.mass, fresh.mass, atol=1e-9)


def test_class_set_and_particle_columns() -> None:
    sim, _, _ = _two_views(120, snr=1.0, seed=6)
    clf = _classifier()
    clf.add(sim.images, sim.ctf)
    classes = class_set(clf)
    assert classes.averages.shape == (2, BOX, BOX)
    assert float(classes.counts.sum()) == pytest.approx(120, rel=1e-6)
    columns = particle_columns(clf, classes)
    assert set(columns["rlnClassNumber"]) <= {1, 2}
    assert np.all((columns["rlnAnglePsi"] >= 0) & (columns["rlnAnglePsi"] < 360))
    assert np.allclose(columns["rlnOriginXAngst"], -clf.table.shifts[:120, 0, 0] * APIX)


def test_a_particle_is_junk_only_when_all_its_kept_classes_are() -> None:
    sim, _, _ = _two_views(60, snr=1.0, seed=6)
    clf = _classifier(k=3)
    clf.add(sim.images, sim.ctf)
    classes = class_set(clf)
    classes.junk = torch.tensor([True, False, True])
    t = clf.table
    t.classes[:4] = [[0, -1, -1], [0, 2, -1], [0, 1, -1], [1, 0, 2]]
    t.classes[4] = -1  # never aligned
    assert particle_junk(clf, classes, np.arange(5)).tolist() == [True, True, False, False, False]
    assert particle_columns(clf, classes, np.arange(5))["rlnCryofastarJunk"].tolist() == [1, 1, 0, 0, 0]


def test_bad_input_is_refused_and_keeps_the_classes() -> None:
    sim, _, _ = _two_views(60, snr=1.0)
    clf = _classifier()
    clf.add(sim.images, sim.ctf)
    before = clf.sums.num.clone()
    bad = sim.images[:4].clone()
    bad[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        clf.add(bad, sim.ctf[torch.arange(4)])
    with pytest.raises(ValueError, match=r"\(n, 32, 32\)"):
        clf.add(torch.zeros(2, 40, 40))
    with pytest.raises(ValueError, match="indices"):
        clf.realign(np.array([500]), sim.images[:1], sim.ctf[torch.arange(1)])
    assert clf.n_particles == 60
    assert torch.equal(clf.sums.num, before)
    with pytest.raises(ValueError, match="classes"):
        ClassifierSettings(n_classes=0)


def test_a_single_particle_batch() -> None:
    """A batch of one whose polar grid has as many rings as particles once failed to broadcast (n == R)."""
    sim, _, _ = _two_views(50, snr=1.0)
    clf = _classifier(start=49)
    clf.add(sim.images[:49], sim.ctf[torch.arange(49)])
    clf.add(sim.images[49:], sim.ctf[torch.arange(49, 50)])
    assert clf.n_particles == 50 and clf.table.aligned_at[49] >= 0


def test_state_round_trip_resumes_exactly(tmp_path) -> None:
    sim, _, _ = _two_views(100, snr=1.0, seed=8)
    clf = _classifier()
    clf.add(sim.images[:70], sim.ctf[torch.arange(70)])
    torch.save(clf.state_dict(), tmp_path / "state.pt")
    again = _classifier()
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for c in (clf, again):
        c.add(sim.images[70:], sim.ctf[torch.arange(70, 100)])
    assert np.array_equal(clf.table.classes[:100], again.table.classes[:100])
    assert torch.allclose(clf.sums.num, again.sums.num)
    with pytest.raises(ValueError, match="cannot resume"):
        _classifier(k=3).load_state_dict(clf.state_dict())


def test_scores_against_chosen_classes_equal_those_of_the_full_search() -> None:
    sim, _, _, truth = _turned_copies(6, CtfRange(), seed=9)
    grid = PolarGrid.for_radius(10)
    particles = polar_samples(padded_spectra(sim.images), grid)
    ctf = ctf_at(sim.ctf, (grid.frequencies / (BOX * APIX)).expand(6, -1, -1, -1))
    g = torch.Generator().manual_seed(1)
    refs = polar_samples(padded_spectra(truth[None] + 0.3 * torch.randn(5, BOX, BOX, generator=g)), grid)
    weight = torch.rand(grid.r_max - grid.r_min + 1, generator=g)
    trial = shift_disc(1.5)[None] + torch.randn(6, 1, 2, generator=g)
    full = score_alignments(particles, ctf, trial, PolarReferences.of(refs), weight, grid, BOX)
    chosen = torch.tensor([[4, 1], [0, 2], [3, 3], [1, 0], [2, 4], [0, 1]])
    part = score_alignments(particles, ctf, trial, PolarReferences.of(refs), weight, grid, BOX, classes=chosen)
    expected = torch.gather(full.scores, 2, chosen[:, None, :, None].expand(-1, 9, -1, grid.n_angles))
    assert torch.allclose(part.scores, expected, rtol=1e-4, atol=1e-3 * float(full.scores.abs().max()))
    assert torch.equal(part.classes, chosen)

"""HalfSetAccumulator: additivity, half sets, CTF, state, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryofastar.recon import CtfParams, HalfSetAccumulator, fsc, half_sets_for_stack
from cryofastar.recon.half_sets import half_sets_for_particles
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import CtfRange, simulate_particles


@pytest.fixture(scope="module")
def particles(phantom32: torch.Tensor):
    g = torch.Generator().manual_seed(7)
    sim = simulate_particles(phantom32, 240, apix=1.5, snr=None, generator=g, max_shift_px=3.0)
    halves = half_sets_for_stack("stack.mrcs", torch.arange(1, 241))
    return sim, halves


def _filled(sim, halves, chunks: list[int], **kwargs) -> HalfSetAccumulator:
    acc = HalfSetAccumulator(32, 1.5, **kwargs)
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        acc.add(sim.images[sl], sim.rotations[sl], sim.origins_angstrom[sl], halves[sl])
        start += size
    return acc


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_result_does_not_depend_on_how_particles_are_split(particles, interpolation: str) -> None:
    sim, halves = particles
    whole = _filled(sim, halves, [240], interpolation=interpolation)
    pieces = _filled(sim, halves, [1, 17, 100, 2, 120], interpolation=interpolation)
    torch.testing.assert_close(pieces.grids, whole.grids, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pieces.volume(), whole.volume(), rtol=1e-4, atol=1e-5)
    assert pieces.particle_counts.tolist() == whole.particle_counts.tolist()


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_noise_free_reconstruction_matches_the_map(particles, phantom32: torch.Tensor, interpolation: str) -> None:
    sim, halves = particles
    acc = _filled(sim, halves, [240], interpolation=interpolation)
    curve = fsc(acc.volume(), phantom32)
    assert float(curve[1:11].min()) > 0.97  # 240 particles cover shells to ~0.6 Nyquist densely
    assert acc.volume().dtype == torch.float32


def test_half_sets_are_independent_grids(particles) -> None:
    sim, halves = particles
    acc = _filled(sim, halves, [240])
    assert acc.particle_counts.tolist() == [int((halves == 1).sum()), int((halves == 2).sum())]
    only_half1 = HalfSetAccumulator(32, 1.5)
    mask = halves == 1
    only_half1.add(sim.images[mask], sim.rotations[mask], sim.origins_angstrom[mask], halves[mask])
    torch.testing.assert_close(only_half1.grids[0], acc.grids[0], rtol=1e-5, atol=1e-4)
    assert float(only_half1.grids[1].abs().sum()) == 0.0
    assert 2 * 1.5 <= acc.resolution_angstrom() < 4.0  # noise-free: FSC 0.143 near Nyquist (3 Å)


def test_half_set_rule_is_stable_and_balanced() -> None:
    idx = torch.arange(1, 10001)
    a = half_sets_for_stack("/data/session/mic_0001.mrcs", idx)
    b = half_sets_for_stack("mic_0001.mrcs", idx)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {1, 2}
    assert abs(int((a == 1).sum()) - 5000) < 200
    assert not torch.equal(a, half_sets_for_stack("mic_0002.mrcs", idx))


def test_half_sets_of_particles_of_several_stacks_follow_each_stack_rule() -> None:
    stacks = np.array(["/d/mic_0002.mrcs", "/d/mic_0001.mrcs", "/d/mic_0002.mrcs", "mic_0001.mrcs"])
    indices = np.array([7, 3, 1, 9])
    halves = half_sets_for_particles(stacks, indices)
    assert halves.dtype == torch.int64
    one_by_one = [int(half_sets_for_stack(s, torch.tensor([i]))[0]) for s, i in zip(stacks, indices, strict=True)]
    assert halves.tolist() == one_by_one


def test_ctf_weighted_insertion_recovers_the_map(phantom32: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(8)
    ctf = CtfRange(defocus_min_angstrom=5000.0, defocus_max_angstrom=15000.0)
    sim = simulate_particles(phantom32, 400, apix=3.0, snr=None, generator=g, ctf=ctf, max_shift_px=2.0)
    halves = 1 + (torch.arange(400) % 2)
    with_ctf = HalfSetAccumulator(32, 3.0)
    with_ctf.add(sim.images, sim.rotations, sim.origins_angstrom, halves, ctf=sim.ctf)
    without = HalfSetAccumulator(32, 3.0)
    without.add(sim.images, sim.rotations, sim.origins_angstrom, halves)
    good = float(fsc(with_ctf.volume(), phantom32)[1:12].mean())
    assert good > 0.9
    # Wiener-style: data sum CTF * F_obs over weight sum CTF^2, so amplitudes come back at the
    # map's own scale (the data were once also multiplied by the CTF^2 weight: scale ~0.35)
    scale = float((with_ctf.volume() * phantom32).sum() / (phantom32 * phantom32).sum())
    assert 0.7 < scale < 1.2, scale
    assert good > float(fsc(without.volume(), phantom32)[1:12].mean()) + 0.1


def test_state_round_trip_resumes_exactly(particles, tmp_path) -> None:
    sim, halves = particles
    acc = _filled(sim, halves, [100])
    path = tmp_path / "state" / "accumulator.pt"
    acc.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["accumulator.pt"]  # no temporary left behind
    resumed = HalfSetAccumulator.load(path)
    assert torch.equal(resumed.grids, acc.grids)
    for a in (acc, resumed):
        a.add(sim.images[100:], sim.rotations[100:], sim.origins_angstrom[100:], halves[100:])
    assert torch.equal(resumed.grids, acc.grids)
    assert resumed.n_particles == 240
    assert torch.equal(resumed.volume(), acc.volume())


def test_save_failure_keeps_previous_state(particles, tmp_path, monkeypatch) -> None:
    sim, halves = particles
    acc = _filled(sim, halves, [10])
    path = tmp_path / "acc.pt"
    acc.save(path)
    before = path.read_bytes()
    acc.add(sim.images[10:20], sim.rotations[10:20], sim.origins_angstrom[10:20], halves[10:20])

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        acc.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["acc.pt"]


def test_load_rejects_other_files(tmp_path) -> None:
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a state")
    with pytest.raises(ValueError, match="accumulator state"):
        HalfSetAccumulator.load(bogus)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda im, r, s, h: (im[:, :-1], r, s, h), "images must be"),
        (lambda im, r, s, h: (im.clone().index_fill_(0, torch.tensor([3]), float("nan")), r, s, h), "NaN"),
        (lambda im, r, s, h: (im, r, s, h.clone().fill_(3)), "half sets"),
        (lambda im, r, s, h: (im, r[:-1], s, h), "rotations"),
    ],
)
def test_bad_input_raises_and_leaves_grids_untouched(particles, mutate, message: str) -> None:
    sim, halves = particles
    acc = _filled(sim, halves, [20])
    before = acc.grids.clone()
    args = mutate(sim.images[20:40], sim.rotations[20:40], sim.origins_angstrom[20:40], halves[20:40])
    with pytest.raises(ValueError, match=message):
        acc.add(*args)
    assert torch.equal(acc.grids, before)
    assert acc.n_particles == 20


def test_ctf_count_mismatch_is_rejected(particles) -> None:
    sim, halves = particles
    acc = HalfSetAccumulator(32, 1.5)
    ctf = CtfParams.from_arrays(defocus_u_angstrom=[1e4], defocus_v_angstrom=[1e4], defocus_angle_degrees=0,
                                voltage_kv=300, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
                                phase_shift_degrees=0)
    with pytest.raises(ValueError, match="CTF"):
        acc.add(sim.images[:5], sim.rotations[:5], sim.origins_angstrom[:5], halves[:5], ctf=ctf)


def test_prepare_equals_centred_transform_of_the_padded_image(particles) -> None:
    from cryofastar.recon.fourier import phase_shift_rfft2, rfft2_centered
    from torch.nn.functional import pad

    sim, _ = particles
    acc = HalfSetAccumulator(32, 1.5)
    slices, weights = acc._prepare(sim.images[:4], sim.origins_angstrom[:4], None)
    padded = pad(sim.images[:4], (16, 16, 16, 16))  # centre 16 -> 32 = N // 2
    expected = phase_shift_rfft2(rfft2_centered(padded), sim.origins_angstrom[:4] / 1.5, 64)
    assert weights is None
    torch.testing.assert_close(slices, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_reposing_equals_a_fresh_insertion_with_the_new_pose(particles, interpolation) -> None:
    """remove(old pose) + add(new pose) leaves the grids as if the new pose had been inserted from the start."""
    sim, halves = particles
    n = len(sim.images)
    ctf = CtfParams.from_arrays(defocus_u_angstrom=torch.full((n,), 1.5e4), defocus_v_angstrom=torch.full((n,), 1.4e4),
                                defocus_angle_degrees=30.0, voltage_kv=300.0, spherical_aberration_mm=2.7,
                                amplitude_contrast=0.1, phase_shift_degrees=0.0)
    new_rotations = random_rotations(n, torch.Generator().manual_seed(11))
    new_shifts = sim.origins_angstrom + 1.5
    moved = torch.arange(n) % 3 == 0
    new_rotations[~moved], new_shifts[~moved] = sim.rotations[~moved], sim.origins_angstrom[~moved]

    reposed = HalfSetAccumulator(32, 3.0, interpolation=interpolation)
    reposed.add(sim.images, sim.rotations, sim.origins_angstrom, halves, ctf=ctf)
    reposed.remove(sim.images[moved], sim.rotations[moved], sim.origins_angstrom[moved], halves[moved], ctf=ctf[moved])
    reposed.add(sim.images[moved], new_rotations[moved], new_shifts[moved], halves[moved], ctf=ctf[moved])
    fresh = HalfSetAccumulator(32, 3.0, interpolation=interpolation)
    fresh.add(sim.images, new_rotations, new_shifts, halves, ctf=ctf)

    assert torch.equal(reposed.particle_counts, fresh.particle_counts)
    scale = float(fresh.grids.abs().max())
    assert float((reposed.grids - fresh.grids).abs().max()) < 1e-4 * scale
    assert float(fsc(reposed.volume(), fresh.volume())[1:].min()) > 0.9999


def test_removing_everything_empties_the_grids(particles) -> None:
    sim, halves = particles
    acc = HalfSetAccumulator(32, 3.0)
    acc.add(sim.images, sim.rotations, sim.origins_angstrom, halves)
    full = float(acc.grids.abs().max())
    acc.remove(sim.images, sim.rotations, sim.origins_angstrom, halves)
    assert acc.n_particles == 0
    assert float(acc.grids.abs().max()) < 1e-5 * full  # float32 rounding of the sums only
    with pytest.raises(ValueError, match="NaN"):
        acc.remove(sim.images[:1] * float("nan"), sim.rotations[:1], sim.origins_angstrom[:1], halves[:1])


@pytest.mark.parametrize("with_ctf", [False, True])
def test_weights_scale_data_and_weight_and_remove_is_their_inverse(particles, with_ctf: bool) -> None:
    """add(weights=w) equals the plain insertion with both channels scaled by w; remove(weights=w) undoes it."""
    sim, halves = particles
    n = 12
    images, rot, shifts, h = sim.images[:n], sim.rotations[:n], sim.origins_angstrom[:n], halves[:n]
    ctf = None
    if with_ctf:
        ctf = CtfParams.from_arrays(defocus_u_angstrom=torch.full((n,), 1.5e4),
                                    defocus_v_angstrom=torch.full((n,), 1.4e4), defocus_angle_degrees=30.0,
                                    voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1,
                                    phase_shift_degrees=0.0)
    w = torch.linspace(0.1, 2.0, n)
    weighted = HalfSetAccumulator(32, 3.0)
    weighted.add(images, rot, shifts, h, ctf=ctf, weights=w)
    expected = HalfSetAccumulator(32, 3.0)  # particle i alone, scaled by w_i, summed
    for i in range(n):
        one = HalfSetAccumulator(32, 3.0)
        one.add(images[i : i + 1], rot[i : i + 1], shifts[i : i + 1], h[i : i + 1],
                ctf=None if ctf is None else ctf[i : i + 1])
        expected.grids += w[i] * one.grids
    scale = float(expected.grids.abs().max())
    assert float((weighted.grids - expected.grids).abs().max()) < 1e-5 * scale
    assert weighted.particle_counts.tolist() == [int((h == 1).sum()), int((h == 2).sum())]
    ones = HalfSetAccumulator(32, 3.0)
    ones.add(images, rot, shifts, h, ctf=ctf, weights=torch.ones(n))
    plain = HalfSetAccumulator(32, 3.0)
    plain.add(images, rot, shifts, h, ctf=ctf)
    assert torch.equal(ones.grids, plain.grids)

    weighted.add(sim.images[n:], sim.rotations[n:], sim.origins_angstrom[n:], halves[n:])
    weighted.remove(images, rot, shifts, h, ctf=ctf, weights=w)
    rest = HalfSetAccumulator(32, 3.0)
    rest.add(sim.images[n:], sim.rotations[n:], sim.origins_angstrom[n:], halves[n:])
    assert torch.equal(weighted.particle_counts, rest.particle_counts)
    assert float((weighted.grids - rest.grids).abs().max()) < 1e-5 * float(rest.grids.abs().max())
    with pytest.raises(ValueError, match="weights"):
        weighted.add(images, rot, shifts, h, weights=torch.ones(n + 1))
    with pytest.raises(ValueError, match="non-negative"):
        weighted.add(images, rot, shifts, h, weights=-torch.ones(n))

"""recon.classify2d.class_delta: a follower classifier's additions, taken by the lead, are the lead's own."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cryofastar.recon.classify2d import ClassDelta, StreamingClassifier
from test_classify2d import _classifier, _sums_from_table, _two_views

_ENTRIES = ("classes", "weights", "psi", "shifts", "halves", "max_prob", "psi_sigma")


def _follower(lead: StreamingClassifier) -> StreamingClassifier:
    follower = StreamingClassifier(lead.settings, lead.particle_box, lead.particle_apix)
    follower.adopt(lead.references())
    return follower


def test_what_a_follower_adds_is_what_the_lead_would_have_added_itself() -> None:
    sim, _, _ = _two_views(160, snr=0.5, seed=3)
    lead = _classifier(k=4, start=60)
    lead.add(sim.images[:100], sim.ctf[torch.arange(100)])
    alone = copy.deepcopy(lead)
    halves = torch.from_numpy(np.arange(100, 160) % 2 + 1)
    new = torch.arange(100, 160)
    follower = _follower(lead)
    rows = follower.add(sim.images[100:], sim.ctf[new], halves)
    assert follower.version == lead.version and follower.n_particles == 60 and list(rows) == list(range(60))
    delta = follower.hand_over()
    assert len(delta) == 60 and follower.n_particles == 0 and float(follower.sums.num.abs().max()) == 0
    assert list(lead.take(delta)) == list(range(100, 160))
    alone.add(sim.images[100:], sim.ctf[new], halves)
    for name in _ENTRIES:
        assert np.allclose(getattr(lead.table, name)[:160], getattr(alone.table, name)[:160], equal_nan=True), name
    scale = float(alone.sums.num.abs().max())
    assert float((lead.sums.num - alone.sums.num).abs().max()) < 1e-9 * scale
    assert torch.allclose(lead.noise, alone.noise, rtol=1e-12) and lead.noise_mass == pytest.approx(alone.noise_mass)
    assert torch.allclose(lead.reference_images, alone.reference_images, atol=1e-5)
    assert (lead.table.aligned_at[100:160] >= 0).all()


def test_two_followers_summed_and_moved_between_frames_leave_the_sums_those_of_the_table() -> None:
    """Followers in an older frame adopt newer references (their additions move), their sums are added together,
    the lead centres its classes again before it takes them: its sums still equal what its table contributes."""
    sim, _, _ = _two_views(200, snr=0.5, seed=3)
    lead = _classifier(k=4, start=60)
    lead.add(sim.images[:100], sim.ctf[torch.arange(100)])
    first, second = _follower(lead), _follower(lead)
    first.add(sim.images[100:130], sim.ctf[torch.arange(100, 130)], torch.ones(30, dtype=torch.int64))
    for _ in range(2):  # the lead re-aligns: its classes move
        rows = lead.due(60)
        lead.realign(rows, sim.images[rows], sim.ctf[torch.from_numpy(rows)])
    moved = lead.references()
    assert bool((moved.offsets_px != first.offsets_px).any()), "no move: the first follower's would not be covered"
    for follower in (first, second):
        follower.adopt(moved)
    second.add(sim.images[130:170], sim.ctf[torch.arange(130, 170)], torch.full((40,), 2, dtype=torch.int64))
    parts = [follower.hand_over(with_sums=False) for follower in (first, second)]
    sums = {name: getattr(first.sums, name) + getattr(second.sums, name) for name in ("num", "den", "mass")}
    delta = ClassDelta.merged(parts, sums)
    first.clear()
    assert first.n_particles == 0 and float(first.sums.mass.abs().sum()) == 0
    lead.add(sim.images[170:], sim.ctf[torch.arange(170, 200)])  # rows 100..129 in the lead; they get taken after
    rows = lead.due(60)
    lead.realign(rows, sim.images[rows], sim.ctf[torch.from_numpy(rows)])
    assert bool((lead.offsets_px != delta.offsets_px).any()), "no move between the frames: the test covers nothing"
    assert list(lead.take(delta)) == list(range(130, 200))
    order = torch.cat([torch.arange(100), torch.arange(170, 200), torch.arange(100, 170)])
    fresh = _sums_from_table(lead, sim.images[order], sim.ctf[order])
    scale = float(fresh.num.abs().max())
    assert float((lead.sums.num - fresh.num).abs().max()) < 1e-6 * scale
    assert torch.allclose(lead.sums.den, fresh.den, rtol=1e-9, atol=1e-9)
    assert torch.allclose(lead.sums.mass, fresh.mass, atol=1e-9)


def test_what_does_not_fit_is_refused() -> None:
    sim, _, _ = _two_views(80, snr=1.0)
    lead = _classifier(start=60)
    with pytest.raises(ValueError, match="not started"):
        lead.references()
    lead.add(sim.images[:70], sim.ctf[torch.arange(70)])
    with pytest.raises(ValueError, match="only a follower"):
        lead.hand_over()
    with pytest.raises(ValueError, match="cannot be followed"):
        _classifier(k=3).adopt(lead.references())
    follower = _follower(lead)
    follower.add(sim.images[70:], sim.ctf[torch.arange(70, 80)])
    before = lead.sums.num.clone()
    with pytest.raises(ValueError, match="without its sums"):
        lead.take(follower.hand_over(with_sums=False))
    other = ClassDelta({"classes": np.zeros((0, 3))}, None, offsets_px=torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="different frames"):
        ClassDelta.merged([follower.hand_over(with_sums=False), other], {})
    assert torch.equal(lead.sums.num, before) and lead.n_particles == 70

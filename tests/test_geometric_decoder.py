"""model.geometric_decoder: milestone M0 (classical common lines through the decoder's own code), soft mode."""

from __future__ import annotations

import pytest
import torch
from cryofastar.model.geometric_decoder import GeometricDecoder
from cryofastar.model.geometric_evaluation import hand_errors
from cryofastar.model.ray_encoder import ClassicalRayEncoder, RayEncoder
from cryofastar.model.training_data import EVAL_SEED_START
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, simulate_particles

L, R, BOX = 96, 24, 64


def _views(seed: int, n: int, snr: float | None = None):
    atoms = procedural_molecule(EVAL_SEED_START + seed)  # held out from training
    apix = 2.0 * atoms.radius_angstrom() / (0.6 * BOX)
    sim = simulate_particles(atoms_to_volume(atoms, BOX, apix), n, apix, snr, torch.Generator().manual_seed(seed),
                             max_shift_px=0)
    return image_rays(sim.images, L, R, 0.75), sim.rotations[0] @ sim.rotations.transpose(-1, -2)


@pytest.mark.parametrize("views", [9, 32])
def test_m0_classical_common_lines_pose_clean_views_of_unseen_molecules(views):
    """Milestone M0: no training, clean SO(3)-uniform views; median < 10 degrees (measured: ~1)."""
    decoder = GeometricDecoder(ClassicalRayEncoder(), L, anchors=8, matching="hard")
    errors = []
    for seed in range(3):
        rays, true = _views(seed, views)
        with torch.no_grad():
            out = decoder(rays)
        assert torch.allclose(out.rotations[0], torch.eye(3, dtype=torch.float64))
        errors.append(hand_errors(out.rotations[1:], true[1:]))
    assert torch.cat(errors).median() < 10.0


def test_soft_decoder_shapes_and_gradients():
    torch.manual_seed(0)
    decoder = GeometricDecoder(RayEncoder(R, width=16, depth=1, features=8), L, anchors=3)
    rays, _ = _views(5, 7, snr=10.0)
    out = decoder(rays, noise_scale=float(rays.abs().mean()))
    assert out.rotations.shape == (7, 3, 3) and out.logits.shape == (7, 4, L, L) and out.partners == 4
    assert out.fpm.shape == (7, L, 3) and out.confidence.shape == (7, L)
    assert torch.allclose(torch.linalg.det(out.rotations), torch.ones(7, dtype=torch.float64), atol=1e-9)
    out.rotations[4:].sum().backward()
    grads = [p.grad for p in decoder.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_input():
    decoder = GeometricDecoder(ClassicalRayEncoder(), L, matching="hard")
    with pytest.raises(ValueError, match="at least 2 views"):
        decoder(torch.zeros(1, L, R, dtype=torch.complex64))
    with pytest.raises(ValueError, match="rays must be"):
        decoder(torch.zeros(3, L + 2, R, dtype=torch.complex64))
    with pytest.raises(ValueError, match="matching"):
        GeometricDecoder(ClassicalRayEncoder(), L, matching="fuzzy")

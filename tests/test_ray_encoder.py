"""model.ray_encoder: in-plane rotation stays an exact cyclic shift; noise scaling; the classical features."""

from __future__ import annotations

import pytest
import torch
from cryofastar.model.ray_encoder import ClassicalRayEncoder, RayEncoder, ray_channels


def _rays(n: int = 3, L: int = 32, R: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.complex(torch.randn(n, L, R, generator=g), torch.randn(n, L, R, generator=g))


def test_a_cyclic_shift_of_the_rays_shifts_the_features_exactly():
    torch.manual_seed(0)
    encoder = RayEncoder(6, width=16, depth=2, features=8).eval()
    rays = _rays()
    with torch.no_grad():
        features = encoder(rays, 2.0)
        shifted = encoder(torch.roll(rays, 5, dims=1), 2.0)
    assert features.shape == (3, 32, 8)
    assert torch.allclose(shifted, torch.roll(features, 5, dims=1), atol=1e-5)


def test_channels_are_noise_scaled():
    rays = _rays()
    assert torch.allclose(ray_channels(rays * 10, 10.0), ray_channels(rays, 1.0), atol=1e-5)
    assert ray_channels(rays, torch.tensor([1.0, 2.0, 3.0])).shape == (3, 18, 32)


def test_classical_features_give_normalised_correlation():
    rays = _rays()
    features = ClassicalRayEncoder()(rays)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3, 32), atol=1e-6)
    a, b = rays[0, 4], rays[1, 9]
    expected = (a * b.conj()).sum().real / (a.abs().square().sum() * b.abs().square().sum()).sqrt()
    assert torch.isclose(features[0, 4] @ features[1, 9], expected, atol=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="odd"):
        RayEncoder(6, kernel=4)
    with pytest.raises(ValueError, match="radii"):
        RayEncoder(6)(_rays(R=5), 1.0)

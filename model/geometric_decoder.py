"""The geometric decoder: views' Fourier rays -> common lines -> relative rotations, cost linear in views.

1. Every view's rays are encoded (:mod:`cryofastar.model.ray_encoder`), each ray's features
   scaled to unit length, so a pair score is a cosine times a learned temperature.
2. Its **partners** are the reference (view 0) and the next ``K`` views, the anchors.
   Every view is scored against every partner over all ray pairs plus "no common line"
   (:mod:`cryofastar.model.ray_pairs`): ``V x (K + 1)`` pairs, linear in ``V``.
3. The partners' rotations come from their own pairs by common-line synchronisation
   (:func:`cryofastar.model.common_lines.synchronise`, parameter-free).
4. Every other view is placed by its matched rays' 3D directions on its partners: the
   confidence-weighted Kabsch of its dense ray FPM (:func:`~cryofastar.model.common_lines.ray_fpm`).

Matching is ``"soft"`` (softmax with a learned temperature and "no line" logit; trained) or
``"hard"`` (each pair's single best ray pair, as classical common-line methods do; used with
the parameter-free :class:`~cryofastar.model.ray_encoder.ClassicalRayEncoder`).

Rotations are relative (``R_i = A_ref A_iᵀ``, docs/conventions.md "Network poses") and
determined up to the mirror ``J R J`` (common lines cannot tell the hands apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cryofastar.recon.fourier_rays import ray_directions
from torch import nn

from .common_lines import pair_covariance, place_views, ray_fpm, synchronise
from .ray_pairs import pair_logits, pair_probabilities

__all__ = ["DecodedViews", "GeometricDecoder"]


@dataclass
class DecodedViews:
    """What one pass of the decoder gives.

    Attributes
    ----------
    rotations: torch.Tensor
        `(V, 3, 3)` relative rotations, ``[0] = I``.
    fpm: torch.Tensor
        `(V, L, 3)` each ray's matched direction in the reference frame (unit radius).
    confidence: torch.Tensor
        `(V, L)` each ray's total match probability with the view's partners.
    logits: torch.Tensor
        `(V, P, L, L)` ray-pair logits of every view against its ``P = K + 1`` partners
        (a view against itself is meaningless and is not used).
    none_logit: torch.Tensor
        `()` the "no common line" logit.
    partners: int
        ``P``.
    """

    rotations: torch.Tensor
    fpm: torch.Tensor
    confidence: torch.Tensor
    logits: torch.Tensor
    none_logit: torch.Tensor
    partners: int


class GeometricDecoder(nn.Module):
    """Common-line pose solver on top of a ray encoder.

    Parameters
    ----------
    encoder: nn.Module
        ``encoder(rays, noise_scale) -> (V, L, D)`` features.
    n_rays: int
        ``L`` rays per view.
    anchors: int
        ``K`` anchor views besides the reference.
    matching: str
        ``"soft"`` or ``"hard"`` (module docstring).
    """

    def __init__(self, encoder: nn.Module, n_rays: int, anchors: int = 8, matching: str = "soft"):
        super().__init__()
        if matching not in ("soft", "hard"):
            raise ValueError(f"matching must be 'soft' or 'hard', got {matching!r}")
        if n_rays % 2:
            raise ValueError(f"n_rays must be even (opposite rays pair up), got {n_rays}")
        self.encoder, self.n_rays, self.anchors, self.matching = encoder, n_rays, anchors, matching
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.none_logit = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("directions", ray_directions(n_rays), persistent=False)

    def ray_features(self, rays: torch.Tensor, noise_scale: torch.Tensor | float) -> torch.Tensor:
        """`(..., L, R)` rays -> `(..., L, D)` unit-length ray features (pair scores are their cosines)."""
        lead = rays.shape[:-2]
        flat = rays.reshape(-1, *rays.shape[-2:])
        scale = torch.as_tensor(noise_scale, device=rays.device)
        scale = scale.reshape(-1) if scale.dim() else scale
        features = self.encoder(flat, scale)
        return F.normalize(features.float(), dim=-1).reshape(*lead, *features.shape[-2:])

    def pair_logits(self, rays: torch.Tensor, noise_scale: torch.Tensor | float) -> tuple[torch.Tensor, int]:
        """`(V, L, R)` rays -> `(V, P, L, L)` logits against the partners, and ``P``."""
        if rays.dim() != 3 or rays.shape[1] != self.n_rays:
            raise ValueError(f"rays must be (V, {self.n_rays}, R), got {tuple(rays.shape)}")
        if rays.shape[0] < 2:
            raise ValueError("at least 2 views are needed (a reference and one other)")
        features = self.ray_features(rays, noise_scale)
        partners = min(self.anchors + 1, rays.shape[0])
        logits = pair_logits(features[:, None], features[None, :partners], self.log_temperature.exp())
        return logits, partners

    def forward(self, rays: torch.Tensor, noise_scale: torch.Tensor | float = 1.0) -> DecodedViews:
        """Decode one set of views.

        Parameters
        ----------
        rays: torch.Tensor
            `(V, L, R)` complex Fourier rays (:mod:`cryofastar.recon.fourier_rays`); view 0
            is the reference, views ``1..K`` the anchors.
        noise_scale: torch.Tensor | float
            `(V,)` or scalar standard deviation of one Fourier sample's noise.
        """
        logits, partners = self.pair_logits(rays, noise_scale)
        n_views = rays.shape[0]
        u = self.directions.double()
        not_self = torch.ones(n_views, partners, dtype=torch.bool, device=rays.device)
        not_self[torch.arange(partners), torch.arange(partners)] = False  # a view against itself means nothing
        if self.matching == "hard":  # each pair's best ray pair, without a dense (V, P, L, L) one-hot
            best = logits.flatten(-2).argmax(-1)
            first, second = best // self.n_rays, best % self.n_rays  # (V, P)
            covariance = u[first][..., :, None] * u[second][..., None, :]
        else:
            probabilities = pair_probabilities(logits, self.none_logit)[0].double()
            covariance = pair_covariance(probabilities, u)  # (V, P, 3, 3)
        partner_rotations = synchronise(covariance[:partners])
        others = place_views(covariance[partners:], partner_rotations)
        rotations = torch.cat([partner_rotations, others])
        if self.matching == "hard":
            matched = (partner_rotations[None] @ u[second][..., None])[..., 0] * not_self[..., None]  # (V, P, 3)
            fpm = torch.zeros(n_views, self.n_rays, 3, dtype=torch.float64, device=rays.device)
            fpm.scatter_add_(1, first[..., None].expand(-1, -1, 3), matched)
            confidence = torch.zeros(n_views, self.n_rays, dtype=torch.float64, device=rays.device)
            confidence.scatter_add_(1, first, not_self.double())
            fpm = fpm / confidence.clamp_min(1e-12)[..., None]
        else:
            fpm, confidence = ray_fpm(probabilities * not_self[..., None, None], partner_rotations, u)
        return DecodedViews(rotations, fpm, confidence, logits, self.none_logit, partners)

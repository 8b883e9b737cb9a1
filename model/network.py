"""The CryoFastAR network: shared encoder, View Integration / View Update decoder, FPM heads.

Input: sets of ``V`` particle images of one molecule at the model box, view 0 of each
set the **reference**. Each image becomes tokens (:mod:`cryofastar.model.polar`): its
Fourier transform on ``L`` rays over a full turn, grouped ``lines_per_token`` rays ×
one of ``bands`` radial bands per token, so ``T = L / lines_per_token * bands`` tokens
per view. An in-plane rotation is a cyclic shift of tokens along the angle axis.

- **Encoder** (shared by all views): linear patch embedding of each token's samples,
  a fixed Fourier-feature embedding of the token's line angle and band (absolute
  position, needed because the output is in absolute coordinates), a learnable
  embedding marking the reference view vs the others, then ``enc_depth`` ViT blocks
  (self-attention within the view, 2D RoPE on the (angle, band) grid, cyclic in angle).
- **Correlation features** (a cost volume, as optical-flow networks use): for every
  non-reference view, the correlation of each of its rays with every ray of the
  reference — per radial band as complex values and as amplitude profiles, and over the
  whole ray as a *shift-tolerant* complex match (the largest low-frequency Fourier
  coefficient, along the radius, of the product ``z_view · conj(z_ref)``: a relative
  shift makes that product's phase linear in the radius) — arranged by cyclic angular
  *offset* and averaged over the token's rays, is projected and added to the view's
  encoded tokens. An in-plane rotation is a peak at one offset on every ray, a common
  line a peak at one ray pair; amplitudes cannot tell a ray from the opposite one,
  the complex matches can. No parameters: computed without gradients.
- **Anchor correlations**: the same cost volume of every non-reference view with each of
  the set's first ``anchor_views`` non-reference views (the *anchors*; the session frame
  places its anchors there), projected by its own layer and added too. A view's common
  line with the reference fixes two of its three angles; the dihedral angle about that
  line needs a third view, so without these the decoder would have to discover
  view-to-view matches through the reference alone. Still linear in ``V``: each view is
  correlated with ``1 + anchor_views`` views.
- **Decoder**: ``dec_depth`` pairs of a *View Integration* block (reference tokens:
  self-attention, then cross-attention to the tokens of all other views) and a *View
  Update* block (each other view: self-attention, then cross-attention to the reference
  tokens only). No attention between two non-reference views: cost is linear in ``V``.
  Cross-attention scores are content-only; its values carry the angular offset between
  the matched tokens (:class:`cryofastar.model.blocks.Attention`).
- **Heads** (one for the reference, one for the other views): per token a linear map to
  every sample's FPM (3 values) and confidence logit. The FPM is predicted in the
  sample's *ray frame* and rotated by the ray angle ``theta``:
  ``X = Rz(theta) · u``, which makes the reference view's target ``u = (r, 0, 0) + ...``
  the same on every ray, and a view rotated in-plane by ``a`` from the reference
  ``u = r (cos a, sin a, 0)`` on every ray. Confidence is ``1 + exp(logit)`` (> 1).

Outputs are `(S, V, L, R, 3)` FPM (Nyquist units, reference frame, see
:mod:`cryofastar.model.fpm`) and `(S, V, L, R)` confidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .blocks import CrossBlock, SelfBlock
from .polar import line_angles, planar_coordinates, polar_lines
from .rope import RotaryEmbedding2D

__all__ = ["CORRELATION_CHANNELS", "CryoFastAR", "ModelConfig"]

CORRELATION_CHANNELS = 3
"""Correlation features per angular offset: complex, amplitude, shift-tolerant complex."""

MAX_SHIFT_BIN = 6
"""Largest radial-frequency bin searched by the shift-tolerant match (of ``2R``): a relative
shift of up to ~``MAX_SHIFT_BIN * B / (2 r_max)`` pixels along the ray."""


@dataclass(frozen=True)
class ModelConfig:
    """Size and input geometry of the network (stored with the weights)."""

    box: int = 64
    n_lines: int = 96
    n_radii: int = 16
    max_radius_fraction: float = 0.75
    lines_per_token: int = 4
    bands: int = 2
    dim: int = 128
    heads: int = 4
    enc_depth: int = 4
    dec_depth: int = 2
    mlp_ratio: int = 4
    angle_harmonics: int = 8
    anchor_views: int = 2

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ModelConfig:
        """Build from a dict, ignoring unknown keys (forward compatibility).

        A dict without ``anchor_views`` (weights written before anchor correlations
        existed) gets 0, which is the network those weights were trained as.
        """
        names = {f.name for f in fields(cls)}
        values = {"anchor_views": 0, **values}
        return cls(**{k: v for k, v in values.items() if k in names})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    @property
    def angle_positions(self) -> int:
        """Token positions along the angle axis (a full turn)."""
        return self.n_lines // self.lines_per_token

    @property
    def samples_per_token(self) -> int:
        """Ray samples per token and ray."""
        return self.n_radii // self.bands

    @property
    def tokens_per_view(self) -> int:
        """``T``."""
        return self.angle_positions * self.bands

    def validate(self) -> None:
        """Raise ValueError on inconsistent sizes."""
        if self.n_lines % self.lines_per_token:
            raise ValueError("n_lines must be divisible by lines_per_token")
        if self.n_radii % self.bands:
            raise ValueError("n_radii must be divisible by bands")
        if self.dim % (4 * self.heads):
            raise ValueError("dim must be divisible by 4 * heads")
        if self.anchor_views < 0:
            raise ValueError("anchor_views must be >= 0")


class CryoFastAR(nn.Module):
    """Feed-forward pose network (see module docstring).

    Parameters
    ----------
    config: ModelConfig
        Sizes and input geometry.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        config.validate()
        c = config
        p, bands, m = c.angle_positions, c.bands, c.samples_per_token
        angle_pos = torch.arange(p).repeat_interleave(bands)  # token order: angle-major, band-minor
        band_pos = torch.arange(bands).repeat(p)
        self.rope = RotaryEmbedding2D(c.dim // c.heads, angle_pos, band_pos, period=p)
        token_angle = (angle_pos.float() + 0.5 * (c.lines_per_token - 1) / c.lines_per_token) * (2 * math.pi / p)
        harmonics = torch.arange(1, c.angle_harmonics + 1, dtype=torch.float32)
        position = torch.cat([torch.cos(token_angle[:, None] * harmonics), torch.sin(token_angle[:, None] * harmonics),
                              nn.functional.one_hot(band_pos, bands).float()], -1)
        self.register_buffer("position_features", position, persistent=False)  # (T, 2H + bands)
        theta = line_angles(c.n_lines)
        self.register_buffer("line_cos", torch.cos(theta), persistent=False)
        self.register_buffer("line_sin", torch.sin(theta), persistent=False)

        token_features = 2 * c.lines_per_token * m
        self.patch_embed = nn.Linear(token_features, c.dim)
        offsets = (torch.arange(c.n_lines)[:, None] + torch.arange(c.n_lines)[None, :]) % c.n_lines
        self.register_buffer("offset_index", offsets, persistent=False)  # [ray, offset] -> reference ray
        self.correlation_embed = nn.Linear(CORRELATION_CHANNELS * c.n_lines, c.dim)
        if c.anchor_views:
            # zero-initialised: a network warm-started from weights without anchors starts unchanged
            self.anchor_embed = nn.Linear(c.anchor_views * CORRELATION_CHANNELS * c.n_lines, c.dim)
            nn.init.zeros_(self.anchor_embed.weight)
            nn.init.zeros_(self.anchor_embed.bias)
        self.position_embed = nn.Linear(position.shape[1], c.dim)
        self.view_embed = nn.Parameter(torch.zeros(2, c.dim))  # 0: reference, 1: other views
        nn.init.normal_(self.view_embed, std=0.02)
        self.encoder = nn.ModuleList(SelfBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.enc_depth))
        self.encoder_norm = nn.LayerNorm(c.dim)
        self.integration = nn.ModuleList(CrossBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.dec_depth))
        self.update = nn.ModuleList(CrossBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.dec_depth))
        self.decoder_norm = nn.LayerNorm(c.dim)
        outputs = c.lines_per_token * m * 4
        self.reference_head = nn.Linear(c.dim, outputs)
        self.view_head = nn.Linear(c.dim, outputs)

    @property
    def planar_coordinates(self) -> torch.Tensor:
        """`(L, R, 3)` planar coordinates ``x0`` of the output samples (Nyquist units)."""
        c = self.config
        return planar_coordinates(c.n_lines, c.n_radii, c.max_radius_fraction, self.line_cos.device)

    def tokenize(self, lines: torch.Tensor) -> torch.Tensor:
        """`(n, 2, L, R)` ray samples -> `(n, T, 2 * lines_per_token * R / bands)` token features."""
        c = self.config
        n = lines.shape[0]
        grouped = lines.view(n, 2, c.angle_positions, c.lines_per_token, c.bands, c.samples_per_token)
        # (n, 2, P, lpt, bands, m) -> (n, P, bands, 2, lpt, m)
        return grouped.permute(0, 2, 4, 1, 3, 5).reshape(n, c.tokens_per_view, -1)

    def untokenize(self, values: torch.Tensor) -> torch.Tensor:
        """`(n, T, lines_per_token * m * k)` head outputs -> `(n, L, R, k)` per sample."""
        c = self.config
        n = values.shape[0]
        v = values.view(n, c.angle_positions, c.bands, c.lines_per_token, c.samples_per_token, -1)
        return v.permute(0, 1, 3, 2, 4, 5).reshape(n, c.n_lines, c.n_radii, -1)

    def correlation(self, rays: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Ray-to-ray correlations of views with their reference, per token and angular offset.

        Parameters
        ----------
        rays: torch.Tensor
            `(S, W, 2, L, R)` ray samples of W views of each of S sets.
        reference: torch.Tensor
            `(S, 2, L, R)` ray samples of each set's reference.

        Returns
        -------
        features: torch.Tensor
            `(S * W, T, 3 L)`: for each token, the complex, amplitude and shift-tolerant
            correlation of its rays with the reference ray ``offset`` further round
            (offset 0..L-1), band by band, averaged over the token's rays.
        """
        with torch.no_grad():
            return self._correlation(rays.float(), reference.float())

    def anchor_correlation(self, rays: torch.Tensor) -> torch.Tensor:
        """Correlations of every non-reference view with the set's anchor views.

        The anchors are the first ``anchor_views`` non-reference views of each set (the
        session frame puts its anchors there). A view's correlation with itself carries
        nothing and is zero, as are the features of anchors a short set does not have.

        Parameters
        ----------
        rays: torch.Tensor
            `(S, W, 2, L, R)` ray samples of the W non-reference views of each set.

        Returns
        -------
        features: torch.Tensor
            `(S * W, T, anchor_views * 3 L)`: :meth:`correlation` with anchor 1, 2, ...
        """
        c = self.config
        s, w = rays.shape[:2]
        t, channels = c.tokens_per_view, CORRELATION_CHANNELS * c.n_lines
        features = rays.new_zeros(s, w, t, c.anchor_views, channels, dtype=torch.float32)
        for k in range(min(c.anchor_views, w)):  # a handful of anchors, not a loop over particles
            features[:, :, :, k] = self.correlation(rays, rays[:, k]).view(s, w, t, channels)
            features[:, k, :, k] = 0.0
        return features.view(s * w, t, c.anchor_views * channels)

    def _correlation(self, rays: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        c = self.config
        s, w = rays.shape[:2]

        def banded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = x.unflatten(-1, (c.bands, c.samples_per_token)).movedim(-2, -3)  # (..., 2, bands, L, m)
            z = torch.complex(x[..., 0, :, :, :], x[..., 1, :, :, :])
            z = z / z.abs().square().sum(-1, keepdim=True).sqrt().clamp_min(1e-6)
            a = z.abs()
            a = a - a.mean(-1, keepdim=True)
            return z, a / a.norm(dim=-1, keepdim=True).clamp_min(1e-6)

        z_v, a_v = banded(rays)  # (S, W, bands, L, m)
        z_r, a_r = banded(reference[:, None])  # (S, 1, bands, L, m)
        complex_corr = torch.einsum("swblm,sxbkm->swblk", z_v, z_r.conj()).real
        amplitude_corr = torch.einsum("swblm,sxbkm->swblk", a_v, a_r)
        # shift-tolerant: |low-frequency DFT along the radius of z_view(r) conj z_ref(r)|, whole rays
        full_v = torch.complex(rays[:, :, 0], rays[:, :, 1])
        full_r = torch.complex(reference[:, 0], reference[:, 1])[:, None]
        full_v = full_v / full_v.abs().square().sum(-1, keepdim=True).sqrt().clamp_min(1e-6)
        full_r = full_r / full_r.abs().square().sum(-1, keepdim=True).sqrt().clamp_min(1e-6)
        # DFT bins k of the product along r, as matrix products:
        # sum_r (z_v(l, r) e^{-2 pi i k r / 2R}) conj z_ref(l', r)
        k = torch.cat([torch.arange(MAX_SHIFT_BIN + 1), torch.arange(-MAX_SHIFT_BIN, 0)]).to(rays.device)
        r = torch.arange(c.n_radii, device=rays.device)
        modulation = torch.polar(torch.ones(len(k), c.n_radii, device=rays.device),
                                 -torch.pi * k[:, None].float() * r[None, :].float() / c.n_radii)  # (K, R)
        modulated = full_v[:, :, None] * modulation[:, None, :]  # (S, W, K, L, R)
        bins = modulated @ full_r.conj().transpose(-1, -2)[:, :, None]  # (S, W, K, L, L_ref)
        tolerant = bins.abs().amax(2)  # (S, W, L, L_ref)
        tolerant = tolerant[:, :, None].expand(-1, -1, c.bands, -1, -1)
        corr = torch.stack([complex_corr, amplitude_corr, tolerant], -2)  # (S, W, bands, L, 3, L_ref)
        index = self.offset_index.view(1, 1, 1, c.n_lines, 1, c.n_lines).expand_as(corr)
        by_offset = torch.gather(corr, -1, index)  # [..., ray, channel, offset]
        channels = CORRELATION_CHANNELS * c.n_lines
        by_offset = by_offset.reshape(s * w, c.bands, c.angle_positions, c.lines_per_token, channels).mean(3)
        return by_offset.transpose(1, 2).reshape(s * w, c.tokens_per_view, channels)

    def rays(self, images: torch.Tensor) -> torch.Tensor:
        """`(n, B, B)` images -> `(n, 2, L, R)` normalised ray samples (:func:`polar_lines`)."""
        c = self.config
        return polar_lines(images, c.n_lines, c.n_radii, c.max_radius_fraction)

    def encode(self, lines: torch.Tensor, is_reference: bool) -> torch.Tensor:
        """`(n, 2, L, R)` ray samples -> `(n, T, D)` encoded tokens."""
        x = self.patch_embed(self.tokenize(lines)) + self.position_embed(self.position_features)
        x = x + self.view_embed[0 if is_reference else 1]
        for block in self.encoder:
            x = block(x, self.rope)
        return self.encoder_norm(x)

    def _head(self, head: nn.Linear, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.untokenize(head(tokens))  # (n, L, R, 4)
        u, logit = out[..., :3], out[..., 3]
        cos, sin = self.line_cos[:, None], self.line_sin[:, None]
        fpm = torch.stack([cos * u[..., 0] - sin * u[..., 1], sin * u[..., 0] + cos * u[..., 1], u[..., 2]], -1)
        return fpm, 1.0 + torch.exp(logit.clamp(max=30.0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict FPM and confidence for every view of every set.

        Parameters
        ----------
        images: torch.Tensor
            `(S, V, B, B)` sets of V >= 2 images at the model box; view 0 is the reference.

        Returns
        -------
        fpm: torch.Tensor
            `(S, V, L, R, 3)` in the reference view's frame (Nyquist units).
        confidence: torch.Tensor
            `(S, V, L, R)`, > 1.
        """
        s, v, box = images.shape[0], images.shape[1], images.shape[-1]
        if v < 2:
            raise ValueError(f"a set needs the reference and at least one other view, got {v} view(s)")
        if box != self.config.box:
            raise ValueError(f"images are {box} px; the network's box is {self.config.box} px")
        rays = self.rays(images.reshape(-1, box, box)).unflatten(0, (s, v))  # (S, V, 2, L, R)
        ref = self.encode(rays[:, 0], is_reference=True)  # (S, T, D)
        others = self.encode(rays[:, 1:].flatten(0, 1), is_reference=False)  # (S(V-1), T, D)
        others = others + self.correlation_embed(self.correlation(rays[:, 1:], rays[:, 0]))
        if self.config.anchor_views:
            others = others + self.anchor_embed(self.anchor_correlation(rays[:, 1:]))
        t, d = ref.shape[1], ref.shape[2]
        for integrate, update in zip(self.integration, self.update, strict=True):
            ref = integrate(ref, others.view(s, (v - 1) * t, d), self.rope)
            others = update(others, ref.repeat_interleave(v - 1, dim=0), self.rope)
        ref_fpm, ref_conf = self._head(self.reference_head, self.decoder_norm(ref))
        fpm, conf = self._head(self.view_head, self.decoder_norm(others))
        fpm = torch.cat([ref_fpm[:, None], fpm.view(s, v - 1, *fpm.shape[1:])], 1)
        conf = torch.cat([ref_conf[:, None], conf.view(s, v - 1, *conf.shape[1:])], 1)
        return fpm, conf

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

"""Classical projection matching: the pose of each particle that best explains it from a map.

For each particle and each candidate orientation ``A`` (RELION matrix, map -> particle),
the map's projection along ``A`` (torch-fourier-slice, central slice of the 2x padded
map) is compared with the particle by normalised cross-correlation over in-plane
shifts, computed for all shifts at once as an inverse FFT of ``F_particle · conj(F_proj)``
restricted to ``|shift| <= max_shift_px`` per axis. Both sides are band-limited to the
same Fourier disk (``resolution_angstrom``, e.g. the map's FSC resolution, so that noise
beyond it is not fitted) with DC removed, so the score is a correlation coefficient of
the band-passed images (-1 .. 1).

The best candidate gives the particle's rotation; the best shift ``d`` (the particle is
the projection moved by ``+d`` pixels) gives its ``rlnOrigin = -d`` (the shift that
re-centres it, docs/conventions.md). Work is vectorised over particles x candidates, in
chunks of ``chunk`` projections to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch_fourier_slice import project_3d_to_2d

from .fourier import rfft2_centered, rfft_frequencies_2d

__all__ = ["MatchResult", "match_projections"]


@dataclass
class MatchResult:
    """Best pose per particle.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices of the best candidates.
    origins_px: torch.Tensor
        `(n, 2)` float64 rlnOriginX/Y in pixels (the shift that re-centres the particle).
    scores: torch.Tensor
        `(n,)` float32 normalised cross-correlation of the best candidate and shift.
    candidate: torch.Tensor
        `(n,)` int64 index of the best candidate.
    all_scores: torch.Tensor
        `(n, K)` float32 best-shift score of every candidate (for weighting, uncertainty).
    """

    rotations: torch.Tensor
    origins_px: torch.Tensor
    scores: torch.Tensor
    candidate: torch.Tensor
    all_scores: torch.Tensor


def _band(box: int, apix: float, resolution_angstrom: float | None,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, B // 2 + 1)` band mask (DC excluded, up to the resolution) and rfft multiplicities.

    Columns 1 .. ceil(B/2) - 1 of an rfft stand for two Fourier coefficients each, so a
    sum of ``multiplicity * |X|^2`` over the rfft equals the sum over the full spectrum.
    """
    freq = rfft_frequencies_2d(box, device=device).norm(dim=-1)  # cycles / px
    limit = 0.5 if resolution_angstrom is None else min(0.5, apix / resolution_angstrom)
    mask = ((freq > 0) & (freq <= limit)).float()
    multiplicity = torch.full((box // 2 + 1,), 2.0, device=device)
    multiplicity[0] = 1.0
    if box % 2 == 0:
        multiplicity[-1] = 1.0
    return mask, multiplicity


def _shift_window(box: int, max_shift_px: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a `(B, B)` correlation map of shifts within ``±max_shift_px``, and the shifts `(S, 2)`."""
    s = torch.arange(-max_shift_px, max_shift_px + 1, device=device)
    sy, sx = torch.meshgrid(s, s, indexing="ij")
    flat = (sy % box) * box + (sx % box)
    return flat.reshape(-1), torch.stack([sx.reshape(-1), sy.reshape(-1)], -1).double()


def match_projections(images: torch.Tensor, volume: torch.Tensor, candidates: torch.Tensor, apix: float,
                      max_shift_px: int = 4, resolution_angstrom: float | None = None,
                      chunk: int = 2048) -> MatchResult:
    """Score every candidate orientation of every particle against ``volume``; keep the best.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particle images [y, x], centre ``B // 2``.
    volume: torch.Tensor
        `(B, B, B)` map [z, y, x] at the same box and pixel size.
    candidates: torch.Tensor
        `(K, 3, 3)` orientations shared by all particles (global search) or `(n, K, 3, 3)`
        per particle (local search), RELION matrices.
    apix: float
        Pixel size in Å.
    max_shift_px: int
        Largest shift searched per axis, in pixels.
    resolution_angstrom: float | None
        Compare only Fourier components up to this resolution (``None``: up to Nyquist).
    chunk: int
        Projections computed at once (memory: ~``chunk * B^2 * 12`` bytes).

    Returns
    -------
    MatchResult
    """
    n, box = images.shape[0], images.shape[-1]
    if images.shape[1:] != (box, box) or volume.shape != (box, box, box):
        raise ValueError(f"images (n, B, B) and volume (B, B, B) must share the box; got {tuple(images.shape)} "
                         f"and {tuple(volume.shape)}")
    if candidates.ndim == 3:
        candidates = candidates.expand(n, *candidates.shape)
    if candidates.ndim != 4 or candidates.shape[0] != n or candidates.shape[-2:] != (3, 3):
        raise ValueError(f"candidates must be (K, 3, 3) or (n, K, 3, 3), got {tuple(candidates.shape)}")
    if not 0 <= max_shift_px < box // 2:
        raise ValueError(f"max_shift_px must be in [0, {box // 2}), got {max_shift_px}")
    device = volume.device
    k = candidates.shape[1]
    mask, multiplicity = _band(box, apix, resolution_angstrom, device)
    window, shifts = _shift_window(box, int(max_shift_px), device)

    particles = rfft2_centered(images.to(device).float()) * mask  # (n, B, B/2+1)
    particle_norm = (particles.abs().square() * multiplicity).sum(dim=(-2, -1)).sqrt().clamp_min(1e-12)

    scores = torch.empty(n, k, device=device)
    best_shift = torch.empty(n, k, dtype=torch.long, device=device)
    per_chunk = max(1, chunk // k)  # particles per chunk
    vol = volume.float()
    for start in range(0, n, per_chunk):  # chunks bound memory; each is vectorised over particles x candidates
        stop = min(n, start + per_chunk)
        rots = candidates[start:stop].reshape(-1, 3, 3).to(device)
        projections = project_3d_to_2d(vol, rots.transpose(-1, -2).float(), pad_factor=2.0)
        spectra = rfft2_centered(projections).view(stop - start, k, box, box // 2 + 1) * mask
        norm = (spectra.abs().square() * multiplicity).sum(dim=(-2, -1)).sqrt().clamp_min(1e-12)  # (c, K)
        # c(t) = sum_r f(r) p(r - t): peaks at t = d when the particle is the projection moved by +d
        product = particles[start:stop, None] * spectra.conj()
        correlation = torch.fft.irfftn(product, s=(box, box), dim=(-2, -1)) * (box * box)
        windowed = correlation.flatten(-2)[..., window]  # (c, K, S)
        value, index = windowed.max(dim=-1)
        scores[start:stop] = value / (particle_norm[start:stop, None] * norm)
        best_shift[start:stop] = index
    best_score, best = scores.max(dim=-1)
    rows = torch.arange(n, device=device)
    d = shifts[best_shift[rows, best]]  # (n, 2) displacement of the particle
    return MatchResult(rotations=candidates[rows.cpu(), best.cpu()].double().cpu(), origins_px=(-d).cpu(),
                       scores=best_score.cpu(), candidate=best.cpu(), all_scores=scores.cpu())


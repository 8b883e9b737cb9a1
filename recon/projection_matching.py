"""Classical projection matching: the pose of each particle that best explains it from a map.

Everything happens in Fourier space on the ``M`` half-plane pixels with
``0 < |k| <= k_max`` (:func:`~cryofastar.recon.map_slices.band_frequencies`; ``k_max``
from the map's resolution, so noise beyond it is not fitted):

- the particle spectrum ``F(k)`` is ``rfft2_centered(image)`` at those pixels, first
  re-centred by its current ``rlnOrigin``;
- the candidate's central slice ``P(k)`` comes from :class:`~cryofastar.recon.map_slices.MapSlicer`;
- for every integer shift ``t`` of a small window the score is the normalised
  cross-correlation ``Re sum_k F(k) e^{2 pi i k.t} conj(P(k)) / (|F| |P|)`` (-1 .. 1):
  one real matrix product over particles x shifts x candidates. It peaks where the
  particle is the projection moved by ``+t``.

The best candidate and shift give the pose; the shift is refined to sub-pixel by a
parabola through the scores at the best shift and its neighbours. The new
``rlnOrigin`` is the old one minus the shift found (docs/conventions.md).

**Uncertainty.** With noise-dominated spectra, the log-likelihood of a candidate is
about ``M * ncc^2`` (Gaussian noise, best amplitude scale), so the posterior over the
scored candidates is ``p_c ~ exp(M (ncc_c^2 - ncc_best^2))``. ``spread_degrees`` is the
posterior RMS angle of the candidates from the best one: small when one orientation
stands out, large when the data cannot tell (low SNR, featureless map, or a particle
unlike the map).

Two modes, both vectorised (no Python loop over particles):

- :func:`search_global`: one SO(3) grid shared by all particles (slices computed once).
- :func:`refine_local`: coarse-to-fine balls around each particle's own pose
  (``range`` and ``step`` halve at each stage; the shift window narrows to ±1 px).

**Posterior mean.** When the posterior is wide (low SNR), its best candidate scatters
around the true pose more than its mean does: the argmax picks a noise peak, the mean
averages over them. :func:`refine_local` can therefore end with a posterior-mean stage:
score a ball of rotation vectors ``v_c`` around the best pose ``A`` at the full band and
the shift found, and return ``A exp(sum_c p_c v_c)`` with the posterior weights above
(a rotation-vector mean, accurate for balls of a few degrees). Where one candidate
dominates (high SNR) the mean is that candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fourier import rfft2_centered
from .map_slices import MapSlicer, band_frequencies
from .orientation_grids import local_rotation_grid, local_rotation_vectors, rotation_vectors_to_matrices

__all__ = ["PoseMatch", "ctf_at_band", "particle_spectra", "posterior_mean_rotations", "refine_local",
           "score_candidates", "search_global"]


@dataclass
class PoseMatch:
    """Best pose per particle, with its score and uncertainty.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices.
    origins_px: torch.Tensor
        `(n, 2)` float64 rlnOriginX/Y in pixels of the matched box (the shift that
        re-centres the particle).
    scores: torch.Tensor
        `(n,)` float32 normalised cross-correlation of the best candidate and shift.
    spread_degrees: torch.Tensor
        `(n,)` float32 posterior RMS angle around the best candidate (module docstring).
    """

    rotations: torch.Tensor
    origins_px: torch.Tensor
    scores: torch.Tensor
    spread_degrees: torch.Tensor


def particle_spectra(images: torch.Tensor, k: torch.Tensor, origins_px: torch.Tensor | None = None) -> torch.Tensor:
    """`(n, B, B)` images -> `(n, M)` complex64 ``rfft2_centered`` at the band pixels ``k``.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` real images [y, x], centre ``B // 2``.
    k: torch.Tensor
        `(M, 2)` (kx, ky) cycles/px, multiples of ``1 / B`` with ``kx >= 0``.
    origins_px: torch.Tensor | None
        `(n, 2)` rlnOriginX/Y in px: the spectra are of the re-centred particles.
    """
    box = images.shape[-1]
    spectra = rfft2_centered(images.float())
    k = k.to(spectra.device)
    ix = torch.round(k[:, 0] * box).long()
    iy = torch.round(k[:, 1] * box).long() % box
    values = spectra[:, iy, ix]
    if origins_px is not None:  # re-centring moves the content by +origin: multiply by exp(-2 pi i k.o)
        phase = -2 * math.pi * (origins_px.to(spectra.device, torch.float64) @ k.double().T)
        values = values * torch.polar(torch.ones_like(phase), phase).to(torch.complex64)
    return values


def _shift_window(radius: int, device: torch.device) -> torch.Tensor:
    """`(S, 2)` float32 integer shifts (x, y) with ``|x|, |y| <= radius``, row-major over (y, x)."""
    s = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    sy, sx = torch.meshgrid(s, s, indexing="ij")
    return torch.stack([sx.reshape(-1), sy.reshape(-1)], -1)


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Complex vectors over the last axis scaled to unit norm, as `(..., 2M)` real [re, im]."""
    real = torch.cat([values.real, values.imag], -1)
    return real / real.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def score_candidates(spectra: torch.Tensor, slices: torch.Tensor, k: torch.Tensor, radius: int,
                     ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised cross-correlation of every particle, candidate and integer shift.

    Without CTF the score is ``<F, P> / (|F| |P|)``. With ``ctf`` it is the particle against
    the candidate's CTF-modulated projection, ``<F, CTF P> / (|F| |CTF P|)``: the norm of
    ``CTF P`` depends on the candidate, and normalising by ``|P|`` instead biases the
    search towards views whose power sits where the CTF is strong (about 1.7° on clean
    particles of a 56 Å protein).

    Parameters
    ----------
    spectra: torch.Tensor
        `(n, M)` complex particle spectra at ``k`` (:func:`particle_spectra`).
    slices: torch.Tensor
        `(C, M)` complex slices shared by all particles, or `(n, C, M)` per particle.
    k: torch.Tensor
        `(M, 2)` band frequencies in cycles/px.
    radius: int
        Shifts searched: every integer ``t`` with ``|tx|, |ty| <= radius`` px.
    ctf: torch.Tensor | None
        `(n, M)` real CTF of each particle at ``k`` (:func:`ctf_at_band`), or ``None``.

    Returns
    -------
    torch.Tensor
        `(n, C, S)` float32 scores, ``S = (2 radius + 1)^2`` shifts in :func:`_shift_window` order.
    """
    shifts = _shift_window(radius, spectra.device)
    phase = 2 * math.pi * (shifts @ k.to(spectra.device).T)  # (S, M)
    if ctf is None:
        moved = spectra[:, None, :] * torch.polar(torch.ones_like(phase), phase)  # (n, S, M)
        a = _unit(moved)  # (n, S, 2M)
        b = _unit(slices)  # (C, 2M) or (n, C, 2M)
        if b.ndim == 2:
            return (a.reshape(-1, a.shape[-1]) @ b.T).reshape(a.shape[0], a.shape[1], -1).transpose(1, 2)
        return torch.bmm(b, a.transpose(1, 2))  # (n, C, S)
    ctf = ctf.to(spectra.device, torch.float32)
    image_norm = spectra.abs().square().sum(-1).sqrt().clamp_min(1e-20)  # (n,) |F|
    moved = (spectra * ctf)[:, None, :] * torch.polar(torch.ones_like(phase), phase)  # (n, S, M): CTF F, shifted
    a = torch.cat([moved.real, moved.imag], -1) / image_norm[:, None, None]  # (n, S, 2M)
    b = torch.cat([slices.real, slices.imag], -1)  # (C, 2M) or (n, C, 2M)
    power = slices.real.square() + slices.imag.square()  # |P|^2
    if b.ndim == 2:
        num = (a.reshape(-1, a.shape[-1]) @ b.T).reshape(a.shape[0], a.shape[1], -1).transpose(1, 2)
        model_norm = (ctf.square() @ power.T).sqrt()  # (n, C) |CTF P|
    else:
        num = torch.bmm(b, a.transpose(1, 2))
        model_norm = torch.einsum("nm,ncm->nc", ctf.square(), power).sqrt()
    return num / model_norm.clamp_min(1e-20)[..., None]


def _best(scores: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best candidate `(n,)`, its sub-pixel shift `(n, 2)` and score `(n,)` from `(n, C, S)` scores."""
    n, c, _ = scores.shape
    side = 2 * radius + 1
    per_candidate, shift_index = scores.max(dim=-1)  # (n, C)
    best_score, best = per_candidate.max(dim=-1)
    rows = torch.arange(n, device=scores.device)
    surface = scores[rows, best].reshape(n, side, side)  # [y, x]
    iy, ix = shift_index[rows, best] // side, shift_index[rows, best] % side
    shift = torch.stack([ix, iy], -1).float() - radius
    if side < 3:
        return best, shift, best_score

    def vertex(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
        curvature = minus - 2 * centre + plus
        offset = torch.where(curvature < 0, 0.5 * (minus - plus) / curvature.clamp(max=-1e-12), 0.0)
        return offset.clamp(-0.5, 0.5)

    inner_x = (ix > 0) & (ix < side - 1)
    inner_y = (iy > 0) & (iy < side - 1)
    cx, cy = ix.clamp(1, side - 2), iy.clamp(1, side - 2)
    dx = vertex(surface[rows, iy, cx - 1], surface[rows, iy, cx], surface[rows, iy, cx + 1])
    dy = vertex(surface[rows, cy - 1, ix], surface[rows, cy, ix], surface[rows, cy + 1, ix])
    shift = shift + torch.stack([torch.where(inner_x, dx, 0.0), torch.where(inner_y, dy, 0.0)], -1)
    return best, shift, best_score


def _posterior(per_candidate: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """`(n, C)` posterior weights ``p_c ~ exp(M (ncc_c^2 - ncc_best^2))`` of `(n, C)` scores (rows sum to 1)."""
    top = per_candidate.max(dim=-1, keepdim=True).values
    return torch.softmax(n_frequencies * (per_candidate.clamp_min(0).square() - top.clamp_min(0).square()), dim=-1)


def _spread_degrees(per_candidate: torch.Tensor, best: torch.Tensor, candidates: torch.Tensor,
                    n_frequencies: int) -> torch.Tensor:
    """`(n,)` posterior RMS angle (degrees) of candidates around the best (module docstring).

    ``per_candidate`` `(n, C)` best-shift scores; ``candidates`` `(C, 3, 3)` or `(n, C, 3, 3)`.
    """
    n = per_candidate.shape[0]
    rows = torch.arange(n, device=per_candidate.device)
    p = _posterior(per_candidate, n_frequencies)
    rot = candidates.to(per_candidate.device, torch.float32)
    rot = rot.expand(n, *rot.shape) if rot.ndim == 3 else rot
    best_rot = rot[rows, best]  # (n, 3, 3)
    trace = torch.einsum("nij,ncij->nc", best_rot, rot)  # tr(R_best^T R_c)
    angle = torch.arccos(((trace - 1) / 2).clamp(-1, 1))
    return torch.rad2deg((p * angle.square()).sum(-1).sqrt())


def _check_images(images: torch.Tensor, slicer: MapSlicer) -> None:
    if images.ndim != 3 or images.shape[1:] != (slicer.box, slicer.box):
        raise ValueError(f"images must be (n, {slicer.box}, {slicer.box}) like the map, got {tuple(images.shape)}")


def _check_radius(max_shift_px: int, box: int) -> int:
    if not 0 <= max_shift_px < box // 2:
        raise ValueError(f"max_shift_px must be in [0, {box // 2}), got {max_shift_px}")
    return int(max_shift_px)


def ctf_at_band(ctf_grid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`(n, M)` values of per-particle CTF images `(n, B, B // 2 + 1)` (rfft layout) at band frequencies ``k``."""
    box = ctf_grid.shape[-2]
    ix = torch.round(k[:, 0] * box).long()
    iy = torch.round(k[:, 1] * box).long() % box
    return ctf_grid[:, iy.to(ctf_grid.device), ix.to(ctf_grid.device)]


def search_global(images: torch.Tensor, slicer: MapSlicer, grid: torch.Tensor, max_shift_px: int = 4,
                  origins_px: torch.Tensor | None = None, chunk_scores: int = 20_000_000,
                  ctf_grid: torch.Tensor | None = None) -> PoseMatch:
    """Best orientation of every particle on one grid shared by all (e.g. all of SO(3)).

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles at the map's box and pixel size.
    slicer: MapSlicer
        The map (its ``k_max`` sets the band compared).
    grid: torch.Tensor
        `(K, 3, 3)` RELION matrices (:func:`~cryofastar.recon.orientation_grids.global_rotation_grid`).
    max_shift_px: int
        Shifts searched per axis around ``origins_px`` (or the box centre), in px.
    origins_px: torch.Tensor | None
        `(n, 2)` current rlnOriginX/Y in px (``None``: 0).
    chunk_scores: int
        Scores held at once (memory: 4 bytes each); particles are taken in chunks.
    ctf_grid: torch.Tensor | None
        `(n, B, B // 2 + 1)` each particle's CTF (:func:`~cryofastar.recon.ctf.ctf_rfft`), or
        ``None``. With it, each particle is compared with the CTF-modulated projections:
        ``<F, CTF P> / (|F| |CTF P|)`` (:func:`score_candidates`; the sign of every CTF lobe
        right).
    """
    _check_images(images, slicer)
    radius = _check_radius(max_shift_px, slicer.box)
    n = images.shape[0]
    device = slicer.device
    k = band_frequencies(slicer.box, slicer.k_max, device)
    origins = torch.zeros(n, 2, dtype=torch.float64) if origins_px is None else origins_px.double().cpu()
    slices = slicer.slices(grid, k)  # (K, M), once for all particles
    per_chunk = max(1, chunk_scores // (len(grid) * (2 * radius + 1) ** 2))
    rotations = torch.empty(n, 3, 3, dtype=torch.float64)
    new_origins = torch.empty(n, 2, dtype=torch.float64)
    scores = torch.empty(n)
    spread = torch.empty(n)
    for start in range(0, n, per_chunk):  # chunks bound memory; each is one matrix product
        part = slice(start, min(n, start + per_chunk))
        spectra = particle_spectra(images[part].to(device), k, origins[part])
        ctf = None if ctf_grid is None else ctf_at_band(ctf_grid[part].to(device), k)
        table = score_candidates(spectra, slices, k, radius, ctf)
        best, shift, best_score = _best(table, radius)
        rotations[part] = grid[best.cpu()].double()
        new_origins[part] = origins[part] - shift.double().cpu()
        scores[part] = best_score.cpu()
        spread[part] = _spread_degrees(table.max(dim=-1).values, best, grid, k.shape[0]).cpu()
    return PoseMatch(rotations, new_origins, scores, spread)


def refine_local(images: torch.Tensor, slicer: MapSlicer, rotations: torch.Tensor, origins_px: torch.Tensor,
                 range_degrees: float = 10.0, step_degrees: float = 5.0, stages: int = 3,
                 max_shift_px: int = 2, chunk: int = 256, ctf_grid: torch.Tensor | None = None,
                 mean_range_degrees: float = 0.0, mean_step_degrees: float = 4.5) -> PoseMatch:
    """Coarse-to-fine local search around each particle's pose, optionally ending in a posterior mean.

    Stage 0 scores the ball ``A Δ`` of radius ``range_degrees`` and grid step
    ``step_degrees`` (:func:`~cryofastar.recon.orientation_grids.local_rotation_grid`)
    with shifts within ``max_shift_px`` of the current origin, comparing frequencies up
    to half the slicer's band. Each later stage ``s`` halves the step, scores the 19
    grid points within 1.5 steps of the current best, with shifts within ±1 px, over a
    band growing to the slicer's full ``k_max`` at the last stage. The final angular
    step is ``step_degrees / 2^(stages - 1)``. With ``mean_range_degrees > 0`` the pose
    returned is the posterior mean over a ball around that best pose
    (:func:`posterior_mean_rotations`; module docstring).

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles at the map's box and pixel size.
    slicer: MapSlicer
        The map (its ``k_max`` sets the band compared).
    rotations: torch.Tensor
        `(n, 3, 3)` starting RELION matrices.
    origins_px: torch.Tensor
        `(n, 2)` starting rlnOriginX/Y in px.
    range_degrees, step_degrees: float
        First stage's ball radius and grid step.
    stages: int
        Number of stages (3: e.g. 5° -> 2.5° -> 1.25° steps).
    max_shift_px: int
        Shift search radius of the first stage, in px.
    chunk: int
        Particles per vectorised step (memory ~ ``chunk * C * M * 8`` bytes).
    ctf_grid: torch.Tensor | None
        `(n, B, B // 2 + 1)` each particle's CTF, or ``None`` (as in :func:`search_global`).
    mean_range_degrees, mean_step_degrees: float
        Radius and grid step of the posterior-mean ball (``0``: return the best candidate).

    Returns
    -------
    PoseMatch
        ``scores`` are the best candidate's; ``spread_degrees`` comes from the first
        (widest) stage.
    """
    _check_images(images, slicer)
    radius = _check_radius(max_shift_px, slicer.box)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    n = images.shape[0]
    if rotations.shape != (n, 3, 3) or origins_px.shape != (n, 2):
        raise ValueError(f"for {n} images expected rotations (n, 3, 3) and origins (n, 2), got "
                         f"{tuple(rotations.shape)} and {tuple(origins_px.shape)}")
    device = slicer.device
    plan = []  # (ball, band frequencies, shift radius) per stage
    for stage in range(stages):
        step = step_degrees / 2**stage
        ball = local_rotation_grid(range_degrees if stage == 0 else 1.5 * step, step).to(device)
        fraction = 1.0 if stages == 1 else 0.5 + 0.5 * stage / (stages - 1)
        k_max = max(fraction * slicer.k_max, min(slicer.k_max, 4.0 / slicer.box))
        plan.append((ball, band_frequencies(slicer.box, k_max, device), radius if stage == 0 else min(1, radius)))
    rot_out = rotations.double().cpu().clone()
    origin_out = origins_px.double().cpu().clone()
    scores = torch.empty(n)
    spread = torch.empty(n)
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        rows = torch.arange(part.stop - part.start, device=device)
        rot = rot_out[part].to(device)
        origin = origin_out[part].to(device)
        for stage, (ball, k, r) in enumerate(plan):
            candidates = rot[:, None] @ ball[None]  # (c, C, 3, 3)
            spectra = particle_spectra(images[part].to(device), k, origin)
            ctf = None if ctf_grid is None else ctf_at_band(ctf_grid[part].to(device), k)
            table = score_candidates(spectra, slicer.slices(candidates, k), k, r, ctf)
            best, shift, best_score = _best(table, r)
            if stage == 0:
                spread[part] = _spread_degrees(table.max(dim=-1).values, best, candidates, k.shape[0]).cpu()
            rot = candidates[rows, best]
            origin = origin - shift.double()
        rot_out[part], origin_out[part], scores[part] = rot.cpu(), origin.cpu(), best_score.cpu()
    if mean_range_degrees > 0:
        rot_out = posterior_mean_rotations(images, slicer, rot_out, origin_out, mean_range_degrees, mean_step_degrees,
                                           chunk=max(1, chunk // 4), ctf_grid=ctf_grid)
    return PoseMatch(rot_out, origin_out, scores, spread)


def posterior_mean_rotations(images: torch.Tensor, slicer: MapSlicer, rotations: torch.Tensor,
                             origins_px: torch.Tensor, range_degrees: float = 9.0, step_degrees: float = 4.5,
                             chunk: int = 64, ctf_grid: torch.Tensor | None = None) -> torch.Tensor:
    """`(n, 3, 3)` float64 posterior-mean RELION matrices over a ball around each pose.

    Each particle is scored (at the slicer's full band, shift fixed at ``origins_px``)
    against ``A exp(v_c)`` for the rotation vectors ``v_c`` of
    :func:`~cryofastar.recon.orientation_grids.local_rotation_vectors` (``range_degrees``,
    ``step_degrees``); the result is ``A exp(sum_c p_c v_c)`` with the posterior weights
    ``p_c ~ exp(M (ncc_c^2 - ncc_max^2))`` (module docstring).

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles at the map's box and pixel size.
    slicer: MapSlicer
        The map.
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices ``A`` the balls are centred on (usually the best candidates).
    origins_px: torch.Tensor
        `(n, 2)` rlnOriginX/Y in px.
    range_degrees, step_degrees: float
        Radius and grid step of the ball (about ``4.2 (range / step)^3`` candidates; the
        defaults are :class:`~cryofastar.recon.refinement.RefineSettings`'s: 33 candidates).
    chunk: int
        Particles per vectorised step.
    ctf_grid: torch.Tensor | None
        `(n, B, B // 2 + 1)` each particle's CTF, or ``None``.
    """
    _check_images(images, slicer)
    n = images.shape[0]
    if rotations.shape != (n, 3, 3) or origins_px.shape != (n, 2):
        raise ValueError(f"for {n} images expected rotations (n, 3, 3) and origins (n, 2), got "
                         f"{tuple(rotations.shape)} and {tuple(origins_px.shape)}")
    device = slicer.device
    vectors = local_rotation_vectors(range_degrees, step_degrees).to(device)  # (C, 3)
    ball = rotation_vectors_to_matrices(vectors)
    k = band_frequencies(slicer.box, slicer.k_max, device)
    out = rotations.double().cpu().clone()
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        rot = out[part].to(device)
        candidates = rot[:, None] @ ball[None]  # (c, C, 3, 3)
        spectra = particle_spectra(images[part].to(device), k, origins_px[part].double().to(device))
        ctf = None if ctf_grid is None else ctf_at_band(ctf_grid[part].to(device), k)
        table = score_candidates(spectra, slicer.slices(candidates, k), k, 0, ctf)[..., 0]  # (c, C)
        mean = _posterior(table, k.shape[0]).double() @ vectors  # (c, 3) rotation-vector mean
        out[part] = (rot @ rotation_vectors_to_matrices(mean)).cpu()
    return out

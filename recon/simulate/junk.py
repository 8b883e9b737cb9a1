"""Junk images on the same footing as simulated particles: noise boxes, carbon edges, aggregates, off-centre.

What a picker boxes out besides intact, centred particles, and what 2D classification
must learn to flag (issue 21). Every junk image has the session's box, pixel size, CTF
distribution and noise level, and is made the way
:func:`~cryofastar.recon.simulate.particles.simulate_particles` makes a particle: the
object (projected density, protein positive) is laid out on a field of view twice the box
(``2B x 2B``, the box's centre ``B // 2`` at the field's centre ``B``), multiplied in
Fourier space by the CTF (if any), the central ``B x B`` boxed out, white Gaussian noise of
the session's ``sigma`` added. Because everything lives on the doubled field, content
moved towards the box edge is cut off at the edge, never wrapped round.

The types (:class:`JunkType`; the value is the STAR column
:data:`~cryofastar.recon.io.columns.SIMULATED_JUNK_COLUMN`, 0 for a real particle):

1. ``NOISE``: no object, noise only (an empty patch of ice the picker took for a particle).
2. ``CARBON_EDGE``: the edge of the carbon film, a straight smooth step (``tanh``, width
   :data:`EDGE_WIDTH_PX`) of height :data:`EDGE_CONTRAST` times the molecule's projected
   peak density (:attr:`JunkScale.peak`; for a small molecule in its box that is some 20
   times the particle's signal std over the box), the film's side positive; the line at a random angle
   (uniform in 0-360°, which also picks the carbon side) and a random signed distance from
   the box centre (uniform within ``±EDGE_OFFSET * B``). The film continues beyond the box
   across the whole field, fading out (cosine taper) only outside ``0.6 B`` of the centre,
   so the box sees a pure step; with a CTF it gets the CTF's fringes along the edge.
3. ``AGGREGATE``: two projections of the molecule at independent SO(3)-uniform poses,
   summed, their centres :attr:`JunkScale.diameter_px` times ``U[0.9, 1.1]`` apart along a
   random direction, the pair's midpoint displaced like a particle (uniform within
   ``±max_shift_px`` per axis). A pair wider than the box is cut off, as it is on a
   micrograph.
4. ``OFF_CENTRE``: one projection displaced by ``U[OFF_CENTRE_MIN, OFF_CENTRE_MAX] * B``
   along a random direction, so it is partly cut off by the box edge.

Poses (what the STAR row says): an aggregate's are the first molecule's pose and its
re-centring origin (``-d1 * apix``); an off-centre particle's are its true pose and
origin (the re-centring shift, large). A noise box's and an edge's rotation is
SO(3)-uniform and their origin zero: meaningless, written only so that every row is
complete. Every junk image gets CTF parameters drawn from the session's distribution (a
noise box's too, though nothing in it carries them) when the session has a CTF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch_fourier_slice import project_3d_to_2d

from ..ctf import ctf_rfft
from ..fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered
from ..rotations import random_rotations
from .particles import CtfRange, SimulatedParticles

__all__ = [
    "EDGE_CONTRAST",
    "EDGE_OFFSET",
    "EDGE_WIDTH_PX",
    "JUNK_TYPES",
    "OFF_CENTRE_MAX",
    "OFF_CENTRE_MIN",
    "JunkScale",
    "JunkType",
    "simulate_junk",
]


class JunkType(IntEnum):
    """What an image of a simulated session is (the value of ``rlnCryofastarSimulatedJunk``)."""

    PARTICLE = 0
    NOISE = 1
    CARBON_EDGE = 2
    AGGREGATE = 3
    OFF_CENTRE = 4


JUNK_TYPES = (JunkType.NOISE, JunkType.CARBON_EDGE, JunkType.AGGREGATE, JunkType.OFF_CENTRE)
"""The junk types, in the order a session shares them out."""
EDGE_CONTRAST = 1.0
"""Height of the carbon step in units of the molecule's projected peak density (:attr:`JunkScale.peak`):
a film a few nm thick (carbon ~2 g/cm³ against ice's ~0.94) projects about as much density as the
centre of a globular protein (~1.35 g/cm³) a few nm across, so the step is as strong as the
particle's densest part and spans the box; after the CTF it is the strongest thing in a session."""
EDGE_WIDTH_PX = 1.0
"""Width of the carbon step (px): density ``0.5 * (1 + tanh(s / EDGE_WIDTH_PX))`` at signed distance ``s``."""
EDGE_OFFSET = 0.4
"""The edge passes within ``±EDGE_OFFSET * B`` of the box centre."""
OFF_CENTRE_MIN, OFF_CENTRE_MAX = 0.3, 0.45
"""An off-centre particle is displaced by ``U[OFF_CENTRE_MIN, OFF_CENTRE_MAX] * B`` pixels."""
_SUPPORT_LEVEL = 0.05  # a projection's support: its pixels above this share of its maximum
_TAPER_START = 0.6  # the carbon film fades out (per axis) beyond this distance from the centre, in boxes


@dataclass(frozen=True)
class JunkScale:
    """The molecule's scale, measured once per session so every chunk of junk matches.

    Attributes
    ----------
    peak: float
        The largest value of a clean, CTF-free projection (mean over the probe's poses), image
        units: what a carbon edge's height is measured in.
    diameter_px: float
        The molecule's diameter (px): twice the largest distance from the box centre of a
        projection's support (its pixels above 5 % of its maximum) over the probe's poses.
    """

    peak: float
    diameter_px: float

    @classmethod
    def measure(cls, volume: torch.Tensor, generator: torch.Generator, n_probe: int = 32) -> JunkScale:
        """Measure from ``n_probe`` projections of ``volume`` (`(B, B, B)` [z, y, x]) at random poses."""
        box = int(volume.shape[-1])
        projections = _project(volume, random_rotations(n_probe, generator))
        peak = float(projections.amax(dim=(-2, -1)).mean())
        c = torch.arange(box, dtype=torch.float32) - box // 2
        radius = (c[:, None] ** 2 + c[None, :] ** 2).sqrt()
        inside = projections > _SUPPORT_LEVEL * projections.amax(dim=(-2, -1), keepdim=True)
        diameter = 2 * float(torch.where(inside, radius, 0.0).amax())
        return cls(peak=peak, diameter_px=diameter)


def _project(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """`(n, B, B)` projections of ``volume`` at RELION matrices ``rotations`` (as particles.py makes them)."""
    return project_3d_to_2d(volume.to(torch.float32), rotations.transpose(-1, -2).float(), pad_factor=2.0)


def _random_directions(n: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, 2)` float64 unit vectors (x, y), angle uniform in [0, 2 pi)."""
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    return torch.stack([angle.cos(), angle.sin()], -1)


def _carbon_edges(n: int, box: int, height: float, generator: torch.Generator) -> torch.Tensor:
    """`(n, 2B, 2B)` carbon-film steps on the doubled field (module docstring, type 2)."""
    big = 2 * box
    normal = _random_directions(n, generator)
    offset = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * EDGE_OFFSET * box
    c = torch.arange(big, dtype=torch.float64) - box  # field centre = box centre
    distance = c[None, None, :] * normal[:, 0, None, None] + c[None, :, None] * normal[:, 1, None, None]
    step = 0.5 * (1 + torch.tanh((distance - offset[:, None, None]) / EDGE_WIDTH_PX))
    fade = ((c.abs() - _TAPER_START * box) / ((1 - _TAPER_START) * box)).clamp(0, 1)
    taper = 0.5 * (1 + torch.cos(math.pi * fade))  # 1 within 0.6 B of the centre, 0 at the field's edge
    return (height * step * taper[None, :, None] * taper[None, None, :]).to(torch.float32)


def simulate_junk(
    volume: torch.Tensor,
    kinds: torch.Tensor,
    apix: float,
    generator: torch.Generator,
    scale: JunkScale,
    ctf: CtfRange | None = None,
    noise_sigma: float = 0.0,
    max_shift_px: float = 4.0,
) -> SimulatedParticles:
    """Simulate one junk image per entry of ``kinds`` (module docstring), all types at once.

    Parameters
    ----------
    volume: torch.Tensor
        `(B, B, B)` map [z, y, x] of the session's molecule, centre ``B // 2``.
    kinds: torch.Tensor
        `(n,)` integer :class:`JunkType` values, each in 1..4 (for ``n`` images of one type,
        ``torch.full((n,), JunkType.CARBON_EDGE)``).
    apix: float
        Pixel size in Å.
    generator: torch.Generator
        Source of randomness (seed it for reproducible junk).
    scale: JunkScale
        The molecule's signal std and diameter (:meth:`JunkScale.measure`).
    ctf: CtfRange | None
        The session's CTF distribution; ``None`` for no CTF.
    noise_sigma: float
        Standard deviation of the white noise added (the session's); 0 gives the clean images.
    max_shift_px: float
        Largest displacement per axis (px) of an aggregate's midpoint, as for particles.

    Returns
    -------
    SimulatedParticles
        `(n, B, B)` float32 images and the rows' poses and CTF parameters (module docstring:
        meaningless poses for noise boxes and edges).
    """
    kinds = torch.as_tensor(kinds, dtype=torch.int64).reshape(-1)
    if bool(((kinds < JunkType.NOISE) | (kinds > JunkType.OFF_CENTRE)).any()):
        raise ValueError(f"junk types must be 1..4 (JunkType), got {sorted(set(kinds.tolist()))}")
    n, box = int(kinds.numel()), int(volume.shape[-1])
    big, lo = 2 * box, box // 2
    rotations = random_rotations(n, generator)
    second = random_rotations(n, generator)
    direction = _random_directions(n, generator)
    pair_centre = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * max_shift_px
    separation = scale.diameter_px * (0.9 + 0.2 * torch.rand(n, generator=generator, dtype=torch.float64))
    off = box * (OFF_CENTRE_MIN + (OFF_CENTRE_MAX - OFF_CENTRE_MIN)
                 * torch.rand(n, generator=generator, dtype=torch.float64))
    params = ctf.sample(n, generator) if ctf is not None else None

    aggregate, off_centre = kinds == JunkType.AGGREGATE, kinds == JunkType.OFF_CENTRE
    displacement = torch.zeros(n, 2, dtype=torch.float64)  # of the first (or only) molecule, px (x, y)
    displacement[aggregate] = (pair_centre - 0.5 * separation[:, None] * direction)[aggregate]
    displacement[off_centre] = (off[:, None] * direction)[off_centre]
    spectrum = torch.zeros(n, big, big // 2 + 1, dtype=torch.complex64)
    molecules = torch.cat([torch.nonzero(aggregate | off_centre).reshape(-1), torch.nonzero(aggregate).reshape(-1)])
    if molecules.numel():
        n_first = int((aggregate | off_centre).sum())
        poses = torch.cat([rotations[molecules[:n_first]], second[molecules[n_first:]]])
        shifts = torch.cat([displacement[molecules[:n_first]],
                            (pair_centre + 0.5 * separation[:, None] * direction)[molecules[n_first:]]])
        padded = F.pad(_project(volume, poses), (lo, big - box - lo, lo, big - box - lo))
        spectrum.index_add_(0, molecules, phase_shift_rfft2(rfft2_centered(padded), shifts, big))
    edges = torch.nonzero(kinds == JunkType.CARBON_EDGE).reshape(-1)
    if edges.numel():
        film = _carbon_edges(int(edges.numel()), box, EDGE_CONTRAST * scale.peak, generator)
        spectrum[edges] = rfft2_centered(film)
    if params is not None:
        spectrum = spectrum * ctf_rfft(params, big, apix)
    clean = irfft2_centered(spectrum, big)[:, lo : lo + box, lo : lo + box]
    images = clean + float(noise_sigma) * torch.randn(clean.shape, generator=generator)
    return SimulatedParticles.drawn(images, rotations, displacement, apix, params, noise_sigma)

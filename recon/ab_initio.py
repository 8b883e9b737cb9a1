"""Map-only ab initio: poses and a first map from random starts, by soft projection matching.

Incremental (minibatch) expectation-maximisation in the spirit of cryoSPARC's SGD ab
initio, written with the Fourier-space matching of
:mod:`~cryofastar.recon.projection_matching`. Designed for streaming: particles arrive
batch by batch (:meth:`AbInitio.add`), already-seen ones are re-posed later
(:meth:`AbInitio.repose`), and the map improves after every minibatch.

**Working box.** Everything runs at a small working box ``W`` (Fourier crop of the
session box ``B``; pixel size ``apix * B / W``), chosen so its Nyquist is finer than
the schedule's final resolution. The class keeps its own :class:`HalfSetAccumulator`
at that box; the caller builds the full-box map from the returned best poses.

**One minibatch** (``settings.batch_size`` particles):

1. *References.* From the accumulator's half maps ``H1, H2`` and their sum: below
   ``shared_resolution_angstrom`` (20 Å) both halves use the map of both halves (as
   RELION starts both from one low-passed reference); above it each half uses its own
   map, so the halves stay independent there. Each reference is masked by a soft
   sphere, optionally clipped at 0 (densities are positive) and low-passed to the
   current band ``k_max`` (:class:`~cryofastar.recon.map_slices.MapSlicer`).
2. *Scores.* Each particle against every orientation of a global SO(3) grid
   (``global_step_degrees``) and every shift of a window (``max_shift_angstrom``,
   step ``shift_step_px`` working pixels), as the normalised cross-correlation
   ``ncc`` over the band's Fourier pixels (with CTF: ``Re <CTF F, P> / (|F| |CTF P|)``,
   the correlation of the image with the CTF-modulated projection).
3. *Posterior.* Over the ``top_k`` best (orientation, shift) pairs,
   ``p ~ exp(beta M ncc^2)`` (``M`` band pixels; Gaussian-noise likelihood with the
   best amplitude scale, projection_matching's docstring; ``beta`` is
   ``inverse_temperature``).
4. *Insertion.* The particle goes into its half's grid once per candidate, weighted by
   ``p`` (data and weight channels; :meth:`HalfSetAccumulator.add` ``weights``). A
   re-posed particle's previous candidates are removed first (exact inverse), so it is
   never matched against its own contribution.

**Resolution schedule.** The band starts at ``initial_resolution_angstrom`` (~35 Å)
and tightens geometrically to ``final_resolution_angstrom`` as particles are
processed (``schedule_particles`` poses), never finer than the half-map FSC 0.143
allows. Until the accumulator holds ``initial_particles``, new particles get random
orientations (weight 1, shift 0): that noisy first map breaks the symmetry of a
featureless start. A minibatch is at most a quarter of the particles already in the
maps (within ``[batch_size, max_batch_size]``).

**Many cheap EM steps first.** What makes a random start converge at low SNR is the
number of map updates in which most of the map has been re-posed, not the number of
particles: a seed set of ~1,000 particles re-posed ~7 times converges at SNR 0.1 where
all particles at once, hard-assigned, do not. :func:`run_ab_initio` therefore iterates
on a random seed subset (``seed_particles``, ``seed_passes``) before adding the rest;
a streaming caller does the same: :meth:`AbInitio.add` the first particles, then
:meth:`AbInitio.repose` them (passing back what was returned) while more arrive, then
add the newcomers and keep re-posing the oldest.

Example (streaming)::

    ab = AbInitio(box, apix)
    poses = ab.add(images, half_sets)            # SoftPoses of the batch
    poses = ab.repose(images, half_sets, poses)  # later: remove + match + insert
    best_rotations, best_origins = poses.rotations, poses.origins_angstrom

Conventions: RELION matrices ``A`` (map -> particle frame), ``rlnOrigin`` in Å = the
shift that re-centres the particle (docs/conventions.md). Maps (and hence poses) are
defined up to a global rotation and the hand.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch_fourier_rescale import fourier_rescale_2d

from .accumulator import HalfSetAccumulator
from .ctf import CtfParams, ctf_rfft
from .fourier import irfft3_centered, rfft3_centered
from .fsc import fsc, resolution_at_threshold
from .map_slices import MapSlicer, band_frequencies
from .orientation_grids import global_rotation_grid, local_rotation_grid
from .projection_matching import particle_spectra
from .rotations import random_rotations

__all__ = ["AbInitio", "AbInitioResult", "AbInitioSettings", "SoftPoses", "run_ab_initio"]


@dataclass(frozen=True)
class AbInitioSettings:
    """How map-only ab initio runs (units: Å, degrees, working-box pixels).

    Attributes
    ----------
    initial_resolution_angstrom, final_resolution_angstrom: float
        Band of the first and the last minibatches (the schedule between them is
        geometric in the number of poses computed).
    schedule_particles: int
        Poses (new or re-posed particles) over which the band goes from initial to final.
    shared_resolution_angstrom: float
        Below this resolution both halves are matched against the map of both halves.
    working_box: int | None
        Box of matching and of the internal maps (``None``: the smallest even box whose
        Nyquist is ``0.8 final_resolution`` or finer, at most the session box).
    global_step_degrees: float
        Step of the SO(3) grid searched (4,416 orientations at 15°).
    max_shift_angstrom: float
        Shifts searched per axis, about the box centre (Å).
    shift_step_px: float
        Step of the shift window in working-box pixels.
    coarse_resolution_angstrom: float
        Band of the exhaustive stage when the band is finer: the grid is searched up to
        this resolution, and its ``coarse_candidates`` best pairs per particle are
        re-scored on the whole band.
    coarse_candidates: int
        Pairs (orientation, shift) passed from the exhaustive to the fine stage.
    top_k: int
        Candidates (orientation, shift) kept per particle for soft insertion.
    local_polish: bool
        Also score a ball of rotations around the best candidate (radius half the grid
        step, spacing a quarter; at the best's shift) on the whole band; the posterior
        is then over the ``top_k`` best of the grid candidates and the ball.
    min_weight: float
        Candidates whose posterior weight is below this fraction of the best one's are
        dropped (weight 0, not inserted) and the rest renormalised.
    inverse_temperature: float
        ``beta`` in ``p ~ exp(beta M ncc^2)``; 1 is the Gaussian-noise posterior.
    batch_size, max_batch_size: int
        Particles per minibatch (the references are rebuilt after each): a quarter of the
        particles in the maps, within ``[batch_size, max_batch_size]``, so a minibatch
        never outweighs the map it is matched against.
    seed_particles, seed_passes: int
        :func:`run_ab_initio` first iterates on a random subset of this size, this many
        passes (a streaming caller does the same with its first particles).
    seed_restarts: int
        Independent seed stages (other random starts) of which :func:`run_ab_initio`
        keeps the one whose maps match the seed set best (mean best score at
        ``shared_resolution_angstrom``): a random start can settle in a wrong,
        self-consistent map.
    settled_change_degrees, max_seed_passes: float, int
        The seed stage goes on after ``seed_passes`` while the median change of the best
        orientations in a pass exceeds ``settled_change_degrees``, up to ``max_seed_passes``.
    initial_particles: int
        New particles get random orientations until the accumulator holds this many.
    mask_diameter_fraction: float
        Diameter of the soft spherical mask on the references, as a fraction of the box.
    positive_density: bool
        Clip references at 0 (densities positive, as in RELION-convention particles).
    interpolation: str
        Insertion of the internal accumulator (``"nearest"`` or ``"trilinear"``).
    """

    initial_resolution_angstrom: float = 35.0
    final_resolution_angstrom: float = 10.0
    schedule_particles: int = 6_000
    shared_resolution_angstrom: float = 20.0
    working_box: int | None = None
    global_step_degrees: float = 15.0
    max_shift_angstrom: float = 8.0
    shift_step_px: float = 1.0
    coarse_resolution_angstrom: float = 20.0
    coarse_candidates: int = 48
    top_k: int = 8
    local_polish: bool = True
    min_weight: float = 0.02
    inverse_temperature: float = 1.0
    batch_size: int = 256
    max_batch_size: int = 2048
    seed_particles: int = 1000
    seed_passes: int = 7
    seed_restarts: int = 2
    settled_change_degrees: float = 10.0
    max_seed_passes: int = 20
    initial_particles: int = 256
    mask_diameter_fraction: float = 0.9
    positive_density: bool = True
    interpolation: str = "nearest"


@dataclass
class SoftPoses:
    """Poses of particles: the best candidate, and all candidates with their posterior weights.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices of the best candidate.
    origins_angstrom: torch.Tensor
        `(n, 2)` float64 rlnOriginX/YAngst of the best candidate.
    scores: torch.Tensor
        `(n,)` float32 normalised cross-correlation of the best candidate (0 for random starts).
    spread_degrees: torch.Tensor
        `(n,)` float32 posterior RMS angle of the candidates around the best (180 for random starts).
    candidate_rotations: torch.Tensor
        `(n, K, 3, 3)` float64 RELION matrices inserted into the internal accumulator.
    candidate_origins_angstrom: torch.Tensor
        `(n, K, 2)` float64 their origins (Å).
    candidate_weights: torch.Tensor
        `(n, K)` float32 their posterior weights (each row sums to 1).
    """

    rotations: torch.Tensor
    origins_angstrom: torch.Tensor
    scores: torch.Tensor
    spread_degrees: torch.Tensor
    candidate_rotations: torch.Tensor
    candidate_origins_angstrom: torch.Tensor
    candidate_weights: torch.Tensor

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    def __getitem__(self, index: torch.Tensor | slice) -> SoftPoses:
        """The poses of a subset of particles."""
        return SoftPoses(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list[SoftPoses]) -> SoftPoses:
        """Concatenate along particles (all parts must have the same ``K``)."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def empty(cls, n: int, k: int) -> SoftPoses:
        """Uninitialised poses for ``n`` particles and ``k`` candidates."""
        return cls(torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64),
                   torch.empty(n), torch.empty(n), torch.empty(n, k, 3, 3, dtype=torch.float64),
                   torch.empty(n, k, 2, dtype=torch.float64), torch.empty(n, k))

    def set(self, index: torch.Tensor, other: SoftPoses) -> None:
        """Write ``other`` into the rows ``index`` (in place)."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(other, f.name)


def _working_box(box: int, apix: float, settings: AbInitioSettings) -> int:
    if settings.working_box is not None:
        return min(box, int(settings.working_box))
    # final resolution at 0.8 Nyquist or below: 2 apix_w <= 0.8 final  <=>  W >= 2.5 B apix / final
    w = int(math.ceil(2.5 * box * apix / settings.final_resolution_angstrom - 1e-9))
    return min(box, max(16, w + (w % 2)))


def _soft_sphere(box: int, diameter_px: float, edge_px: float = 3.0) -> torch.Tensor:
    """`(B, B, B)` 1 inside ``diameter / 2``, cosine edge of ``edge_px``, 0 outside; centre ``B // 2``."""
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).sqrt()
    inner = diameter_px / 2 - edge_px
    t = ((r - inner) / edge_px).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def _rotation_angles_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations ``a`` and ``b`` (broadcast `(..., 3, 3)`), degrees."""
    trace = (a * b).sum((-2, -1))
    return torch.rad2deg(torch.arccos(((trace - 1) / 2).clamp(-1, 1)))


class AbInitio:
    """Streaming map-only ab initio (module docstring): holds the internal half-set maps.

    Parameters
    ----------
    box: int
        Session box ``B`` (px) of the images passed in.
    apix: float
        Session pixel size (Å).
    settings: AbInitioSettings | None
        Schedule and search settings.
    seed: int
        Seed of the random starting orientations.
    device: torch.device | str
        Where matching and insertion run.

    Attributes
    ----------
    accumulator: HalfSetAccumulator
        Soft-assignment half maps at the working box (its ``particle_counts`` count
        inserted candidates, not particles).
    poses_done: int
        Poses computed so far (new and re-posed particles): the schedule's clock.
    """

    def __init__(self, box: int, apix: float, settings: AbInitioSettings | None = None, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.settings = s = settings or AbInitioSettings()
        if s.final_resolution_angstrom > s.initial_resolution_angstrom:
            raise ValueError("final resolution must not be coarser than the initial one")
        self.box, self.apix = int(box), float(apix)
        self.device = torch.device(device)
        self.working_box = _working_box(self.box, self.apix, s)
        self.working_apix = self.apix * self.box / self.working_box
        self.accumulator = HalfSetAccumulator(self.working_box, self.working_apix, interpolation=s.interpolation,
                                              device=self.device)
        self.grid = global_rotation_grid(s.global_step_degrees)  # (C, 3, 3) float64
        radius = int(math.floor(s.max_shift_angstrom / self.working_apix / s.shift_step_px + 1e-9))
        steps = torch.arange(-radius, radius + 1, dtype=torch.float32) * s.shift_step_px
        sy, sx = torch.meshgrid(steps, steps, indexing="ij")
        self.shifts_px = torch.stack([sx.reshape(-1), sy.reshape(-1)], -1)  # (S, 2) working px (x, y)
        self.mask = _soft_sphere(self.working_box, s.mask_diameter_fraction * self.working_box).to(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.poses_done = 0
        self.particles_inside = 0  # particles (not candidates) currently in the accumulator
        # (k, slices (2, C, M), slicers of both halves), cleared by every insertion
        self._references: tuple[torch.Tensor, torch.Tensor, list[MapSlicer]] | None = None
        step = s.global_step_degrees
        self.ball = local_rotation_grid(step / 2, step / 4)[1:] if s.local_polish else None  # (L, 3, 3), no identity
        self._fsc_resolution = math.inf

    # ------------------------------------------------------------------ public API
    @property
    def half_map_resolution_angstrom(self) -> float:
        """Half-map FSC 0.143 resolution (Å) of the internal maps when the references were last built."""
        return self._fsc_resolution

    @property
    def resolution_angstrom(self) -> float:
        """Resolution (Å) of the band the next minibatch is matched in."""
        s = self.settings
        t = min(1.0, self.poses_done / max(1, s.schedule_particles))
        scheduled = s.initial_resolution_angstrom * (s.final_resolution_angstrom / s.initial_resolution_angstrom) ** t
        return float(max(scheduled, self._fsc_resolution, 2 * self.working_apix))

    def add(self, images: torch.Tensor, half_sets: torch.Tensor, ctf: CtfParams | None = None) -> SoftPoses:
        """Pose new particles and insert them (soft) into the internal maps.

        Parameters
        ----------
        images: torch.Tensor
            `(n, B, B)` particles at the session box and pixel size [y, x], centre ``B // 2``.
        half_sets: torch.Tensor
            `(n,)` 1 or 2.
        ctf: CtfParams | None
            Per-particle CTF (images contain it), or ``None``.

        Returns
        -------
        SoftPoses
            Best pose (RELION matrix, rlnOrigin in Å), score, spread and the soft
            candidates; keep it to :meth:`repose` the particles later.
        """
        return self._process(images, half_sets, ctf, previous=None)

    def repose(self, images: torch.Tensor, half_sets: torch.Tensor, previous: SoftPoses,
               ctf: CtfParams | None = None) -> SoftPoses:
        """Remove particles' previous soft contribution, pose them again, insert them again.

        Arguments as for :meth:`add`, plus ``previous``: what :meth:`add` or
        :meth:`repose` returned for exactly these particles (same order).
        """
        if len(previous) != images.shape[0]:
            raise ValueError(f"{len(previous)} previous poses for {images.shape[0]} images")
        return self._process(images, half_sets, ctf, previous=previous)

    def match(self, images: torch.Tensor, half_sets: torch.Tensor, ctf: CtfParams | None = None,
              resolution_angstrom: float | None = None) -> SoftPoses:
        """Pose particles against the current maps without inserting them (the maps do not change).

        Arguments as for :meth:`add`; ``resolution_angstrom`` overrides the band (e.g. to
        compare runs at a common band: ``scores`` depend on it).
        """
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (n, {self.box}, {self.box}), got {tuple(images.shape)}")
        small = self._to_working(images)
        halves = torch.as_tensor(half_sets).long().cpu()
        parts = [self._match(small[i : i + 1024], halves[i : i + 1024], None if ctf is None else ctf[i : i + 1024],
                             resolution_angstrom) for i in range(0, images.shape[0], 1024)]
        return SoftPoses.cat(parts) if parts else SoftPoses.empty(0, self.settings.top_k)

    def remove(self, images: torch.Tensor, half_sets: torch.Tensor, poses: SoftPoses,
               ctf: CtfParams | None = None) -> None:
        """Take particles out of the internal maps (e.g. discarded ones): the exact inverse of their insertion.

        ``poses`` is what :meth:`add` or :meth:`repose` last returned for them.
        """
        n = images.shape[0]
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box) or len(poses) != n:
            raise ValueError(f"expected (n, {self.box}, {self.box}) images and n poses, got "
                             f"{tuple(images.shape)} and {len(poses)}")
        if n:
            self._insert(self._to_working(images), torch.as_tensor(half_sets).long().cpu(), ctf, poses, sign=-1)

    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume (settings, internal maps, schedule clock, random state)."""
        return {"version": 1, "box": self.box, "apix": self.apix,
                "settings": {f.name: getattr(self.settings, f.name) for f in fields(self.settings)},
                "accumulator": self.accumulator.state_dict(), "poses_done": self.poses_done,
                "particles_inside": self.particles_inside, "generator": self.generator.get_state()}

    @classmethod
    def from_state_dict(cls, state: dict[str, object], device: torch.device | str = "cpu") -> AbInitio:
        """Restore an :class:`AbInitio` from :meth:`state_dict` (ValueError if it is not one)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not an ab initio state of version 1")
        out = cls(state["box"], state["apix"], AbInitioSettings(**state["settings"]), device=device)
        out.accumulator = HalfSetAccumulator.from_state_dict(state["accumulator"], device)
        out.poses_done, out.particles_inside = int(state["poses_done"]), int(state["particles_inside"])
        out.generator.set_state(state["generator"])
        return out

    def volume(self) -> torch.Tensor:
        """`(W, W, W)` float32 map of both halves at the working box."""
        return self.accumulator.volume()

    def half_volumes(self) -> torch.Tensor:
        """`(2, W, W, W)` float32 half maps at the working box."""
        return self.accumulator.half_volumes()

    # ------------------------------------------------------------------ internals
    def _process(self, images: torch.Tensor, half_sets: torch.Tensor, ctf: CtfParams | None,
                 previous: SoftPoses | None) -> SoftPoses:
        n = images.shape[0]
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (n, {self.box}, {self.box}), got {tuple(images.shape)}")
        halves = torch.as_tensor(half_sets).long().cpu()
        if halves.shape != (n,) or not bool(((halves == 1) | (halves == 2)).all()):
            raise ValueError("half sets must be (n,) of 1 or 2")
        if ctf is not None and len(ctf) != n:
            raise ValueError(f"{len(ctf)} CTF parameter sets for {n} images")
        out = SoftPoses.empty(n, self.settings.top_k)
        if n == 0:
            return out
        small = self._to_working(images)
        start = 0
        while start < n:
            size = min(self.settings.max_batch_size, max(self.settings.batch_size, self.particles_inside // 4))
            part = torch.arange(start, min(n, start + size))
            start += part.numel()
            sub_ctf = None if ctf is None else ctf[part]
            if previous is not None:
                self._insert(small[part], halves[part], sub_ctf, previous[part], sign=-1)
            if previous is None and self.particles_inside < self.settings.initial_particles:
                poses = self._random_poses(part.numel())
            else:
                poses = self._match(small[part], halves[part], sub_ctf)
            self._insert(small[part], halves[part], sub_ctf, poses, sign=1)
            self.poses_done += part.numel()
            out.set(part, poses)
        return out

    def _to_working(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if self.working_box == self.box:
            return images
        out, _ = fourier_rescale_2d(images, target_shape=(self.working_box, self.working_box))
        return out.float()

    def _random_poses(self, n: int) -> SoftPoses:
        k = self.settings.top_k
        rot = random_rotations(n, self.generator)
        cand = rot[:, None].expand(n, k, 3, 3).clone()
        weights = torch.zeros(n, k)
        weights[:, 0] = 1.0
        zeros = torch.zeros(n, 2, dtype=torch.float64)
        return SoftPoses(rot, zeros, torch.zeros(n), torch.full((n,), 180.0), cand,
                         torch.zeros(n, k, 2, dtype=torch.float64), weights)

    def _insert(self, small: torch.Tensor, halves: torch.Tensor, ctf: CtfParams | None, poses: SoftPoses,
                sign: int) -> None:
        n, k = poses.candidate_weights.shape
        w = poses.candidate_weights.reshape(-1)
        rows = torch.nonzero(w > 0).squeeze(-1)  # zero-weight candidates contribute nothing
        particle = rows // k
        args = (small[particle], poses.candidate_rotations.reshape(-1, 3, 3)[rows],
                poses.candidate_origins_angstrom.reshape(-1, 2)[rows], halves[particle],
                None if ctf is None else ctf[particle.to(ctf.defocus_u_angstrom.device)])
        if sign > 0:
            self.accumulator.add(*args, weights=w[rows])
            self.particles_inside += n
        else:
            self.accumulator.remove(*args, weights=w[rows])
            self.particles_inside -= n
        self._references = None

    def _reference_slices(self, resolution_angstrom: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, list[MapSlicer]]:
        """Band frequencies `(M, 2)`, slices `(2, C, M)` and slicers of both halves' references.

        At the schedule's band (cached until the next insertion), or at ``resolution_angstrom``.
        """
        if self._references is not None and resolution_angstrom is None:  # cleared by every insertion
            return self._references
        s = self.settings
        halves = self.accumulator.half_volumes()
        if resolution_angstrom is None:
            resolution = resolution_at_threshold(fsc(halves[0], halves[1]), self.working_apix, 0.143)
            self._fsc_resolution = resolution if math.isfinite(resolution) else math.inf
        k_max = min(0.5, self.working_apix / (resolution_angstrom or self.resolution_angstrom))
        w = self.working_box
        spectra = rfft3_centered(torch.cat([halves, halves.sum(0, keepdim=True) / 2]))  # (3, W, W, W//2+1)
        kz = torch.fft.fftfreq(w, device=spectra.device)
        kx = torch.fft.rfftfreq(w, device=spectra.device)
        radius = (kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2).sqrt()
        shared = radius < self.working_apix / s.shared_resolution_angstrom
        refs = torch.where(shared, spectra[2:3], spectra[:2])
        refs = irfft3_centered(refs, w) * self.mask
        if s.positive_density:
            refs = refs.clamp_min(0)
        k = band_frequencies(w, k_max, self.device)
        slicers = [MapSlicer(refs[h], k_max) for h in (0, 1)]
        slices = torch.stack([slicer.slices(self.grid, k) for slicer in slicers])
        if resolution_angstrom is not None:
            return k, slices, slicers
        self._references = (k, slices, slicers)
        return self._references

    def _match(self, small: torch.Tensor, halves: torch.Tensor, ctf: CtfParams | None,
               resolution_angstrom: float | None = None) -> SoftPoses:
        """Soft global search of a minibatch against the current references.

        Coarse stage: every grid orientation and shift, on the band pixels up to
        ``coarse_resolution_angstrom`` (or the whole band if that is coarser); it keeps
        ``coarse_candidates`` pairs per particle. Fine stage (only when the band goes
        beyond the coarse one): those pairs re-scored on the whole band. The posterior
        is over the ``top_k`` best of the last stage.
        """
        s = self.settings
        k, slices, slicers = self._reference_slices(resolution_angstrom)  # (M, 2), (2, C, M)
        resolution = resolution_angstrom or self.resolution_angstrom
        c = self.grid.shape[0]
        spectra = particle_spectra(small, k)  # (n, M) complex
        if ctf is not None:
            box = self.working_box
            ix = torch.round(k[:, 0] * box).long()
            iy = torch.round(k[:, 1] * box).long() % box
            ctf_k = ctf_rfft(ctf, box, self.working_apix, device=self.device)[:, iy, ix]  # (n, M)
            spectra = spectra * ctf_k  # CTF F
            ctf2 = ctf_k.square()
        else:
            ctf2 = None
        shifts = self.shifts_px.to(self.device)
        phase = 2 * math.pi * (shifts @ k.T)  # (S, M): content moved by +t
        ramp = torch.polar(torch.ones_like(phase), phase)
        rows_h = halves.to(self.device) - 1

        coarse_k = self.working_apix / max(s.coarse_resolution_angstrom, resolution)
        inner = torch.nonzero(k.norm(dim=-1) <= coarse_k + 1e-6).squeeze(-1)
        fine = inner.numel() < k.shape[0]
        keep = min(max(s.top_k, s.coarse_candidates) if fine else s.top_k, c * shifts.shape[0])
        # image norm: of the image itself, not of CTF F (the CTF belongs to the model)
        plain = particle_spectra(small, k) if ctf is not None else spectra
        scores, index = self._coarse(spectra[:, inner], plain[:, inner].abs().square().sum(-1).sqrt(),
                                     None if ctf2 is None else ctf2[:, inner], slices[..., inner],
                                     ramp[:, inner], rows_h, keep)
        orientation, shift_index = index % c, index // c
        m = inner.numel()
        if fine:
            refs = slices[rows_h[:, None], orientation]  # (n, T, M)
            moved = spectra[:, None, :] * ramp[shift_index]  # (n, T, M)
            num = (moved.real * refs.real + moved.imag * refs.imag).sum(-1)
            weight = refs.abs().square() if ctf2 is None else refs.abs().square() * ctf2[:, None, :]
            ncc = num / (weight.sum(-1).sqrt().clamp_min(1e-20)
                         * plain.abs().square().sum(-1).sqrt().clamp_min(1e-20)[:, None])
            scores, best = ncc.topk(s.top_k, dim=-1)
            orientation, shift_index = orientation.gather(1, best), shift_index.gather(1, best)
            m = k.shape[0]
        rot = self.grid.to(self.device)[orientation]  # (n, K, 3, 3)
        if self.ball is not None:  # local polish around the best: the grid step / 4
            m = k.shape[0]
            ball = self.ball.to(self.device)
            local = rot[:, :1] @ ball[None]  # (n, L, 3, 3)
            moved = spectra * ramp[shift_index[:, 0]]  # (n, M) at the best's shift
            ncc = torch.empty(local.shape[:2], device=self.device)
            for h in (0, 1):
                members = torch.nonzero(rows_h == h).squeeze(-1)
                if members.numel():
                    refs = slicers[h].slices(local[members], k)  # (r, L, M)
                    num = (moved[members, None].real * refs.real + moved[members, None].imag * refs.imag).sum(-1)
                    power = refs.abs().square() if ctf2 is None else refs.abs().square() * ctf2[members, None, :]
                    ncc[members] = num / (power.sum(-1).sqrt().clamp_min(1e-20) * plain[members].abs().square()
                                          .sum(-1).sqrt().clamp_min(1e-20)[:, None])
            scores, best = torch.cat([scores, ncc], 1).topk(s.top_k, dim=-1)
            rot = torch.cat([rot, local], 1)[torch.arange(rot.shape[0], device=self.device)[:, None], best]
            shift_index = torch.cat([shift_index, shift_index[:, :1].expand(-1, ncc.shape[1])], 1).gather(1, best)
        scores, rot, shift_index = scores.cpu(), rot.cpu(), shift_index.cpu()
        log_p = s.inverse_temperature * m * (scores.clamp_min(0).square() - scores[:, :1].clamp_min(0).square())
        weights = torch.softmax(log_p, dim=-1)
        weights = torch.where(weights >= s.min_weight * weights[:, :1], weights, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
        origins = -self.shifts_px[shift_index].double() * self.working_apix  # re-centre: minus the shift
        spread = (weights * _rotation_angles_degrees(rot[:, :1], rot).float().square()).sum(-1).sqrt()
        return SoftPoses(rot[:, 0].clone(), origins[:, 0].clone(), scores[:, 0].clone(), spread,
                         rot, origins, weights)

    def _coarse(self, spectra: torch.Tensor, image_norm: torch.Tensor, ctf2: torch.Tensor | None,
                slices: torch.Tensor, ramp: torch.Tensor, rows_h: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """NCC of every particle x shift x grid orientation; the best ``keep`` per particle.

        ``spectra`` `(n, M)` (CTF F with CTF), ``image_norm`` `(n,)` ``|F|``, ``ctf2``
        `(n, M)` or ``None``, ``slices`` `(2, C, M)`, ``ramp`` `(S, M)`, ``rows_h`` `(n,)`
        half index 0/1. Returns scores `(n, keep)` and flat indices ``shift * C + orientation``.
        """
        n, m = spectra.shape
        c, n_shifts = slices.shape[1], ramp.shape[0]
        power = slices.abs().square()  # (2, C, M)
        out_scores = torch.empty(n, keep, device=spectra.device)
        out_index = torch.empty(n, keep, dtype=torch.long, device=spectra.device)
        per_chunk = max(1, 20_000_000 // (c * n_shifts))
        for h in (0, 1):
            members = torch.nonzero(rows_h == h).squeeze(-1)
            ref = torch.cat([slices[h].real, slices[h].imag], -1)  # (C, 2M)
            for start in range(0, members.numel(), per_chunk):
                rows = members[start : start + per_chunk]
                moved = spectra[rows, None, :] * ramp  # (r, S, M)
                a = torch.cat([moved.real, moved.imag], -1).reshape(-1, 2 * m)
                num = (a @ ref.T).reshape(rows.numel(), n_shifts, c)  # (r, S, C)
                if ctf2 is None:
                    denom = power[h].sum(-1).sqrt()[None, None, :]
                else:
                    denom = (ctf2[rows] @ power[h].T).sqrt()[:, None, :]  # (r, 1, C) |CTF P|
                ncc = num / (denom.clamp_min(1e-20) * image_norm[rows, None, None].clamp_min(1e-20))
                out_scores[rows], out_index[rows] = ncc.reshape(rows.numel(), -1).topk(keep, dim=-1)
        return out_scores, out_index


@dataclass
class AbInitioResult:
    """What :func:`run_ab_initio` returns.

    Attributes
    ----------
    poses: SoftPoses
        Final poses of every particle (input order).
    ab_initio: AbInitio
        The state (internal working-box maps), e.g. to continue streaming.
    accumulator: HalfSetAccumulator
        Full-box half maps built from the best poses (hard assignment).
    seconds: float
        Wall time of the passes (without the final full-box insertion).
    history: list[dict]
        Per pass: its label, the band and the internal half-map FSC 0.143 resolution (Å),
        seconds since the start (seed passes: also the median change of the best
        orientations, degrees).
    """

    poses: SoftPoses
    ab_initio: AbInitio
    accumulator: HalfSetAccumulator
    seconds: float
    history: list[dict] = field(default_factory=list)


def run_ab_initio(images: torch.Tensor, half_sets: torch.Tensor, apix: float, passes: int = 3,
                  ctf: CtfParams | None = None, settings: AbInitioSettings | None = None, seed: int = 0,
                  device: torch.device | str = "cpu", interpolation: str = "trilinear",
                  callback: Callable[[str, SoftPoses, torch.Tensor], None] | None = None) -> AbInitioResult:
    """Offline map-only ab initio over a particle set held in memory.

    *Seed:* a random subset of ``settings.seed_particles`` is added, then re-posed
    at least ``settings.seed_passes - 1`` times and until the median change of the best
    orientations in a pass is at most ``settled_change_degrees`` (at most
    ``max_seed_passes`` passes in all): a thousand particles suffice for a low
    resolution map, and each pass over few particles is one cheap EM step. The seed
    stage runs ``seed_restarts`` times from other random starts; the one whose maps
    match the seed set best (mean best score at ``shared_resolution_angstrom``) is kept. *Passes:*
    the other particles are added (pass 1), then all are re-posed ``passes - 1`` times.
    Orders are random; every step goes minibatch by minibatch. (With no more particles
    than the seed subset, the seed stage alone runs, ``max(seed_passes, passes)`` times.)
    Finally the particles are inserted at their best poses into a full-box accumulator.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles [y, x], centre ``B // 2``.
    half_sets: torch.Tensor
        `(n,)` 1 or 2.
    apix: float
        Pixel size (Å).
    passes: int
        Passes over all the data after the seed stage (>= 1).
    ctf: CtfParams | None
        Per-particle CTF, or ``None``.
    settings: AbInitioSettings | None
        See :class:`AbInitioSettings`.
    seed: int
        Seed of the random start and of the particle order.
    device: torch.device | str
        Where to compute.
    interpolation: str
        Insertion of the full-box accumulator returned.
    callback: Callable[[str, SoftPoses, torch.Tensor], None] | None
        Called after each pass with its label (``"seed 2"``, ``"pass 1/3"``), the poses
        so far and the `(n,)` bool mask of particles posed so far (progress, benchmarks;
        its time counts in ``seconds``).

    Returns
    -------
    AbInitioResult
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    n, box = images.shape[0], images.shape[-1]
    halves = torch.as_tensor(half_sets).long().cpu()
    settings = settings or AbInitioSettings()
    order_generator = torch.Generator().manual_seed(seed + 1)
    poses = SoftPoses.empty(n, settings.top_k)
    seen = torch.zeros(n, dtype=torch.bool)
    history = []
    start = time.perf_counter()
    state = None

    def run(label: str, members: torch.Tensor, new: bool) -> None:
        order = members[torch.randperm(members.numel(), generator=order_generator)]
        sub_ctf = None if ctf is None else ctf[order]
        if new:
            result = state.add(images[order], halves[order], sub_ctf)
            seen[order] = True
        else:
            result = state.repose(images[order], halves[order], poses[order], sub_ctf)
        poses.set(order, result)
        history.append({"stage": label, "band_angstrom": state.resolution_angstrom,
                        "half_map_fsc_angstrom": state.half_map_resolution_angstrom,
                        "seconds": time.perf_counter() - start})
        if callback is not None:
            callback(label, poses, seen.clone())

    everyone = torch.randperm(n, generator=order_generator)
    seed_set = everyone[: min(n, settings.seed_particles)]
    seed_passes = settings.seed_passes if seed_set.numel() < n else max(settings.seed_passes, passes)
    best = None  # (mean score at the common band, state, poses of the seed set)
    for restart in range(settings.seed_restarts):
        state = AbInitio(box, apix, settings, seed=seed + 7919 * restart, device=device)
        prefix = f"restart {restart + 1}/{settings.seed_restarts} " if settings.seed_restarts > 1 else ""
        run(f"{prefix}seed 1", seed_set, new=True)
        p = 1
        while True:  # at least seed_passes, then until the poses settle (or max_seed_passes)
            before = poses.rotations[seed_set].clone()
            p += 1
            run(f"{prefix}seed {p}", seed_set, new=False)
            change = float(_rotation_angles_degrees(before, poses.rotations[seed_set]).median())
            history[-1]["median_change_degrees"] = change
            if p >= seed_passes and (change <= settings.settled_change_degrees or p >= settings.max_seed_passes):
                break
        if settings.seed_restarts > 1:  # which restart explains the seed set best, at one common band
            check = state.match(images[seed_set], halves[seed_set], None if ctf is None else ctf[seed_set],
                                resolution_angstrom=settings.shared_resolution_angstrom)
            score = float(check.scores.mean())
            history[-1]["restart_score"] = score
            if best is None or score > best[0]:
                best = (score, state, poses[seed_set])
    if settings.seed_restarts > 1:
        state = best[1]
        poses.set(seed_set, best[2])
    if seed_set.numel() < n:
        run(f"pass 1/{passes}", everyone[seed_set.numel():], new=True)
        for p in range(1, passes):
            run(f"pass {p + 1}/{passes}", everyone, new=False)
    seconds = time.perf_counter() - start
    acc = HalfSetAccumulator(box, apix, interpolation=interpolation, device=device)
    acc.add(images, poses.rotations, poses.origins_angstrom, halves, ctf=ctf)
    return AbInitioResult(poses, state, acc, seconds, history)

"""Streaming map-only ab initio (:class:`AbInitio`): minibatch EM that particles join and are re-posed in.

The method is described in the package docstring (:mod:`cryofastar.recon.ab_initio`).
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from torch_fourier_rescale import fourier_rescale_2d

from ..accumulator import HalfSetAccumulator
from ..ctf import CtfParams, ctf_rfft
from ..fourier import irfft3_centered, rfft3_centered
from ..fsc import fsc, resolution_at_threshold
from ..map_slices import MapSlicer, band_frequencies
from ..orientation_grids import global_rotation_grid, local_rotation_grid
from ..projection_matching import particle_spectra
from ..rotations import geodesic_degrees, random_rotations
from .settings import AbInitioSettings, working_box
from .soft_poses import SoftPoses

__all__ = ["AbInitio"]


def _soft_sphere(box: int, diameter_px: float, edge_px: float = 3.0) -> torch.Tensor:
    """`(B, B, B)` 1 inside ``diameter / 2``, cosine edge of ``edge_px``, 0 outside; centre ``B // 2``."""
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).sqrt()
    inner = diameter_px / 2 - edge_px
    t = ((r - inner) / edge_px).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class AbInitio:
    """Streaming map-only ab initio (module docstring): holds the internal half-set maps.

    Parameters
    ----------
    box: int
        Session box ``B`` (px) of the images passed in.
    apix: float
        Session pixel size (Å).
    settings: AbInitioSettings | None
        Schedule and search settings; what they leave ``None`` is filled in by
        :meth:`AbInitioSettings.resolved` (the particle diameter: ``DEFAULT_FILL`` of the box
        unless given; :func:`run_ab_initio` estimates it from the images).
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
        self.box, self.apix = int(box), float(apix)
        self.settings = s = (settings or AbInitioSettings()).resolved(self.box, self.apix)
        if s.final_resolution_angstrom > s.initial_resolution_angstrom:
            raise ValueError("final resolution must not be coarser than the initial one")
        self.device = torch.device(device)
        self.working_box = working_box(self.box, self.apix, s)
        self.working_apix = self.apix * self.box / self.working_box
        self.accumulator = HalfSetAccumulator(self.working_box, self.working_apix, interpolation=s.interpolation,
                                              device=self.device)
        self.grid = global_rotation_grid(s.global_step_degrees)  # (C, 3, 3) float64
        radius = int(math.floor(s.max_shift_angstrom / self.working_apix / s.shift_step_px + 1e-9))
        steps = torch.arange(-radius, radius + 1, dtype=torch.float32) * s.shift_step_px
        sy, sx = torch.meshgrid(steps, steps, indexing="ij")
        self.shifts_px = torch.stack([sx.reshape(-1), sy.reshape(-1)], -1)  # (S, 2) working px (x, y)
        mask_px = min(s.mask_diameter_fraction * self.working_box, s.mask_diameter_angstrom / self.working_apix)
        self.mask = _soft_sphere(self.working_box, mask_px).to(self.device)
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
        known = {f.name for f in fields(AbInitioSettings)}  # settings of older versions: unknown names dropped
        settings = AbInitioSettings(**{k: v for k, v in state["settings"].items() if k in known})
        out = cls(state["box"], state["apix"], settings, device=device)
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
        spread = (weights * geodesic_degrees(rot[:, :1], rot).float().square()).sum(-1).sqrt()
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

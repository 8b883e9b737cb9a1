"""Pose refinement of particle sets against half maps: the policy around projection matching.

Shared by the offline ``reconstruct --refine`` and the streaming daemon. Rules
(docs/refinement.md):

- **Working box.** Matching runs at a working box ``W`` (Fourier-cropped particles and
  maps, pixel size ``apix * B / W``); shifts are returned in Å, so they apply at any box.
- **Band.** The reference is low-passed to the current resolution (the half-map FSC
  0.143 resolution, never finer than Nyquist of the working box, never coarser than
  ``4 / W`` cycles/px), so noise beyond it is not fitted.
- **Gold standard.** In ``local`` mode each particle is matched against its *own* half
  map, so the two halves stay independent and the FSC stays a gold-standard estimate.
  ``global`` mode (a search of all SO(3)) is used only at low resolution (the band is
  capped at ``global_resolution_angstrom``, 20 Å by default) and matches against the
  map of both halves, as RELION starts both halves from one low-pass-filtered
  reference: below that resolution the halves share their information by design.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch_fourier_rescale import fourier_rescale_2d, fourier_rescale_3d

from .ctf import CtfParams, ctf_rfft
from .delocalisation import effective_ctf, fit_loss, kept_fraction
from .map_slices import MapSlicer, band_frequencies
from .orientation_grids import global_rotation_grid
from .projection_matching import PoseMatch, ctf_at_band, particle_spectra, refine_local, search_global

logger = logging.getLogger(__name__)

__all__ = ["RefineSettings", "RefinementReference", "band_limit", "images_to_working_box", "map_to_working_box"]


@dataclass(frozen=True)
class RefineSettings:
    """How particles are matched (units: degrees, Å, pixels of the working box).

    Attributes
    ----------
    working_box: int
        Box (px) particles and maps are Fourier-cropped to for matching.
    local_range_degrees, local_step_degrees: float
        First stage's search radius and step around each pose (:func:`refine_local`).
    local_stages: int
        Coarse-to-fine stages (final step ``local_step / 2^(stages-1)``).
    local_max_shift_px: int
        Shift search radius (working-box px) of the first local stage.
    global_step_degrees: float
        Grid step of the global search (about 4,400 orientations at 15°).
    global_max_shift_px: int
        Shift search radius (working-box px) of the global search.
    global_resolution_angstrom: float
        Finest resolution compared in a global search (the map of both halves).
    mean_range_degrees, mean_step_degrees: float
        Ball of the posterior-mean stage that ends every local search
        (:func:`~cryofastar.recon.projection_matching.posterior_mean_rotations`; range 0: the
        best candidate is kept). The mean lies closer to the truth than the best candidate
        when the posterior is wide (low SNR): docs/refinement.md.
    """

    working_box: int = 64
    local_range_degrees: float = 10.0
    local_step_degrees: float = 5.0
    local_stages: int = 3
    local_max_shift_px: int = 2
    global_step_degrees: float = 15.0
    global_max_shift_px: int = 4
    global_resolution_angstrom: float = 20.0
    mean_range_degrees: float = 9.0
    mean_step_degrees: float = 4.5


def images_to_working_box(images: torch.Tensor, working_box: int) -> torch.Tensor:
    """`(n, B, B)` images -> `(n, W, W)`, the same field of view at ``W`` px (2D Fourier crop/pad).

    Images and maps have their own function: `n` images of box `B` with ``n == B`` are
    still images, never a cubic map.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected (n, B, B) images, got shape {tuple(images.shape)}")
    if images.shape[-1] == working_box:
        return images.float()
    out, _ = fourier_rescale_2d(images.float(), target_shape=(working_box, working_box))
    return out.float()


def map_to_working_box(volume: torch.Tensor, working_box: int) -> torch.Tensor:
    """`(B, B, B)` map -> `(W, W, W)`, the same field of view at ``W`` px (3D Fourier crop/pad)."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a (B, B, B) map, got shape {tuple(volume.shape)}")
    if volume.shape[-1] == working_box:
        return volume.float()
    out, _ = fourier_rescale_3d(volume.float(), target_shape=(working_box,) * 3)
    return out.float()


def band_limit(resolution_angstrom: float | None, apix: float, box: int) -> float:
    """Band limit (cycles/px) for a map at ``resolution_angstrom``: within ``[4 / box, 0.5]``.

    ``None``, NaN or infinity (no resolution yet) give the coarsest band.
    """
    floor = min(0.5, 4.0 / box)
    if resolution_angstrom is None or not math.isfinite(resolution_angstrom) or resolution_angstrom <= 0:
        return floor
    return float(min(0.5, max(floor, apix / resolution_angstrom)))


class RefinementReference:
    """The half maps of one moment, at the working box, ready to match particles against.

    Slicers (padded spectra) are built on first use and kept, so many batches can be
    matched against the same maps at the cost of one build.

    Parameters
    ----------
    half_volumes: torch.Tensor
        `(2, B, B, B)` half maps [z, y, x] at pixel size ``apix`` (Å).
    apix: float
        Pixel size of the half maps (Å).
    resolution_angstrom: float | None
        Their half-map FSC 0.143 resolution (sets the local band; ``None``/inf: coarsest).
    settings: RefineSettings | None
        Search settings (defaults: :class:`RefineSettings`).
    device: torch.device | str
        Where matching runs.
    """

    def __init__(self, half_volumes: torch.Tensor, apix: float, resolution_angstrom: float | None,
                 settings: RefineSettings | None = None, device: torch.device | str = "cpu") -> None:
        self.settings = s = settings or RefineSettings()
        box = half_volumes.shape[-1]
        if half_volumes.shape != (2, box, box, box):
            raise ValueError(f"half maps must be (2, B, B, B), got {tuple(half_volumes.shape)}")
        self.box, self.apix = box, float(apix)
        self.work = min(s.working_box, box)
        self.apix_work = self.apix * box / self.work
        self.device = torch.device(device)
        self.resolution_angstrom = resolution_angstrom
        self.half_volumes = torch.stack([map_to_working_box(v, self.work)
                                         for v in half_volumes.float()]).to(self.device)
        self._local: dict[int, MapSlicer] = {}
        self._global: MapSlicer | None = None
        self.delocalisation_loss: float | None = None
        """Share of the modelled CTF delocalisation loss the particles show (0..1; ``None`` until the
        first batch with a CTF and poses was matched: :mod:`~cryofastar.recon.delocalisation`)."""

    @property
    def local_band(self) -> float:
        """Band limit (cycles/px of the working box) of local searches: the FSC resolution."""
        return band_limit(self.resolution_angstrom, self.apix_work, self.work)

    @property
    def global_band(self) -> float:
        """Band limit of global searches: the FSC resolution, capped at ``global_resolution_angstrom``."""
        r, cap = self.resolution_angstrom, self.settings.global_resolution_angstrom
        known = r is not None and math.isfinite(r) and r > 0
        return band_limit(max(cap, r) if known else cap, self.apix_work, self.work)

    def local_slicer(self, half: int) -> MapSlicer:
        """Slicer of half map ``half`` (1 or 2) at the local band."""
        if half not in self._local:
            self._local[half] = MapSlicer(self.half_volumes[half - 1], self.local_band)
        return self._local[half]

    def global_slicer(self) -> MapSlicer:
        """Slicer of the map of both halves at the global band."""
        if self._global is None:
            self._global = MapSlicer(self.half_volumes.sum(0), self.global_band)
        return self._global

    def match(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor | None,
              origins_angstrom: torch.Tensor, mode: str = "local",
              ctf: CtfParams | None = None) -> tuple[PoseMatch, torch.Tensor]:
        """Refine (``local``) or search (``global``, ``best``) the poses of particles.

        Parameters
        ----------
        images: torch.Tensor
            `(n, B, B)` particles at the maps' box and pixel size, or `(n, W, W)` already at
            the working box (:func:`images_to_working_box`).
        half_sets: torch.Tensor
            `(n,)` 1 or 2.
        rotations: torch.Tensor | None
            `(n, 3, 3)` current RELION matrices (needed for ``local`` and ``best``).
        origins_angstrom: torch.Tensor
            `(n, 2)` current rlnOriginX/YAngst.
        mode: str
            ``"local"``: coarse-to-fine search around ``rotations`` against the
            particle's own half map; ``"global"``: a search of SO(3) against the map of
            both halves (band :attr:`global_band`), then a local search around its best
            against the particle's own half map; ``"best"``: both, keeping per particle
            the pose whose final local score is higher (poses of unknown quality); ``"coarse"``: the
            global search alone (poses on its grid, about a quarter of ``global``'s cost; a first pose
            to be refined later).
        ctf: CtfParams | None
            The particles' CTF (the images contain it; the maps are CTF-corrected): each is
            matched against its CTF-modulated projections. ``None``: no CTF.

        Returns
        -------
        match, origins_angstrom: tuple[PoseMatch, torch.Tensor]
            The match (``origins_px`` in working-box px; ``spread_degrees`` of the
            global search where one ran) and `(n, 2)` float64 new rlnOriginX/YAngst.
        """
        if mode not in ("local", "global", "best", "coarse"):
            raise ValueError(f"mode must be 'local', 'global', 'best' or 'coarse', got {mode!r}")
        n = images.shape[0]
        if images.ndim != 3 or images.shape[1:] not in ((self.box, self.box), (self.work, self.work)):
            raise ValueError(f"images must be (n, {self.box}, {self.box}) or at the working box {self.work}, got "
                             f"{tuple(images.shape)}")
        if mode in ("local", "best") and (rotations is None or rotations.shape != (n, 3, 3)):
            raise ValueError(f"mode {mode!r} needs rotations (n, 3, 3)")
        small = images_to_working_box(images, self.work).to(self.device)
        if ctf is not None and len(ctf) != n:
            raise ValueError(f"{len(ctf)} CTF parameter sets for {n} images")
        origins_px = origins_angstrom.double().cpu() / self.apix_work
        halves = torch.as_tensor(half_sets).long().cpu()
        s = self.settings
        plain = None if ctf is None else ctf_rfft(ctf, self.work, self.apix_work, device=self.device)
        if plain is not None and self.delocalisation_loss is None and rotations is not None:
            self._fit_delocalisation(small, halves, rotations.double().cpu(), origins_px, ctf, plain)
        ctf_grid = None if plain is None else self._effective_ctf(ctf, plain)
        if mode == "local":
            out = self._local_per_half(small, halves, rotations.double().cpu(), origins_px, ctf_grid)
            return out, out.origins_px * self.apix_work
        found = search_global(small, self.global_slicer(), global_rotation_grid(s.global_step_degrees),
                              max_shift_px=min(s.global_max_shift_px, self.work // 2 - 1), origins_px=origins_px,
                              ctf_grid=ctf_grid)
        if plain is not None and self.delocalisation_loss is None:  # global mode: fit at the poses found
            self._fit_delocalisation(small, halves, found.rotations, found.origins_px, ctf, plain)
            ctf_grid = self._effective_ctf(ctf, plain)
        if mode == "coarse":
            return found, found.origins_px * self.apix_work
        polished = self._local_per_half(small, halves, found.rotations, found.origins_px, ctf_grid)
        polished.spread_degrees = found.spread_degrees  # the global search's uncertainty covers all of SO(3)
        if mode == "global":
            return polished, polished.origins_px * self.apix_work
        local = self._local_per_half(small, halves, rotations.double().cpu(), origins_px, ctf_grid)
        better = polished.scores > local.scores
        for name in ("rotations", "origins_px", "scores", "spread_degrees"):
            getattr(local, name)[better] = getattr(polished, name)[better]
        return local, local.origins_px * self.apix_work

    def _kept(self, ctf: CtfParams) -> torch.Tensor:
        """`(n, W, W // 2 + 1)` share of each frequency's signal the particles' box keeps (working grid)."""
        return kept_fraction(ctf, self.work, self.apix_work, self.box * self.apix, device=self.device)

    def _effective_ctf(self, ctf: CtfParams, plain: torch.Tensor) -> torch.Tensor:
        """The CTF grid ``plain`` of ``ctf`` with the fitted share of the delocalisation loss (``plain`` at 0)."""
        loss = self.delocalisation_loss or 0.0
        return plain if loss == 0 else effective_ctf(plain, self._kept(ctf), loss)

    def _fit_delocalisation(self, small: torch.Tensor, halves: torch.Tensor, rotations: torch.Tensor,
                            origins_px: torch.Tensor, ctf: CtfParams, ctf_grid: torch.Tensor,
                            most: int = 1000) -> None:
        """Set :attr:`delocalisation_loss` from (at most ``most`` of) these particles at these poses.

        Each particle's spectrum is compared with its predicted one at its pose in the *other*
        half map, at the local band (:func:`~cryofastar.recon.delocalisation.fit_loss`): its own
        half map holds its own noise at its pose, which correlates with it most where the signal
        is weakest (high frequency, much lost) and hides the loss (4CUP at SNR 0.05 from our own
        poses: 4% of the modelled loss against its own half, most of it against the other).
        """
        parts = []
        for h in (1, 2):
            members = torch.nonzero(halves == h).squeeze(-1)[: max(1, most // 2)]
            if members.numel() == 0:
                continue
            slicer = self.local_slicer(3 - h)  # the other half: a particle's own noise is not in it
            k = band_frequencies(self.work, slicer.k_max, self.device)
            where = members.to(self.device)
            spectra = particle_spectra(small[where], k, origins_px[members].double().to(self.device))
            predicted = slicer.slices(rotations[members].to(self.device)[:, None], k)[:, 0]
            predicted = predicted * ctf_at_band(ctf_grid[where], k)
            parts.append(((spectra * predicted.conj()).real, predicted.abs().square(),
                          ctf_at_band(self._kept(ctf[members]), k)))
        self.delocalisation_loss = fit_loss(*(torch.cat(p) for p in zip(*parts, strict=True)))
        logger.info("CTF delocalisation: the particles show %.0f%% of the modelled loss beyond their box",
                    100 * self.delocalisation_loss)

    def _local_per_half(self, small: torch.Tensor, halves: torch.Tensor, rotations: torch.Tensor,
                        origins_px: torch.Tensor, ctf_grid: torch.Tensor | None = None) -> PoseMatch:
        """Local search of each half's particles against that half's map (working box)."""
        n, s = small.shape[0], self.settings
        out = PoseMatch(torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64),
                        torch.empty(n), torch.empty(n))
        for h in (1, 2):
            members = torch.nonzero(halves == h).squeeze(-1)
            if members.numel() == 0:
                continue
            match = refine_local(small[members], self.local_slicer(h), rotations[members], origins_px[members],
                                 range_degrees=s.local_range_degrees, step_degrees=s.local_step_degrees,
                                 stages=s.local_stages, max_shift_px=min(s.local_max_shift_px, self.work // 2 - 1),
                                 ctf_grid=None if ctf_grid is None else ctf_grid[members.to(ctf_grid.device)],
                                 mean_range_degrees=s.mean_range_degrees, mean_step_degrees=s.mean_step_degrees)
            out.rotations[members], out.origins_px[members] = match.rotations, match.origins_px
            out.scores[members], out.spread_degrees[members] = match.scores, match.spread_degrees
        return out


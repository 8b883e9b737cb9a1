"""Running two-half-set Fourier reconstruction: insert particles, read maps.

:class:`HalfSetAccumulator` owns one accumulation grid per gold-standard half set
(see :mod:`cryofastar.recon.insertion` for the layout). ``add`` may be called
any number of times with any split of the particles: the grids only ever receive
sums, so the result does not depend on how particles were batched (up to float32
rounding). State is saved atomically so a run can resume exactly.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .ctf import CtfParams, ctf_rfft
from .fourier import phase_shift_rfft2
from .fsc import fsc, resolution_at_threshold
from .gridding import grid_to_volume
from .insertion import Interpolation, grid_shape, insert_slices
from .io.atomic import atomic_path

__all__ = ["HalfSetAccumulator"]

_STATE_VERSION = 1
# Samples per insert call: bounds the temporary memory of one scatter
# (trilinear: 8 corners x 3 channels x 4 bytes per sample) and keeps the
# temporaries cache-friendly (250k was fastest of 0.25M-8M at box 128).
_SAMPLES_PER_CALL = 250_000


class HalfSetAccumulator:
    """Fourier-space data and weight grids for two half sets, updated incrementally.

    Parameters
    ----------
    box: int
        Particle box ``B`` in pixels (the map is ``B^3``).
    apix: float
        Pixel size in Å.
    oversampling: int
        Grid oversampling (RELION's padding factor); images are zero-padded to
        ``N = oversampling * B`` before their FFT.
    interpolation: Interpolation
        ``"trilinear"`` (more accurate) or ``"nearest"`` (about 8x faster).
    min_weight: float
        Floor of the weight in the regularised division (particle-equivalents).
    device: torch.device | str
        Where the grids live and insertion runs.
    """

    def __init__(
        self,
        box: int,
        apix: float,
        oversampling: int = 2,
        interpolation: Interpolation = "trilinear",
        min_weight: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if box < 8:
            raise ValueError(f"box must be at least 8 px, got {box}")
        if not apix > 0:
            raise ValueError(f"pixel size must be positive, got {apix}")
        if interpolation not in ("trilinear", "nearest"):
            raise ValueError(f"interpolation must be 'trilinear' or 'nearest', got {interpolation!r}")
        if oversampling < 1:
            raise ValueError(f"oversampling must be >= 1, got {oversampling}")
        self.box = int(box)
        self.apix = float(apix)
        self.oversampling = int(oversampling)
        self.interpolation: Interpolation = interpolation
        self.min_weight = float(min_weight)
        self.device = torch.device(device)
        self.size = self.box * self.oversampling
        self.grids = torch.zeros((2, *grid_shape(self.size)), device=self.device)
        self.particle_counts = torch.zeros(2, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"HalfSetAccumulator(box={self.box}, apix={self.apix}, "
            f"oversampling={self.oversampling}, interpolation={self.interpolation!r}, "
            f"particles={self.particle_counts.tolist()})"
        )

    @property
    def n_particles(self) -> int:
        """Particles inserted so far, both halves."""
        return int(self.particle_counts.sum())

    # ------------------------------------------------------------------ insertion
    def add(
        self,
        images: torch.Tensor,
        rotations: torch.Tensor,
        shifts_angstrom: torch.Tensor,
        half_sets: torch.Tensor,
        ctf: CtfParams | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Insert particles into their half set's grid.

        Parameters
        ----------
        images: torch.Tensor
            `(n, B, B)` real particle images [y, x], centre at ``B // 2``.
        rotations: torch.Tensor
            `(n, 3, 3)` RELION matrices ``A`` (see :mod:`cryofastar.recon.euler`).
        shifts_angstrom: torch.Tensor
            `(n, 2)` rlnOriginXAngst, rlnOriginYAngst: the shift that re-centres
            each particle (applied to the image before insertion).
        half_sets: torch.Tensor
            `(n,)` 1 or 2 per particle (:mod:`cryofastar.recon.half_sets`).
        ctf: CtfParams | None
            Per-particle CTF: insert ``CTF * F`` with weight ``CTF^2``
            (Wiener-style). ``None``: plain insertion, weight 1.
        weights: torch.Tensor | None
            `(n,)` non-negative per-particle weights: data and weight channels of a
            particle are both scaled by its weight (soft assignment inserts one
            particle at several poses whose weights sum to 1). ``None``: 1 each.
            ``particle_counts`` still counts particles (one per row), whatever the weight.

        Raises
        ------
        ValueError
            On inconsistent shapes, non-finite values or half sets not in {1, 2};
            the grids are untouched.

        Notes
        -----
        On a multi-core CPU the two halves are inserted by two threads at once and
        torch's intra-op thread count is set to 1 for the duration of the call
        (restored afterwards), which affects torch work running concurrently in
        other threads of the process.
        """
        self._insert(images, rotations, shifts_angstrom, half_sets, ctf, sign=1.0, weights=weights)

    def remove(
        self,
        images: torch.Tensor,
        rotations: torch.Tensor,
        shifts_angstrom: torch.Tensor,
        half_sets: torch.Tensor,
        ctf: CtfParams | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Take out particles inserted earlier with exactly these images, poses, half sets, CTF and weights.

        The grids only ever hold sums, so subtracting a particle's contribution leaves
        them as if it had never been added (up to float32 rounding). Arguments and
        errors as for :meth:`add`; re-posing a particle is ``remove`` with its old pose,
        then :meth:`add` with the new one.
        """
        self._insert(images, rotations, shifts_angstrom, half_sets, ctf, sign=-1.0, weights=weights)

    def _insert(self, images: torch.Tensor, rotations: torch.Tensor, shifts_angstrom: torch.Tensor,
                half_sets: torch.Tensor, ctf: CtfParams | None, sign: float,
                weights: torch.Tensor | None = None) -> None:
        images = torch.as_tensor(images)
        n = images.shape[0] if images.ndim == 3 else -1
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"images must be (n, {self.box}, {self.box}), got {tuple(images.shape)}")
        rotations = torch.as_tensor(rotations)
        shifts_angstrom = torch.as_tensor(shifts_angstrom)
        half_sets = torch.as_tensor(half_sets)
        if rotations.shape != (n, 3, 3) or shifts_angstrom.shape != (n, 2) or half_sets.shape != (n,):
            raise ValueError(
                f"for {n} images expected rotations (n, 3, 3), shifts (n, 2), half sets (n,); got "
                f"{tuple(rotations.shape)}, {tuple(shifts_angstrom.shape)}, {tuple(half_sets.shape)}"
            )
        if ctf is not None and len(ctf) != n:
            raise ValueError(f"{len(ctf)} CTF parameter sets for {n} images")
        if not bool(((half_sets == 1) | (half_sets == 2)).all()):
            raise ValueError("half sets must be 1 or 2")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.shape != (n,):
                raise ValueError(f"for {n} images expected weights (n,), got {tuple(weights.shape)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("weights must be finite and non-negative")
        for name, t in (("images", images), ("rotations", rotations), ("shifts", shifts_angstrom)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contain NaN or Inf")
        if n == 0:
            return

        halves = half_sets.long().cpu()
        counts = torch.bincount(halves - 1, minlength=2)
        jobs = [(h, torch.nonzero(halves == h + 1).squeeze(-1)) for h in (0, 1) if counts[h] > 0]
        per_call = max(1, _SAMPLES_PER_CALL // (self.size * (self.size // 2 + 1)))

        def insert_half(job: tuple[int, torch.Tensor]) -> None:
            h, members = job
            for start in range(0, members.numel(), per_call):
                part = members[start : start + per_call]
                slices, sample_weights = self._prepare(
                    images[part], shifts_angstrom[part], None if ctf is None else ctf[part]
                )
                scale = None if weights is None else weights[part].to(self.device)[:, None, None]
                if sign < 0:  # removal: negative data and weight
                    scale = torch.full((part.numel(), 1, 1), -1.0, device=self.device) if scale is None else -scale
                if scale is not None:
                    slices = slices * scale
                    sample_weights = (scale.expand(slices.shape) if sample_weights is None
                                      else sample_weights * scale)
                insert_slices(
                    self.grids[h], slices, rotations[part].to(self.device),
                    slice_weights=sample_weights, interpolation=self.interpolation,
                )

        # On a multi-core CPU the two halves (disjoint grids) are inserted by two
        # threads at once, each running torch single-threaded: the scatter at the
        # heart of insertion is serial, so this uses the cores better than
        # intra-op threads (measured ~1.6x at box 128 on 2 cores). The intra-op
        # thread count is restored afterwards.
        threads = torch.get_num_threads()
        if len(jobs) == 2 and self.device.type == "cpu" and threads > 1:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=2) as pool:
                    list(pool.map(insert_half, jobs))
            finally:
                torch.set_num_threads(threads)
        else:
            for job in jobs:
                insert_half(job)
        self.particle_counts += counts if sign > 0 else -counts

    def _prepare(
        self, images: torch.Tensor, shifts_angstrom: torch.Tensor, ctf: CtfParams | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pad, transform, re-centre and CTF-weight images for insertion.

        Returns `(n, N, N // 2 + 1)` complex slices and `(n, N, N // 2 + 1)`
        CTF^2 weights (``None`` without CTF).
        """
        images = images.to(self.device, torch.float32)
        # Zero-padding to N and centring: torch pads at the end (image centre
        # B//2 lands at index B//2 of the padded array), so moving the centre to
        # index 0 is a phase ramp of -B//2 px, folded into the re-centring shift.
        # Identical to rfft2_centered(pad(images)) without materialising the pad.
        slices = torch.fft.rfftn(images, s=(self.size, self.size), dim=(-2, -1))
        shifts_px = shifts_angstrom.to(self.device, torch.float64) / self.apix - self.box // 2
        slices = phase_shift_rfft2(slices, shifts_px, self.size)
        if ctf is None:
            return slices, None
        c = ctf_rfft(ctf, self.size, self.apix, device=self.device)
        return slices * c, c * c

    # ------------------------------------------------------------------ read-out
    def half_volumes(self) -> torch.Tensor:
        """`(2, B, B, B)` float32 half maps [z, y, x] (see :func:`grid_to_volume`)."""
        return torch.stack([self._volume_of(self.grids[h]) for h in (0, 1)])

    def volume(self) -> torch.Tensor:
        """`(B, B, B)` float32 map from both half sets together."""
        return self._volume_of(self.grids[0] + self.grids[1])

    def _volume_of(self, grid: torch.Tensor) -> torch.Tensor:
        return grid_to_volume(grid, self.box, self.interpolation, self.min_weight)

    def half_map_fsc(self) -> torch.Tensor:
        """`(B // 2 + 1,)` FSC between the two half maps (see :mod:`~cryofastar.recon.fsc`)."""
        half1, half2 = self.half_volumes()
        return fsc(half1, half2)

    def resolution_angstrom(self, threshold: float = 0.143) -> float:
        """Gold-standard resolution in Å (half-map FSC at ``threshold``)."""
        return resolution_at_threshold(self.half_map_fsc(), self.apix, threshold)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume exactly (grids are not copied)."""
        return {
            "version": _STATE_VERSION,
            "box": self.box,
            "apix": self.apix,
            "oversampling": self.oversampling,
            "interpolation": self.interpolation,
            "min_weight": self.min_weight,
            "grids": self.grids,
            "particle_counts": self.particle_counts,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state atomically: to a temporary file beside ``path``, then rename."""
        state = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> HalfSetAccumulator:
        """Restore an accumulator written by :meth:`save`."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
            raise ValueError(f"{path}: not a readable accumulator state ({exc})") from exc
        try:
            return cls.from_state_dict(state, device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_state_dict(cls, state: dict[str, object], device: torch.device | str = "cpu") -> HalfSetAccumulator:
        """Restore an accumulator from :meth:`state_dict` (ValueError if it does not fit)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not an accumulator state of version {_STATE_VERSION}")
        acc = cls(
            box=state["box"], apix=state["apix"], oversampling=state["oversampling"],
            interpolation=state["interpolation"], min_weight=state["min_weight"], device=device,
        )
        if tuple(state["grids"].shape) != tuple(acc.grids.shape):
            raise ValueError(f"grid shape {tuple(state['grids'].shape)} does not match its box")
        acc.grids.copy_(state["grids"])
        acc.particle_counts.copy_(state["particle_counts"])
        return acc

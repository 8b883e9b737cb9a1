"""Streaming reference-free 2D classification: particles in, class averages out, refined as they come.

:class:`StreamingClassifier` holds ``K`` classes as exact sums (:mod:`.class_sums`) and,
for every particle it has seen, what that particle added: up to ``keep`` (class,
weight, in-plane rotation, displacement) entries. Two operations change the classes:

* :meth:`StreamingClassifier.add`: new particles. Until the classes exist (the first
  ``init_particles`` of a session) each is put in a random class at a random rotation,
  which makes the random-subset averages RELION and cryoSPARC start from; afterwards
  each is aligned (:mod:`.inplane_search`) and added with its posterior weights.
* :meth:`StreamingClassifier.realign`: particles seen before are aligned again to the
  current references; what they added is removed exactly and the new assignment added
  (the same exact remove + add as the 3D accumulator's re-posing). Which particles are
  due is :meth:`StreamingClassifier.due` (never aligned first, then least recently).

This is incremental EM (soft assignment, a per-ring noise model from the residuals) with
a **uniform class prior**: with RELION's prior (each class weighted by its share) the
large classes drew ever more particles at SNR 0.1 until a few blurred classes held
every view (measured on held-out molecules: in-plane error median 18° with the prior,
2.7° without; bench/bench_classify.py): every call leaves the sums equal to the sum of what the current assignments
contribute. After each call the references are rebuilt (:mod:`.references`): Wiener
averages with each class's own FRC-based SSNR, masked with the particle's disc, a
polar search out to the best class resolution (never beyond ``B / 2 - 1``), centred
(each class's sums and its members' displacements move together, exactly), and classes
that hold almost nothing are re-seeded from a half set of the largest class.

The search per batch is coarse-to-fine: at low resolution every class, new particles
over every shift within ``max_shift_px`` on a 2-pixel lattice, re-aligned ones at their
last shift; then at full resolution the 3x3 1-pixel neighbourhood of that shift against
the :data:`CANDIDATE_CLASSES` classes that scored best (the others' posterior is taken
as 0). Rotations are searched exhaustively (FFT along
the angle), refined to a fraction of a step by a parabola.

Particles of a box larger than :data:`WORKING_BOX` are Fourier-cropped to it on the way
in (the field of view kept, the pixel size grown by ``B / W``): the search stops at ring
:data:`MAX_SEARCH_RADIUS` anyway, and the class sums then end at ring ``W / 2``
(``B * apix / 32`` Å), so a session of box 128 or 256 costs what one of box 64 costs.
Inside the classifier ``box`` and ``apix`` are the working ones; displacements are in
working pixels (``shift * apix`` is Å whatever the particle box). :mod:`.class_set` pads the
averages back to the particle box.

Poses follow RELION's Class2D meaning (docs/conventions.md, "2D alignment"): the
particle is its class average transformed like a 3D projection at pose ``(0, 0, psi)``
and displaced by ``d = -origin`` pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch_fourier_rescale import fourier_rescale_2d

from ..ctf import CtfParams, ctf_at
from ..fourier import irfft2_centered, rfft2_centered
from .class_delta import ClassDelta, ClassReferences, NoiseResidual
from .class_sums import ClassSums
from .fourier_sampling import PaddedSpectra, padded_spectra
from .inplane_search import PolarGrid, PolarReferences, polar_samples, score_alignments, shift_disc
from .references import (
    centre_of_mass,
    class_averages,
    class_frc,
    frc_resolution,
    soft_circular_mask,
    weighted_median,
)

__all__ = ["ClassifierSettings", "StreamingClassifier"]

_NEIGHBOURHOOD = shift_disc(1.5)  # the 3x3 1-pixel neighbourhood, (0, 0) first
COARSE_RADIUS = 8
"""Outermost ring of the low-resolution search (Fourier pixels): shifts on a 2-pixel lattice and every class."""
CANDIDATE_CLASSES = 16
"""Classes each particle is searched against at full resolution: its best at low resolution."""
MAX_SEARCH_RADIUS = 20
"""Outermost ring of the search (Fourier pixels, ``B * apix / 20`` Å): 128 angles suffice. The class sums keep
every frequency of the working box; only the alignment stops there (its cost grows as the square of the radius)."""
WORKING_BOX = 64
"""The largest box the classifier works at (pixels, module docstring): its Nyquist ring, 32, is 1.6 times the
search's, so the class FRC can still see the classes sharpen beyond what the search uses."""


@dataclass(frozen=True)
class ClassifierSettings:
    """What a 2D classification is asked to do (see the module docstring for the roles).

    Attributes
    ----------
    n_classes: int
        ``K``.
    diameter_angstrom: float
        The particle's diameter (the mask; the centring window).
    max_shift_px: float
        Largest displacement searched for a new particle, pixels of the particles (not of the working box).
    initial_lowpass_angstrom: float
        Resolution of the first searches (Å).
    keep: int
        Classes a particle may contribute to (its most probable ones).
    min_weight: float
        Posterior weights below this are dropped (then the rest renormalised).
    init_particles: int
        Particles placed at random to start the classes (default ``20 K``).
    reseed_fraction: float
        A class with less than this fraction of an even share is re-seeded.
    noise_memory: float
        Particles over which the noise model averages (an exponential window).
    batch: int
        Particles per search (bounds memory: about ``batch x S x K x A`` floats).
    seed: int
        Seed of the random start and re-seeding.
    """

    n_classes: int = 50
    diameter_angstrom: float = 150.0
    max_shift_px: float = 6.0
    initial_lowpass_angstrom: float = 25.0
    keep: int = 3
    min_weight: float = 0.01
    init_particles: int | None = None
    reseed_fraction: float = 0.2
    noise_memory: float = 5000.0
    batch: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise ValueError(f"the number of classes must be at least 1, got {self.n_classes}")
        if not (self.diameter_angstrom > 0 and math.isfinite(self.diameter_angstrom)):
            raise ValueError(f"the particle diameter must be a positive number of Å, got {self.diameter_angstrom}")
        if not self.max_shift_px >= 0:
            raise ValueError(f"the largest shift must be >= 0 pixels, got {self.max_shift_px}")
        if not self.initial_lowpass_angstrom > 0:
            raise ValueError(f"the initial low-pass must be positive, got {self.initial_lowpass_angstrom} Å")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, got {self.keep}")

    @property
    def start_particles(self) -> int:
        """Particles placed at random before any alignment."""
        return self.init_particles if self.init_particles is not None else 20 * self.n_classes


class _Grow:
    """A dense per-particle table that grows by doubling: the rows are particle indices."""

    def __init__(self, keep: int) -> None:
        self.n = 0
        self.keep = keep
        self._alloc(1024)

    # name: (columns per particle, with ``keep`` for one per kept class; dtype; fill)
    FIELDS = {
        "classes": (("keep",), np.int64, -1),
        "weights": (("keep",), np.float64, 0.0),
        "psi": (("keep",), np.float64, 0.0),
        "shifts": (("keep", 2), np.float64, 0.0),
        "halves": ((), np.int64, 1),
        "max_prob": ((), np.float64, 0.0),
        "psi_sigma": ((), np.float64, np.nan),
        "aligned_at": ((), np.int64, -1),
    }

    def _alloc(self, capacity: int) -> None:
        for name, (columns, dtype, fill) in self.FIELDS.items():
            shape = (capacity, *(self.keep if c == "keep" else c for c in columns))
            new = np.full(shape, fill, dtype)
            if hasattr(self, name):
                new[: self.n] = getattr(self, name)[: self.n]
            setattr(self, name, new)
        self.capacity = capacity

    def extend(self, count: int) -> np.ndarray:
        if self.n + count > self.capacity:
            self._alloc(max(2 * self.capacity, self.n + count))
        rows = np.arange(self.n, self.n + count)
        self.n += count
        return rows

    def state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name)[: self.n].copy() for name in self.FIELDS}

    def load(self, state: dict[str, np.ndarray]) -> None:
        n = int(state["classes"].shape[0])
        self.n = 0
        self._alloc(max(1024, n))
        self.n = n
        for name in self.FIELDS:
            getattr(self, name)[:n] = state[name]


class StreamingClassifier:
    """``K`` 2D classes of a session's particles (module docstring).

    Parameters
    ----------
    settings: ClassifierSettings
        Classes, mask, search ranges.
    box: int
        Particle side ``B`` in pixels (even).
    apix: float
        Pixel size in Å.

    Attributes
    ----------
    particle_box, particle_apix:
        ``B`` and the particles' pixel size (what :meth:`add` takes).
    box, apix:
        The working box ``W = min(B, WORKING_BOX)`` and its pixel size ``apix * B / W`` (module docstring).
    """

    def __init__(self, settings: ClassifierSettings, box: int, apix: float) -> None:
        if box < 16 or box % 2:
            raise ValueError(f"the particle box must be an even number of pixels >= 16, got {box}")
        if not apix > 0:
            raise ValueError(f"the pixel size must be positive, got {apix}")
        self.settings = settings
        self.particle_box = box
        self.particle_apix = float(apix)
        self.box = min(box, WORKING_BOX)
        self.apix = self.particle_apix * box / self.box
        self.max_shift_px = settings.max_shift_px * self.box / box  # working pixels
        self.sums = ClassSums(settings.n_classes, self.box, self.apix)
        self.table = _Grow(settings.keep)
        self.rng = np.random.default_rng(settings.seed)
        self.version = 0  # increments with every rebuild of the references
        self.steps = 0  # alignment calls so far (the clock of ``aligned_at``)
        self.offsets_px = torch.zeros(settings.n_classes, 2, dtype=torch.float64)  # total centring moves (information)
        diameter_px = settings.diameter_angstrom / self.apix
        self.mask = soft_circular_mask(self.box, min(diameter_px, self.box - 2.0), edge_px=max(2.0, 0.05 * self.box))
        self.noise = torch.zeros(self.box // 2 + 1, dtype=torch.float64)  # sigma2 per ring (polar-sample units)
        self.noise_mass = 0.0
        self.r_max = self._radius(settings.initial_lowpass_angstrom)
        self.frc = torch.zeros(settings.n_classes, self.box // 2 + 1, dtype=torch.float64)
        self.resolution = torch.full((settings.n_classes,), math.inf, dtype=torch.float64)
        self.reference_images = torch.zeros(settings.n_classes, self.box, self.box)
        self.seeds: dict[int, torch.Tensor] = {}
        self.start_at = settings.start_particles  # particles placed at random before any alignment
        self._polar: dict[PolarGrid, PolarReferences] = {}
        self.follower = False  # aligns against another classifier's references (:meth:`adopt`)
        self._residuals: list[NoiseResidual] = []  # a follower's, since its last hand-over

    # ------------------------------------------------------------------ geometry
    def _radius(self, angstrom: float) -> int:
        return int(min(self.box // 2 - 1, max(3, math.floor(self.box * self.apix / angstrom))))

    @property
    def n_particles(self) -> int:
        """Particles the classifier holds."""
        return self.table.n

    @property
    def started(self) -> bool:
        """Whether the random start is complete (the references mean something)."""
        return self.table.n >= self.start_at

    def begin(self) -> None:
        """End the random start now, with the particles held so far (a session smaller than ``init_particles``)."""
        if self.table.n and not self.started:
            self.start_at = self.table.n
            self._rebuild()

    # ------------------------------------------------------------------ public operations
    def add(self, images: torch.Tensor, ctf: CtfParams | None = None, halves: torch.Tensor | None = None) -> np.ndarray:
        """Classify new particles; returns their indices (``0, 1, ...`` in the order they came).

        Parameters
        ----------
        images: torch.Tensor
            `(n, B, B)` float32 particle images [y, x], every pixel finite.
        ctf: CtfParams | None
            Their CTF (``None``: no CTF).
        halves: torch.Tensor | None
            `(n,)` half set of each, 1 or 2 (default: alternating by index).
        """
        self._check(images, ctf)
        images = self._to_working(images)
        n = images.shape[0]
        rows = self.table.extend(n)
        self.table.halves[rows] = (rows % 2 + 1) if halves is None else halves.numpy().astype(np.int64)
        start_left = max(0, self.start_at - int(rows[0]))
        if self.noise_mass == 0:
            self._init_noise(images)
        random_rows = rows[:start_left]
        if len(random_rows):
            for lo in range(0, len(random_rows), self.settings.batch):
                part = slice(lo, min(lo + self.settings.batch, len(random_rows)))
                self._place_at_random(padded_spectra(images[part]), rows[part], None if ctf is None else ctf[part])
            self._rebuild()
        for lo in range(len(random_rows), n, self.settings.batch):
            part = slice(lo, min(lo + self.settings.batch, n))
            self._align(padded_spectra(images[part]), rows[part], None if ctf is None else ctf[part], previous=None)
        if not self.follower:  # a follower's references are the lead's (:meth:`adopt`)
            self._rebuild()
        return rows

    def realign(self, rows: np.ndarray, images: torch.Tensor, ctf: CtfParams | None = None) -> None:
        """Align particles seen before again: their contributions are removed exactly and re-added.

        Parameters
        ----------
        rows: np.ndarray
            `(n,)` indices returned by :meth:`add`.
        images, ctf:
            The same images and CTF as when they were added (read again from their files).
        """
        rows = np.asarray(rows, dtype=np.int64)
        self._check(images, ctf)
        if rows.shape[0] != images.shape[0]:
            raise ValueError(f"{rows.shape[0]} particle indices for {images.shape[0]} images")
        if rows.size and (rows.min() < 0 or rows.max() >= self.table.n):
            raise ValueError(f"particle indices must be within 0..{self.table.n - 1}")
        images = self._to_working(images)
        previous = self.table.shifts[rows, 0].copy() if self.started else None
        if previous is not None:
            previous[self.table.aligned_at[rows] < 0] = np.nan
        for lo in range(0, rows.shape[0], self.settings.batch):
            part = slice(lo, lo + self.settings.batch)
            spectra = padded_spectra(images[part])
            part_ctf = None if ctf is None else ctf[part]
            self._contribute(spectra, rows[part], part_ctf, sign=-1.0)
            self._align(spectra, rows[part], part_ctf, previous=None if previous is None else previous[part])
        self._rebuild()

    def due(self, count: int) -> np.ndarray:
        """Up to ``count`` particle indices most in need of re-alignment (never aligned, then oldest)."""
        if not self.started or count <= 0:
            return np.zeros(0, dtype=np.int64)
        when = self.table.aligned_at[: self.table.n]
        order = np.argsort(when, kind="stable")
        return order[:count].astype(np.int64)

    # ------------------------------------------------------------------ lead and followers (class_delta.py)
    def references(self) -> ClassReferences:
        """The classes as they are, for followers to align new particles against (:mod:`.class_delta`).

        Raises
        ------
        ValueError
            The random start is not complete (the references mean nothing yet).
        """
        if not self.started:
            raise ValueError("the classes have not started: nothing to align against yet")
        return ClassReferences(self.settings, self.particle_box, self.particle_apix, self.version,
                               self.reference_images.clone(), self.noise.clone(), self.noise_mass, self.r_max,
                               self.offsets_px.clone())

    def adopt(self, references: ClassReferences) -> None:
        """Follow the lead's ``references`` from now on: :meth:`add` aligns against them (and rebuilds nothing);
        what this classifier holds moves to their frame.

        Raises
        ------
        ValueError
            References of another box, pixel size or number of classes.
        """
        k = self.settings.n_classes
        if (references.box, references.images.shape) != (self.particle_box, (k, self.box, self.box)) or \
                abs(references.apix - self.particle_apix) > 1e-6 * self.particle_apix:
            raise ValueError(f"references of box {references.box} at {references.apix} Å/px and shape "
                             f"{tuple(references.images.shape)} cannot be followed by a classifier of box "
                             f"{self.particle_box} at {self.particle_apix} Å/px with {k} classes")
        self._move_classes(references.offsets_px - self.offsets_px)
        self.offsets_px = references.offsets_px.clone()
        self.follower = True
        self.start_at = 0
        self.reference_images = references.images.clone()
        self.noise = references.noise.clone()
        self.noise_mass = references.noise_mass
        self.r_max = references.r_max
        self.version = references.version
        self._polar = {}

    def hand_over(self, with_sums: bool = True) -> ClassDelta:
        """A follower's additions since its last hand-over (then it holds none). ``with_sums=False``: the sums
        are left out of the delta (the caller sends :attr:`sums` by a collective, then calls :meth:`clear`)."""
        if not self.follower:
            raise ValueError("only a follower hands over what it added (adopt() references first)")
        delta = ClassDelta(self.table.state(), self.sums.state_dict() if with_sums else None,
                           list(self._residuals), self.offsets_px.clone())
        self.clear(sums=with_sums)
        return delta

    def clear(self, sums: bool = True) -> None:
        """A follower holds no row again (its table and residuals emptied) and, with ``sums``, no sums."""
        self.table = _Grow(self.settings.keep)
        self._residuals = []
        if sums:
            for tensor in self.sums.tensors():
                tensor.zero_()

    def take(self, delta: ClassDelta) -> np.ndarray:
        """Add what followers aligned (:mod:`.class_delta`): their rows (returned, in order), sums and noise
        residuals, moved from the delta's frame to this classifier's; then the references are rebuilt.

        Raises
        ------
        ValueError
            A delta without sums, or whose sums or frame do not fit.
        """
        if delta.sums is None:
            raise ValueError("a class delta without its sums cannot be taken")
        sums = ClassSums(self.settings.n_classes, self.box, self.apix)
        sums.load_state_dict(delta.sums)
        if delta.offsets_px.shape != self.offsets_px.shape:
            raise ValueError(f"a class delta in a frame of shape {tuple(delta.offsets_px.shape)} for "
                             f"{self.settings.n_classes} classes")
        move = self.offsets_px - delta.offsets_px
        entries = dict(delta.table)  # written into the table below (a copy); shifts replaced when moved
        if bool((move != 0).any()):
            sums.shift_classes(move)
            entries["shifts"] = _moved_shifts(entries["classes"], entries["psi"], entries["shifts"], move)
        rows = self.table.extend(len(delta))
        for name, values in entries.items():
            getattr(self.table, name)[rows] = values
        self.table.aligned_at[rows] = self.steps
        self.steps += 1
        for mine, theirs in zip(self.sums.tensors(), sums.tensors(), strict=True):
            mine += theirs
        for residual in delta.noise:
            self._fold_noise(residual)
        self._rebuild()
        return rows

    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume exactly (tensors and numpy arrays; ``torch.save``-able)."""
        return {
            "version": 1, "box": self.particle_box, "apix": self.particle_apix, "working_box": self.box,
            "n_classes": self.settings.n_classes,
            "sums": self.sums.state_dict(), "table": self.table.state(), "rng": self.rng.bit_generator.state,
            "reference_version": self.version, "steps": self.steps, "offsets_px": self.offsets_px.clone(),
            "noise": self.noise.clone(), "noise_mass": self.noise_mass, "r_max": self.r_max,
            "seeds": {k: v.clone() for k, v in self.seeds.items()}, "start_at": self.start_at,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Resume from :meth:`state_dict` (the same settings, box and pixel size).

        Raises
        ------
        ValueError
            A state of another box, pixel size or number of classes.
        """
        if (state["box"], state["n_classes"]) != (self.particle_box, self.settings.n_classes) or \
                abs(float(state["apix"]) - self.particle_apix) > 1e-6 * self.particle_apix:
            raise ValueError(f"a classifier state of box {state['box']}, {state['apix']} Å/px, {state['n_classes']} "
                             f"classes cannot resume one of box {self.particle_box}, {self.particle_apix} Å/px, "
                             f"{self.settings.n_classes} classes")
        working = int(state.get("working_box", state["box"]))
        if working != self.box:
            raise ValueError(f"a classifier state made at a working box of {working} px (another version) cannot "
                             f"resume one that works at {self.box} px: classify again")
        self.sums.load_state_dict(state["sums"])
        self.table.load(state["table"])
        self.rng.bit_generator.state = state["rng"]
        self.steps = int(state["steps"])
        self.offsets_px = state["offsets_px"].clone()
        self.noise = state["noise"].clone()
        self.noise_mass = float(state["noise_mass"])
        self.r_max = int(state["r_max"])
        self.seeds = {int(k): v.clone() for k, v in state["seeds"].items()}
        self.start_at = int(state["start_at"])
        self._rebuild(update=False)
        self.version = int(state["reference_version"])

    # ------------------------------------------------------------------ internals
    def _check(self, images: torch.Tensor, ctf: CtfParams | None) -> None:
        b = self.particle_box
        if images.ndim != 3 or images.shape[1:] != (b, b):
            raise ValueError(f"images must be (n, {b}, {b}), got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images with NaN or infinite pixels cannot be classified")
        if ctf is not None and len(ctf) != images.shape[0]:
            raise ValueError(f"{len(ctf)} CTF parameter sets for {images.shape[0]} images")

    def _to_working(self, images: torch.Tensor) -> torch.Tensor:
        """`(n, B, B)` particle images -> `(n, W, W)` float32, Fourier-cropped when ``W < B`` (module docstring)."""
        images = images.to(torch.float32)
        if self.box == self.particle_box:
            return images
        return fourier_rescale_2d(images, target_shape=(self.box, self.box))[0].to(torch.float32)

    def _init_noise(self, images: torch.Tensor) -> None:
        """First noise model: the particles' own power per ring (signal included, so it starts cautious)."""
        power = rfft2_centered(images.to(torch.float32)).abs().square()
        self.noise = self.sums.ring_mean(power).mean(0).clamp(min=1e-12)
        self.noise_mass = float(images.shape[0])

    def _place_at_random(self, spectra: PaddedSpectra, rows: np.ndarray, ctf: CtfParams | None) -> None:
        t = self.table
        t.classes[rows] = -1
        t.weights[rows] = 0
        t.classes[rows, 0] = self.rng.integers(0, self.settings.n_classes, len(rows))
        t.weights[rows, 0] = 1.0
        t.psi[rows, 0] = self.rng.uniform(0, 360, len(rows))
        t.shifts[rows, 0] = 0
        t.max_prob[rows] = 1.0 / self.settings.n_classes
        self._contribute(spectra, rows, ctf, sign=1.0)

    def _contribute(self, spectra: PaddedSpectra, rows: np.ndarray, ctf: CtfParams | None, sign: float) -> None:
        """Add (or remove) what the particles' table entries say they contribute (``spectra[i]`` is ``rows[i]``)."""
        t = self.table
        for slot in range(t.keep):
            present = t.classes[rows, slot] >= 0
            if not present.any():
                continue
            r = rows[present]
            terms = self.sums.contributions(
                spectra, torch.from_numpy(present), None if ctf is None else ctf[torch.from_numpy(present)],
                torch.from_numpy(t.psi[rows, slot]), torch.from_numpy(t.shifts[rows, slot]))
            self.sums.add(torch.from_numpy(t.classes[r, slot]), torch.from_numpy(t.halves[r]),
                          torch.from_numpy(t.weights[r, slot]), terms, sign=sign)

    def _grid(self, r_max: int) -> PolarGrid:
        return PolarGrid.for_radius(r_max)

    def _polar_references(self, grid: PolarGrid) -> PolarReferences:
        if grid not in self._polar:
            self._polar[grid] = PolarReferences.of(polar_samples(padded_spectra(self.reference_images), grid))
        return self._polar[grid]

    def _ring_weight(self, grid: PolarGrid) -> torch.Tensor:
        r = grid.radii.to(torch.float64)
        sigma2 = self.noise[grid.r_min: grid.r_max + 1]
        return (math.pi * r / (grid.n_angles * sigma2)).to(torch.float32)

    def _search(self, spectra: PaddedSpectra, ctf: CtfParams | None, shifts: torch.Tensor, grid: PolarGrid,
                which: np.ndarray | None = None, classes: torch.Tensor | None = None):
        """Scores of ``spectra`` (or its rows ``which``) over ``shifts`` x classes x rotations."""
        index = None if which is None else torch.from_numpy(which)
        particles = polar_samples(spectra, grid, index)
        ctf_polar = None
        if ctf is not None:
            freq = grid.frequencies / (self.box * self.apix)  # 1/Å
            part_ctf = ctf if index is None else ctf[index]
            ctf_polar = ctf_at(part_ctf, freq.expand(particles.shape[0], *freq.shape))
        result = score_alignments(particles, ctf_polar, shifts, self._polar_references(grid),
                                  self._ring_weight(grid), grid, self.box, classes)
        return result, particles, ctf_polar

    def _align(self, spectra: PaddedSpectra, rows: np.ndarray, ctf: CtfParams | None,
               previous: np.ndarray | None) -> None:
        """Search one batch (``spectra[i]`` is ``rows[i]``), write its table entries and add its contributions.

        ``previous``: `(n, 2)` each particle's last displacement (NaN: never aligned: a full search).
        """
        s = self.settings
        fine = self._grid(self.r_max)
        coarse = self._grid(min(self.r_max, COARSE_RADIUS))
        n = len(rows)
        centre = torch.zeros(n, 2)
        known = np.zeros(n, dtype=bool)
        if previous is not None:
            known = np.isfinite(previous[:, 0])
            centre[torch.from_numpy(known)] = torch.from_numpy(previous[known]).to(torch.float32)
        # coarse, at low resolution: every class; new particles over the shift lattice, others at their last shift
        class_scores = torch.empty(n, s.n_classes)
        for subset, shifts in ((~known, None), (known, "previous")):
            if not subset.any():
                continue
            idx = np.nonzero(subset)[0]
            which = None if subset.all() else idx
            if shifts is None:
                lattice = shift_disc(self.max_shift_px, step=2.0 if self.max_shift_px >= 2 else 1.0)
                result, _, _ = self._search(spectra, ctf, lattice, coarse, which)
                best_shift = result.scores.flatten(2).amax(-1).argmax(-1)
                centre[torch.from_numpy(idx)] = lattice[best_shift]
            else:
                result, _, _ = self._search(spectra, ctf, centre[torch.from_numpy(idx)][:, None, :], coarse, which)
            class_scores[torch.from_numpy(idx)] = result.scores.amax(-1).amax(1)
        # fine, at full resolution: the 3x3 neighbourhood of the centre, the most likely classes only
        candidates = None if s.n_classes <= CANDIDATE_CLASSES else \
            class_scores.topk(CANDIDATE_CLASSES, dim=-1).indices
        trial = self._clamp_shift(centre[:, None, :] + _NEIGHBOURHOOD[None])
        result, particles, ctf_polar = self._search(spectra, ctf, trial, fine, classes=candidates)
        self._assign(result, particles, ctf_polar, fine, rows, spectra, ctf)

    def _clamp_shift(self, shifts: torch.Tensor) -> torch.Tensor:
        limit = self.max_shift_px + 1.0
        norm = shifts.norm(dim=-1, keepdim=True)
        return torch.where(norm > limit, shifts * (limit / norm.clamp(min=1e-9)), shifts)

    def _assign(self, result, particles, ctf_polar, grid: PolarGrid, rows: np.ndarray, spectra: PaddedSpectra,
                ctf: CtfParams | None) -> None:
        s = self.settings
        scores = result.scores  # (n, S, K, A)
        n, n_shifts, k_classes, n_angles = scores.shape
        per_class = scores.permute(0, 2, 1, 3).reshape(n, k_classes, -1)  # (n, K, S*A)
        evidence = torch.logsumexp(per_class, -1)  # (n, K); uniform class prior (module docstring)
        post = torch.softmax(evidence, -1)
        top_w, top_local = post.topk(min(s.keep, k_classes), dim=-1)
        top_k = top_local if result.classes is None else torch.gather(result.classes, 1, top_local)
        top_w = torch.where(top_w >= s.min_weight, top_w, 0)
        top_w[:, 0] = torch.where(top_w[:, 0] > 0, top_w[:, 0], 1.0)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        # best (shift, rotation) within each kept class
        chosen = torch.gather(per_class, 1, top_local[..., None].expand(-1, -1, per_class.shape[-1]))  # (n, J, S*A)
        flat_best = chosen.argmax(-1)
        shift_i, angle_i = flat_best // n_angles, flat_best % n_angles
        # parabolic refinement along the angle at the best shift
        line = chosen.reshape(n, -1, n_shifts, n_angles)
        line = torch.gather(line, 2, shift_i[..., None, None].expand(-1, -1, 1, n_angles))[:, :, 0]  # (n, J, A)
        left = torch.gather(line, 2, ((angle_i - 1) % n_angles)[..., None])[..., 0]
        mid = torch.gather(line, 2, angle_i[..., None])[..., 0]
        right = torch.gather(line, 2, ((angle_i + 1) % n_angles)[..., None])[..., 0]
        curvature = left - 2 * mid + right
        offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-12), 0).clamp(-0.5, 0.5)
        step = grid.step_degrees
        psi = ((angle_i.to(torch.float64) + offset.to(torch.float64)) * step) % 360.0
        sigma = torch.where(curvature[:, 0] < 0, step / (-curvature[:, 0].clamp(max=-1e-12)).sqrt(),
                            torch.tensor(float("nan")))
        shifts = torch.gather(result.shifts, 1, shift_i[..., None].expand(-1, -1, 2))  # (n, J, 2)
        # MAP probability of the single best hypothesis (RELION's rlnMaxValueProbDistribution)
        total = torch.logsumexp(per_class.flatten(1), -1)
        best_all = per_class.flatten(1).amax(-1)
        max_prob = torch.exp(best_all - total)
        t = self.table
        t.classes[rows] = -1
        t.weights[rows] = 0
        keep = top_w > 0
        kept_k = torch.where(keep, top_k, -1).numpy()
        j = kept_k.shape[1]  # min(keep, K)
        t.classes[rows, :j] = kept_k
        t.weights[rows, :j] = top_w.to(torch.float64).numpy()
        t.psi[rows, :j] = psi.numpy()
        t.shifts[rows, :j] = shifts.to(torch.float64).numpy()
        t.max_prob[rows] = max_prob.to(torch.float64).numpy()
        t.psi_sigma[rows] = sigma.to(torch.float64).numpy()
        t.aligned_at[rows] = self.steps
        self.steps += 1
        self._update_noise(particles, ctf_polar, grid, top_k[:, 0], shift_i[:, 0], angle_i[:, 0], result.shifts)
        self._contribute(spectra, rows, ctf, sign=1.0)

    def _update_noise(self, particles, ctf_polar, grid: PolarGrid, k, shift_i, angle_i, trial) -> None:
        """Fold the residual power of each particle's best hypothesis into the per-ring noise model."""
        n, n_rings, n_angles = particles.shape
        refs = self._polar_references(grid).samples[k]  # (n, R, A)
        roll = (torch.arange(n_angles)[None, :] + angle_i[:, None]) % n_angles  # Ref(theta + psi)
        turned = torch.gather(refs, 2, roll[:, None, :].expand(-1, n_rings, -1))
        d = trial[torch.arange(n), shift_i]  # (n, 2)
        phase = (2 * math.pi / self.box) * torch.einsum("rac,nc->nra", grid.frequencies, d)
        unshifted = particles * torch.polar(torch.ones_like(phase), phase)
        model = turned if ctf_polar is None else turned * ctf_polar
        residual = (unshifted - model).abs().square().mean(-1).to(torch.float64).sum(0)  # (R,)
        self._fold_noise(NoiseResidual(grid.r_min, grid.r_max, residual, n))

    def _fold_noise(self, residual: NoiseResidual) -> None:
        """The noise model moved towards one search's residuals (an exponential window of ``noise_memory``
        particles); a follower also keeps them for its hand-over."""
        n = residual.particles
        decay = math.exp(-n / self.settings.noise_memory)
        lo, hi = residual.first, residual.last + 1
        mass = self.noise_mass
        self.noise[lo:hi] = (decay * mass * self.noise[lo:hi] + residual.power) / (decay * mass + n)
        self.noise_mass = decay * mass + n
        if self.follower:
            self._residuals.append(residual)

    # ------------------------------------------------------------------ references
    def _rebuild(self, update: bool = True) -> None:
        """New references from the sums: FRC, Wiener averages, centring, re-seeding, the search radius.

        ``update=False`` (resuming) only recomputes the references of the state as it is.
        """
        self.frc = class_frc(self.sums)
        self.resolution = frc_resolution(self.frc, self.box, self.apix)
        counts = self.sums.counts()
        if self.started and update:
            self._centre()
            self._reseed(counts)
            self.r_max = self._search_radius(counts)
        spectra = class_averages(self.sums, self.frc, r_max=self.r_max)
        images = irfft2_centered(spectra, self.box).to(torch.float32) * self.mask
        for k, seed in self.seeds.items():
            images[k] = seed
        self.reference_images = images
        self._polar = {}
        self.version += int(update)

    def _search_radius(self, counts: torch.Tensor) -> int:
        """The polar search's radius: the median class resolution (by particles), grown at most 2 rings a rebuild,
        never beyond :data:`MAX_SEARCH_RADIUS`."""
        res = self.resolution.clone()
        res[~torch.isfinite(res)] = self.box * self.apix / 2
        median = weighted_median(res, counts)
        if median is None:
            return self.r_max
        target = min(MAX_SEARCH_RADIUS, int(math.ceil(self.box * self.apix / median)))
        target = max(self._radius(self.settings.initial_lowpass_angstrom), min(self.box // 2 - 1, target))
        return min(target, self.r_max + 2) if target > self.r_max else target

    def _centre(self) -> None:
        """Move each class's density to the box centre: its sums and its members' displacements together."""
        spectra = class_averages(self.sums, self.frc, r_max=self.r_max)
        images = irfft2_centered(spectra, self.box).to(torch.float32)
        com = centre_of_mass(images, self.mask).to(torch.float64)  # (K, 2)
        move = torch.where(com.norm(dim=-1, keepdim=True) > 0.5, -com, torch.zeros_like(com))
        self._move_classes(move)

    def _move_classes(self, move: torch.Tensor) -> None:
        """Move each class's content by `(K, 2)` working pixels: the sums, the frame and the members together."""
        if not bool((move != 0).any()):
            return
        self.sums.shift_classes(move)
        self.offsets_px += move
        t = self.table
        n = t.n
        t.shifts[:n] = _moved_shifts(t.classes[:n], t.psi[:n], t.shifts[:n], move)

    def _reseed(self, counts: torch.Tensor) -> None:
        """A class with almost nothing starts again from one half set of the largest class."""
        s = self.settings
        self.seeds = {}
        total = float(counts.sum())
        if total <= 0:
            return
        fair = total / s.n_classes
        small = torch.nonzero(counts < s.reseed_fraction * fair).flatten().tolist()
        if not small:
            return
        order = torch.argsort(counts, descending=True).tolist()
        spectra_h1 = class_averages(self.sums, self.frc, r_max=self.r_max)  # full set
        half = [self.sums.wiener(half=h) for h in (1, 2)]
        for i, k in enumerate(small):
            donor = order[i % max(1, len(order) // 2)]
            h = int(self.rng.integers(0, 2))
            spectrum = torch.where(self.sums.radius <= self.r_max, half[h][donor], 0)
            # the half set's own noise makes the copy differ from its donor: the two then split its particles
            image = irfft2_centered(spectrum, self.box).to(torch.float32) * self.mask
            scale = spectra_h1[donor].abs().square().sum().sqrt() / spectrum.abs().square().sum().sqrt().clamp(
                min=1e-30)
            self.seeds[k] = image * float(scale)


def _moved_shifts(classes: np.ndarray, psi: np.ndarray, shifts: np.ndarray, move: torch.Tensor) -> np.ndarray:
    """Members' displacements once their classes moved by ``move`` `(K, 2)` pixels.

    ``classes`` `(n, J)` (-1: no entry), ``psi`` `(n, J)` degrees, ``shifts`` `(n, J, 2)` pixels. A member with pose
    ``(psi, d)`` then sits at ``d - A(psi) c`` in the moved class (:mod:`.class_sums`). Returns a new `(n, J, 2)` array.
    """
    members = classes >= 0
    c = move.numpy()[np.where(members, classes, 0)]  # (n, J, 2)
    rad = np.deg2rad(psi)
    cos, sin = np.cos(rad), np.sin(rad)
    moved = shifts.copy()
    moved[..., 0] -= np.where(members, cos * c[..., 0] + sin * c[..., 1], 0)
    moved[..., 1] -= np.where(members, -sin * c[..., 0] + cos * c[..., 1], 0)
    return moved

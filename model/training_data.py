"""Training particles simulated on the fly from many molecules.

A :class:`MoleculeBank` holds density maps at the model box: procedurally generated
protein-like molecules (:func:`cryofastar.recon.simulate.procedural.procedural_molecule`,
seeds from the training range) and real structures (model/TRAINING_DATA.md). Each
molecule gets its own pixel size so that its diameter fills a random 40–75 % of the
box, as a particle box Fourier-cropped to the model box would. Slots are replaced
by fresh molecules as training goes on, so the network rarely sees a molecule twice.

Seed ranges (model/TRAINING_DATA.md): training seeds are < 900,000,000; validation
seeds are 900,000,000 .. 999,999,999; seeds >= 1,000,000,000 are held out for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate.atoms import Atoms, load_structure
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles
from cryofastar.recon.simulate.potential import atoms_to_volume
from cryofastar.recon.simulate.procedural import EVAL_SEED_START, VALIDATION_SEED_START, procedural_molecule

from .curriculum import Stage

__all__ = ["EVAL_SEED_START", "VALIDATION_SEED_START", "MoleculeBank", "ParticleSets", "sample_rotations",
           "simulate_sets"]


@dataclass
class ParticleSets:
    """A batch of simulated sets.

    Attributes
    ----------
    images: torch.Tensor
        `(S, V, B, B)` float32 images at the model box; view 0 of each set is the reference.
    rotations: torch.Tensor
        `(S, V, 3, 3)` float64 true RELION matrices.
    origins_px: torch.Tensor
        `(S, V, 2)` float64 true rlnOrigin (x, y) in model pixels.
    """

    images: torch.Tensor
    rotations: torch.Tensor
    origins_px: torch.Tensor


def _volume_for(atoms: Atoms, box: int, fill: float) -> tuple[torch.Tensor, float]:
    apix = 2.0 * max(atoms.radius_angstrom(), 5.0) / (fill * box)
    return atoms_to_volume(atoms, box, apix), apix


class MoleculeBank:
    """Density maps of ``size`` molecules at the model box, refreshed slot by slot.

    Parameters
    ----------
    box: int
        Model box in pixels.
    size: int
        Number of molecules held at once.
    structures: Sequence[Path]
        Real structure files (PDB/mmCIF) mixed with procedural molecules.
    real_fraction: float
        Probability that a new slot holds a real structure (when any are given).
    seed_start: int
        First procedural seed; the bank draws ``seed_start + k`` for k = 0, 1, ...
    generator: torch.Generator
        Randomness for the choice of structure and fill fraction.
    """

    def __init__(self, box: int, size: int, structures: Sequence[Path], real_fraction: float,
                 seed_start: int, generator: torch.Generator):
        self.box, self.size = box, size
        self.generator = generator
        self.real_fraction = real_fraction if structures else 0.0
        self._structures = list(structures)
        self._real_cache: dict[int, Atoms] = {}
        self.next_seed = seed_start
        self.volumes: list[torch.Tensor] = []
        self.apix: list[float] = []
        self.names: list[str] = []
        for _ in range(size):
            self._append()

    def _new_molecule(self) -> tuple[torch.Tensor, float, str]:
        fill = 0.4 + 0.35 * float(torch.rand((), generator=self.generator))
        if float(torch.rand((), generator=self.generator)) < self.real_fraction:
            k = int(torch.randint(len(self._structures), (), generator=self.generator))
            if k not in self._real_cache:
                self._real_cache[k] = load_structure(self._structures[k])
            volume, apix = _volume_for(self._real_cache[k], self.box, fill)
            return volume, apix, self._structures[k].name
        seed = self.next_seed
        self.next_seed += 1
        volume, apix = _volume_for(procedural_molecule(seed), self.box, fill)
        return volume, apix, f"procedural-{seed}"

    def _append(self) -> None:
        volume, apix, name = self._new_molecule()
        self.volumes.append(volume)
        self.apix.append(apix)
        self.names.append(name)

    def refresh(self, n: int = 1) -> list[int]:
        """Replace ``n`` random slots with new molecules; return the slots replaced."""
        slots = []
        for _ in range(n):
            k = int(torch.randint(self.size, (), generator=self.generator))
            self.volumes[k], self.apix[k], self.names[k] = self._new_molecule()
            slots.append(k)
        return slots


def _rz(angles: torch.Tensor) -> torch.Tensor:
    """`(n,)` radians -> `(n, 3, 3)` rotations about z (RELION's passive form)."""
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, s, zero, -s, c, zero, zero, zero, one], -1).view(-1, 3, 3)


def _axis_angle(axes: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rodrigues: `(n, 3)` unit axes, `(n,)` radians -> `(n, 3, 3)`."""
    x, y, z = axes.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(-1, 3, 3)
    s, c = torch.sin(angles)[:, None, None], torch.cos(angles)[:, None, None]
    eye = torch.eye(3, dtype=axes.dtype).expand_as(k)
    return eye + s * k + (1 - c) * (k @ k)


def sample_rotations(stage: Stage, n: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, 3, 3)` float64 RELION matrices for one set, drawn as the stage says.

    ``inplane``: ``Rz(psi_i) · A`` for one SO(3)-uniform ``A`` and uniform ``psi_i``.
    ``cone``: ``Rz(psi_i) · Q_i · A`` with ``Q_i`` a rotation by at most ``cone_degrees``
    about a random axis. ``full``: SO(3)-uniform.
    """
    if stage.poses == "full":
        return random_rotations(n, generator)
    base = random_rotations(1, generator)
    psi = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
    rotations = _rz(psi) @ base
    if stage.poses == "inplane":
        return rotations
    if stage.poses != "cone":
        raise ValueError(f"unknown pose distribution {stage.poses!r}")
    axes = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    angles = torch.rand(n, generator=generator, dtype=torch.float64) * math.radians(stage.cone_degrees)
    return _rz(psi) @ _axis_angle(axes, angles) @ base


def simulate_sets(bank: MoleculeBank, stage: Stage, n_sets: int, generator: torch.Generator,
                  molecules: Sequence[int] | None = None) -> ParticleSets:
    """Simulate ``n_sets`` sets of ``stage.views`` views, each from one molecule of the bank.

    The molecule of set ``i`` is ``molecules[i]`` if given, else a random slot.
    """
    images, rotations, origins = [], [], []
    for i in range(n_sets):
        k = molecules[i] if molecules is not None else int(torch.randint(bank.size, (), generator=generator))
        snr = None
        if stage.snr_min is not None and stage.snr_max is not None:
            u = float(torch.rand((), generator=generator))
            snr = math.exp(math.log(stage.snr_min) + u * (math.log(stage.snr_max) - math.log(stage.snr_min)))
        ctf = CtfRange() if float(torch.rand((), generator=generator)) < stage.ctf_probability else None
        sim = simulate_particles(bank.volumes[k], stage.views, bank.apix[k], snr, generator,
                                 max_shift_px=stage.max_shift_px, ctf=ctf,
                                 rotations=sample_rotations(stage, stage.views, generator))
        images.append(sim.images)
        rotations.append(sim.rotations)
        origins.append(sim.origins_angstrom / bank.apix[k])
    return ParticleSets(torch.stack(images), torch.stack(rotations), torch.stack(origins))

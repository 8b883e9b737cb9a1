"""Procedurally generated protein-like molecules, for training variety and demos.

Recipe (also in docs/simulation.md):

1. Size: ``n_residues`` log-uniform in [min_residues, max_residues] for the whole
   assembly; an oligomer (order 2..6 with probability ``oligomer_probability``)
   splits it over identical subunits.
2. Chain: a sequence of secondary-structure segments — α-helices (6–20 residues,
   1.5 Å rise and 100° per residue on a 2.3 Å radius), β-strands (4–10 residues,
   3.3 Å rise, 0.9 Å pleat) and loops (2–8 residues, 3.8 Å Cα steps, random
   turns) with a per-molecule mix of helix/strand/loop fractions. Each segment
   starts where the previous ended and points in the best of 12 random
   directions, scored by how far its Cα atoms stay from the existing ones (≥ 4 Å
   wanted) and from the globule radius ``2.2 * n^0.38 * 1.3`` Å, so chains fold
   into compact globules rather than random coils.
3. Atoms per residue: N, CA, C, O of the backbone and 1–5 side-chain atoms
   (C/N/O/S) on the side facing away from the chain, so there are ~7.5 heavy
   atoms per residue, as in real proteins.
4. Oligomers: subunits placed with cyclic (Cn) symmetry about z, neighbouring
   centres 1.5x the chain's 90th-percentile radius apart (in contact).
5. B-factors: one value per molecule uniform in [10, 60] Å^2, ±20 % per atom.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives
the same molecule on every machine. Seeds run from 0 to :data:`MAX_SEED`; the project
splits them once, here, for training (below :data:`VALIDATION_SEED_START`), validation
during training and held-out evaluation (from :data:`EVAL_SEED_START`): see
model/TRAINING_DATA.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .atoms import Atoms

__all__ = ["EVAL_SEED_START", "MAX_SEED", "VALIDATION_SEED_START", "ProceduralSettings", "oligomer_order",
           "procedural_molecule"]

MAX_SEED = 2**31 - 1
"""Largest procedural seed."""
VALIDATION_SEED_START = 900_000_000
"""Seeds from this one up to ``EVAL_SEED_START - 1`` are kept for validation during training."""
EVAL_SEED_START = 1_000_000_000
"""Seeds >= this are held out for evaluation and never trained on."""


@dataclass(frozen=True)
class ProceduralSettings:
    """Knobs of the generator (defaults are the training distribution)."""

    min_residues: int = 50
    max_residues: int = 1000
    oligomer_probability: float = 0.3
    max_oligomer_order: int = 6
    min_b_factor: float = 10.0
    max_b_factor: float = 60.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    u = _unit(np.cross(d, _unit(rng.normal(size=3))))
    return u, np.cross(d, u)


def _segment(kind: str, length: int, start: np.ndarray, d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(length, 3)` Cα positions of one segment starting next to ``start``."""
    i = np.arange(1, length + 1)[:, None]
    u, v = _perpendicular(d, rng)
    if kind == "helix":
        angle = np.deg2rad(100.0) * i
        return start + 1.5 * i * d + 2.3 * (np.cos(angle) * u + np.sin(angle) * v) - 2.3 * u
    if kind == "strand":
        return start + 3.3 * i * d + 0.9 * ((-1.0) ** i) * u
    steps = [d]
    for _ in range(length - 1):
        steps.append(_unit(steps[-1] + 0.9 * rng.normal(size=3)))
    return start + 3.8 * np.cumsum(np.asarray(steps), axis=0)


def _fold_chain(n_residues: int, rng: np.random.Generator) -> np.ndarray:
    """`(n, 3)` Cα trace of one compact chain (Å)."""
    mix = rng.dirichlet([2.0, 1.5, 1.5])  # helix, strand, loop
    radius = 2.2 * n_residues**0.38 * 1.3
    lengths = {"helix": (6, 21), "strand": (4, 11), "loop": (2, 9)}
    trace = np.zeros((1, 3))
    while len(trace) < n_residues:
        kind = rng.choice(["helix", "strand", "loop"], p=mix)
        length = int(min(rng.integers(*lengths[kind]), n_residues - len(trace)))
        best, best_score = None, -np.inf
        for d in _unit(rng.normal(size=(12, 3))):
            candidate = _segment(kind, length, trace[-1], d, rng)
            gaps = np.linalg.norm(candidate[:, None, :] - trace[None, :-1, :], axis=-1)
            clash = np.clip(4.0 - gaps.min(), 0, None) if gaps.size else 0.0
            outside = np.clip(np.linalg.norm(candidate, axis=-1) - radius, 0, None).max()
            score = -3.0 * clash - outside
            if score > best_score:
                best, best_score = candidate, score
        trace = np.concatenate([trace, best])
    return trace[:n_residues]


def _backbone_and_side_chains(trace: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Heavy atoms around a Cα trace: `(m, 3)` positions and their elements."""
    padded = np.concatenate([trace[:1] - (trace[1:2] - trace[:1]), trace, trace[-1:] + (trace[-1:] - trace[-2:-1])])
    tangent = _unit(padded[2:] - padded[:-2])
    outward = trace - 0.5 * (padded[2:] + padded[:-2])
    outward = outward - (outward * tangent).sum(-1, keepdims=True) * tangent
    norm = np.linalg.norm(outward, axis=-1, keepdims=True)
    random_dir = _unit(np.cross(tangent, rng.normal(size=trace.shape)))
    outward = np.where(norm > 1e-3, outward / np.maximum(norm, 1e-9), random_dir)
    binormal = np.cross(tangent, outward)
    atoms = [
        trace - 1.2 * tangent + 0.6 * binormal,  # N
        trace,  # CA
        trace + 1.3 * tangent - 0.4 * binormal,  # C
        trace + 1.6 * tangent - 1.4 * binormal,  # O
    ]
    elements = ["N", "C", "C", "O"]
    positions = np.concatenate(atoms)
    element_list = [e for e in elements for _ in range(len(trace))]
    n_side = rng.integers(1, 6, size=len(trace))
    side, side_elements = [], []
    for k in range(1, 6):
        has = n_side >= k
        jitter = 0.5 * rng.normal(size=(int(has.sum()), 3))
        side.append(trace[has] + 1.5 * k * outward[has] + jitter)
        side_elements += list(rng.choice(["C", "C", "C", "N", "O", "S"], size=int(has.sum())))
    return np.concatenate([positions, *side]), element_list + side_elements


def _size_and_order(rng: np.random.Generator, settings: ProceduralSettings) -> tuple[int, int]:
    """The first draws of a molecule: residues in all and its Cn order (1: a monomer)."""
    total = int(np.exp(rng.uniform(np.log(settings.min_residues), np.log(settings.max_residues))))
    order = 1
    if rng.random() < settings.oligomer_probability:
        order = int(rng.integers(2, settings.max_oligomer_order + 1))
    return total, order


def oligomer_order(seed: int, settings: ProceduralSettings | None = None) -> int:
    """The Cn order (about z; 1: none) of :func:`procedural_molecule` ``(seed, settings)``, without building it."""
    return _size_and_order(np.random.default_rng(seed), settings or ProceduralSettings())[1]


def procedural_molecule(seed: int, settings: ProceduralSettings | None = None) -> Atoms:
    """Generate one protein-like molecule (see the module docstring for the recipe).

    Returns
    -------
    atoms: Atoms
        Heavy atoms, centred on their mean position.
    """
    settings = settings or ProceduralSettings()
    rng = np.random.default_rng(seed)
    total, order = _size_and_order(rng, settings)
    per_chain = max(settings.min_residues // 2, total // order)
    positions, elements = _backbone_and_side_chains(_fold_chain(per_chain, rng), rng)
    positions = positions - positions.mean(0)
    if order > 1:
        # neighbouring subunit centres 1.5 x the chain's 90th-percentile radius apart: in contact
        extent = np.quantile(np.linalg.norm(positions[:, :2], axis=-1), 0.9)
        offset = np.array([0.75 * extent / np.sin(np.pi / order), 0.0, 0.0])
        copies = []
        for k in range(order):
            a = 2 * np.pi * k / order
            rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            copies.append((positions + offset) @ rz.T)
        positions, elements = np.concatenate(copies), elements * order
    b_mean = rng.uniform(settings.min_b_factor, settings.max_b_factor)
    b = b_mean * rng.uniform(0.8, 1.2, size=len(positions))
    atoms = Atoms(
        torch.as_tensor(positions, dtype=torch.float32),
        [str(e) for e in elements],
        torch.as_tensor(b, dtype=torch.float32),
    )
    return atoms.centered()

"""Held-out figures of the geometric decoder: common lines found (M1) and view poses (M0, M2).

The views are made by the real-space simulator (:func:`cryofastar.recon.simulate.simulate_particles`,
torch-fourier-slice projections, noise at the simulator's SNR) and resampled on rays by
:func:`cryofastar.recon.fourier_rays.image_rays`: not the ray simulator training uses. Molecules
are held out from training (model/TRAINING_DATA.md): procedural seeds from ``EVAL_SEED_START``
and, when asked, the evaluation structures (:func:`cryofastar.datasets.fetch_structures`).

* **Lines found**: over every pair of views of a set whose directions are more than
  ``min_angle_degrees`` from parallel, the fraction whose best-scoring ray pair lies within
  ``tolerance_rays`` of the true line on both rays (either orientation). Chance: a random ray
  pair is within ``t`` rays of one of the two true pairs with probability
  ``2 (2 t + 1)^2 / L^2``.
* **Poses**: geodesic error of the decoder's relative rotations ``R_i = A_ref A_iᵀ`` against
  the true ones, after the better of the two hands (common lines cannot tell them apart),
  median over the non-reference views of all sets. Chance: the same for random rotations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.rotations import geodesic_degrees, mirror_rotations, random_rotations
from cryofastar.recon.simulate import atoms_to_volume, load_structure, procedural_molecule
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles

from .common_lines import true_common_lines
from .geometric_decoder import GeometricDecoder
from .ray_pairs import found_within
from .training_data import EVAL_SEED_START

__all__ = ["HeldOutSet", "hand_errors", "held_out_sets", "line_accuracy", "pose_accuracy"]

@dataclass
class HeldOutSet:
    """One molecule's views on rays, with the truth.

    Attributes
    ----------
    name: str
        The molecule.
    rays: torch.Tensor
        `(V, L, R)` complex rays.
    noise_scale: float
        Standard deviation of one Fourier sample's noise (``sigma * B``; 0 when clean).
    rotations: torch.Tensor
        `(V, 3, 3)` true relative rotations (``[0] = I``).
    """

    name: str
    rays: torch.Tensor
    noise_scale: float
    rotations: torch.Tensor


def held_out_sets(molecules: int, views: int, snr: float | None, seed: int = 0, box: int = 64, n_rays: int = 96,
                  n_radii: int = 24, max_radius_fraction: float = 0.75, structures: Sequence = (),
                  ctf: bool = False, max_shift_px: float = 0.0, fill: float = 0.6,
                  seed_start: int = EVAL_SEED_START) -> list[HeldOutSet]:
    """Simulate one set of ``views`` views for each held-out molecule.

    Parameters
    ----------
    molecules: int
        Procedural molecules (seeds ``seed_start + k``).
    views: int
        Views per set (SO(3)-uniform).
    snr: float | None
        The simulator's SNR (``None``: clean).
    seed: int
        Seeds the poses and noise (set ``k`` uses ``seed * 100003 + k``).
    box: int
        Box in pixels.
    n_rays, n_radii, max_radius_fraction:
        The ray grid (:func:`~cryofastar.recon.fourier_rays.image_rays`).
    structures: Sequence
        Paths of evaluation structures to add (one set each).
    ctf: bool
        Apply the simulator's CTF (defocus 0.8-2.5 µm).
    max_shift_px: float
        Largest displacement per axis, pixels.
    fill: float
        The molecule's diameter as a fraction of the box (sets the pixel size).
    seed_start: int
        First procedural seed: ``EVAL_SEED_START`` (held out) or, during training, the
        validation range (``VALIDATION_SEED_START``).
    """
    atoms = [(f"procedural-{seed_start + k}", procedural_molecule(seed_start + k)) for k in range(molecules)]
    atoms += [(path.stem, load_structure(path)) for path in structures]
    sets = []
    for k, (name, molecule) in enumerate(atoms):
        apix = 2.0 * max(molecule.radius_angstrom(), 5.0) / (fill * box)
        sim = simulate_particles(atoms_to_volume(molecule, box, apix), views, apix, snr,
                                 torch.Generator().manual_seed(seed * 100_003 + k), max_shift_px=max_shift_px,
                                 ctf=CtfRange() if ctf else None)
        rays = image_rays(sim.images, n_rays, n_radii, max_radius_fraction)
        sets.append(HeldOutSet(name, rays, sim.noise_sigma * box,
                               sim.rotations[0] @ sim.rotations.transpose(-1, -2)))
    return sets


def _noise_scale(held: HeldOutSet) -> float:
    return held.noise_scale if held.noise_scale > 0 else float(held.rays.abs().mean()) * 1e-3


@torch.no_grad()
def line_accuracy(decoder: GeometricDecoder, sets: Sequence[HeldOutSet], tolerance_rays: float = 2.0,
                  min_angle_degrees: float = 10.0) -> dict[str, float]:
    """Fraction of view pairs whose common line is found (module docstring), with chance beside it."""
    found, pairs = 0, 0
    for held in sets:
        features = decoder.ray_features(held.rays, _noise_scale(held))
        scores = features[:, None] @ features[None].transpose(-1, -2)  # (V, V, L, L)
        lines = true_common_lines(held.rotations[:, None], held.rotations[None], decoder.n_rays)
        upper = torch.triu(torch.ones_like(lines.angle_degrees, dtype=torch.bool), diagonal=1)
        usable = upper & (lines.angle_degrees > min_angle_degrees)
        hit = found_within(scores, lines, tolerance_rays)
        found += int(hit[usable].sum())
        pairs += int(usable.sum())
    chance = 2 * (2 * tolerance_rays + 1) ** 2 / decoder.n_rays ** 2
    return {"found": found / max(pairs, 1), "pairs": pairs, "chance": chance}


def hand_errors(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """`(n,)` geodesic errors (degrees) of relative rotations in the reference's frame, in the better of the
    two hands (``R`` or its mirror ``J R J``, which common lines cannot tell apart; chosen by the median)."""
    e1, e2 = geodesic_degrees(pred, true), geodesic_degrees(mirror_rotations(pred), true)
    return e1 if e1.median() <= e2.median() else e2


@torch.no_grad()
def pose_accuracy(decoder: GeometricDecoder, sets: Sequence[HeldOutSet], seed: int = 0) -> dict[str, float]:
    """Median rotation error (degrees) of the non-reference views over all sets, with chance beside it."""
    errors, chance = [], []
    generator = torch.Generator().manual_seed(seed)
    for held in sets:
        out = decoder(held.rays, _noise_scale(held))
        errors.append(hand_errors(out.rotations[1:], held.rotations[1:]))
        random = random_rotations(len(held.rotations), generator)
        chance.append(hand_errors((random[0] @ random.transpose(-1, -2))[1:], held.rotations[1:]))
    errors_all = torch.cat(errors)
    return {"median": float(errors_all.median()), "views": len(errors_all),
            "fraction_within_10": float((errors_all < 10).double().mean()),
            "chance_median": float(torch.cat(chance).median()),
            "molecule_medians": [round(float(e.median()), 1) for e in errors]}

"""How map-only ab initio runs: its settings and the working box they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AbInitioSettings", "working_box"]


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


def working_box(box: int, apix: float, settings: AbInitioSettings) -> int:
    """Working box ``W`` (px, even, 16..``box``): ``settings.working_box``, or the final resolution at 0.8 Nyquist."""
    if settings.working_box is not None:
        return min(box, int(settings.working_box))
    # final resolution at 0.8 Nyquist or below: 2 apix_w <= 0.8 final  <=>  W >= 2.5 B apix / final
    w = int(math.ceil(2.5 * box * apix / settings.final_resolution_angstrom - 1e-9))
    return min(box, max(16, w + (w % 2)))

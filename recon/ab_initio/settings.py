"""How map-only ab initio runs: its settings, tied to the particle's size, and the working box they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["DEFAULT_FILL", "RESOLUTION_PER_DIAMETER", "AbInitioSettings", "working_box"]

RESOLUTION_PER_DIAMETER = {"initial": 1 / 3, "coarse": 1 / 5, "shared": 1 / 5, "final": 1 / 10}
"""Bands of the schedule as fractions of the particle diameter ``D`` (a 150-Å particle: 50, 30, 30 and 15 Å).
What a low-resolution map can tell apart scales with the particle, not with absolute Å: a fixed 35 Å
leaves a 60-Å protein a featureless blob (bench/ab_initio_panel.py measured it)."""
MAX_SHIFT_PER_BOX = 0.08
"""Shifts searched per axis, as a fraction of the box side (5 px at box 64), when not given in Å."""
MASK_PER_DIAMETER = 1.2
"""Diameter of the solvent mask on the references, per particle diameter (capped by ``mask_diameter_fraction``)."""
DEFAULT_FILL = 0.7
"""Particle diameter per box side assumed when neither given nor estimated (:class:`AbInitio` used directly)."""


@dataclass(frozen=True)
class AbInitioSettings:
    """How map-only ab initio runs (units: Å, degrees, working-box pixels).

    Attributes
    ----------
    particle_diameter_angstrom: float | None
        The particle's diameter (Å); ``None``: :func:`run_ab_initio` estimates it from the
        images (:func:`~cryofastar.recon.particle_diameter.estimate_particle_diameter`).
        The resolutions and the mask below default to fractions of it
        (:data:`RESOLUTION_PER_DIAMETER`, :data:`MASK_PER_DIAMETER`).
    initial_resolution_angstrom, final_resolution_angstrom: float | None
        Band of the first and the last minibatches (the schedule between them is
        geometric in the number of poses computed); ``None``: from the diameter.
    schedule_particles: int
        Poses (new or re-posed particles) over which the band goes from initial to final.
    shared_resolution_angstrom: float | None
        Below this resolution both halves are matched against the map of both halves.
    working_box: int | None
        Box of matching and of the internal maps (``None``: the smallest even box whose
        Nyquist is ``0.8 final_resolution`` or finer, at most the session box and ``max_working_box``).
    max_working_box: int
        Largest working box chosen automatically (bounds the cost when a particle fills little of its box).
    global_step_degrees: float
        Step of the SO(3) grid searched (4,416 orientations at 15°).
    max_shift_angstrom: float | None
        Shifts searched per axis, about the box centre (Å); ``None``: ``MAX_SHIFT_PER_BOX`` of the box.
    shift_step_px: float
        Step of the shift window in working-box pixels.
    coarse_resolution_angstrom: float | None
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
    seed_restarts, max_seed_restarts: int
        Independent seed stages (other random starts): :func:`run_ab_initio` runs at least
        ``seed_restarts`` and goes on until two of them agree (their poses of the seed set
        match after one global rotation and hand, median within ``agreement_degrees``) or
        ``max_seed_restarts`` ran. A random start can settle in a wrong, self-consistent
        map; two independent starts rarely settle in the same wrong one. Of the agreeing
        restarts the one whose maps match the seed set best is kept; the agreement is the
        convergence verdict (:class:`~cryofastar.recon.ab_initio.AbInitioVerdict`).
    agreement_degrees: float
        Two restarts agree when the median angle between their poses, after the global
        alignment, is at most this.
    settled_change_degrees, max_seed_passes: float, int
        The seed stage goes on after ``seed_passes`` while the median change of the best
        orientations in a pass exceeds ``settled_change_degrees``, up to ``max_seed_passes``.
    initial_particles: int
        New particles get random orientations until the accumulator holds this many.
    mask_diameter_fraction: float
        Largest diameter of the soft spherical solvent mask on the references, as a fraction of
        the box (the mask is ``MASK_PER_DIAMETER`` particle diameters, at most this).
    positive_density: bool
        Clip references at 0 (densities positive, as in RELION-convention particles).
    interpolation: str
        Insertion of the internal accumulator (``"nearest"`` or ``"trilinear"``).
    """

    particle_diameter_angstrom: float | None = None
    initial_resolution_angstrom: float | None = None
    final_resolution_angstrom: float | None = None
    schedule_particles: int = 6_000
    shared_resolution_angstrom: float | None = None
    working_box: int | None = None
    max_working_box: int = 64
    global_step_degrees: float = 15.0
    max_shift_angstrom: float | None = None
    shift_step_px: float = 1.0
    coarse_resolution_angstrom: float | None = None
    coarse_candidates: int = 48
    top_k: int = 8
    local_polish: bool = True
    min_weight: float = 0.02
    inverse_temperature: float = 1.0
    batch_size: int = 256
    max_batch_size: int = 2048
    seed_particles: int = 1000
    seed_passes: int = 8
    seed_restarts: int = 2
    max_seed_restarts: int = 5
    agreement_degrees: float = 15.0
    settled_change_degrees: float = 4.0
    max_seed_passes: int = 20
    initial_particles: int = 256
    mask_diameter_fraction: float = 0.9
    positive_density: bool = True
    interpolation: str = "nearest"

    def resolved(self, box: int, apix: float, particle_diameter_angstrom: float | None = None) -> AbInitioSettings:
        """These settings with every ``None`` filled in for a ``box`` x ``apix`` session.

        The diameter is ``particle_diameter_angstrom`` when this object gives none (else
        ``DEFAULT_FILL`` of the box); resolutions follow :data:`RESOLUTION_PER_DIAMETER`,
        never finer than 2.5 session pixels; shifts follow ``MAX_SHIFT_PER_BOX``.
        """
        diameter = self.particle_diameter_angstrom or particle_diameter_angstrom or DEFAULT_FILL * box * apix
        finest = 2.5 * apix

        def band(value: float | None, key: str) -> float:
            return float(value) if value is not None else max(finest, diameter * RESOLUTION_PER_DIAMETER[key])

        return replace(self, particle_diameter_angstrom=float(diameter),
                       initial_resolution_angstrom=band(self.initial_resolution_angstrom, "initial"),
                       final_resolution_angstrom=band(self.final_resolution_angstrom, "final"),
                       shared_resolution_angstrom=band(self.shared_resolution_angstrom, "shared"),
                       coarse_resolution_angstrom=band(self.coarse_resolution_angstrom, "coarse"),
                       max_shift_angstrom=(float(self.max_shift_angstrom) if self.max_shift_angstrom is not None
                                           else MAX_SHIFT_PER_BOX * box * apix))

    @property
    def mask_diameter_angstrom(self) -> float | None:
        """Diameter of the solvent mask (Å) before the cap, or ``None`` when the diameter is not known yet."""
        d = self.particle_diameter_angstrom
        return None if d is None else MASK_PER_DIAMETER * d


def working_box(box: int, apix: float, settings: AbInitioSettings) -> int:
    """Working box ``W`` (px, even, 16..``box``): ``settings.working_box``, or the final resolution at 0.8 Nyquist.

    ``settings`` must be :meth:`~AbInitioSettings.resolved` (or give ``working_box``).
    """
    if settings.working_box is not None:
        return min(box, int(settings.working_box))
    # final resolution at 0.8 Nyquist or below: 2 apix_w <= 0.8 final  <=>  W >= 2.5 B apix / final
    w = int(math.ceil(2.5 * box * apix / settings.final_resolution_angstrom - 1e-9))
    return min(box, settings.max_working_box, max(16, w + (w % 2)))

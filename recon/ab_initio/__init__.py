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
   ``shared_resolution_angstrom`` (``D / 5``) both halves use the map of both halves (as
   RELION starts both from one low-passed reference); above it each half uses its own
   map, so the halves stay independent there. Each reference is masked by a soft
   sphere of 1.2 particle diameters (solvent mask), optionally clipped at 0 (densities
   are positive) and low-passed to the current band ``k_max`` (:class:`~cryofastar.recon.map_slices.MapSlicer`).
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

**Resolution schedule.** Tied to the particle's diameter ``D`` (given, or estimated
from the images: :mod:`~cryofastar.recon.particle_diameter`): the band starts at
``initial_resolution_angstrom`` (``D / 3``) and tightens geometrically to
``final_resolution_angstrom`` (``D / 10``) as particles are
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

from .confirmation import PoseConfirmation, confirm_poses
from .offline import AbInitioResult, AbInitioVerdict, run_ab_initio
from .settings import AbInitioSettings
from .soft_poses import SoftPoses
from .streaming import AbInitio

__all__ = ["AbInitio", "AbInitioResult", "AbInitioVerdict", "AbInitioSettings", "PoseConfirmation", "SoftPoses",
           "confirm_poses", "run_ab_initio"]

"""Streaming pose refinement: each pass's poses finished against the running map, old ones re-posed.

The policy of :mod:`~cryofastar.engine.policy` applied to a growing session (the daemon's
refinement); the offline job applies it to a whole set (:mod:`~cryofastar.engine.offline`).

Rules (docs/refinement.md):

- **When.** Refinement starts with the first map published once the map holds at least
  ``refine_after`` particles; from then on every published map becomes the new
  reference (:class:`~cryofastar.recon.refinement.RefinementReference`, working box
  ``refine_box``, band at the map's FSC resolution).
- **Phases.** ``waiting`` (fewer than ``refine_after`` particles: network or random
  poses go in as they are); with the network, the first refined pass is a ``best`` probe
  (local around the network's poses *and* a global search, the better per particle): if
  the network's neighbourhood won for at least half of the particles the network is
  informative and the session goes straight to ``local``; otherwise, and always with
  ``--poses-from map-only``, to ``ab-initio``: streaming map-only ab initio
  (:class:`~cryofastar.recon.ab_initio.AbInitio`) bootstrapped on the oldest
  ``seed_particles`` of the map (:func:`~cryofastar.recon.ab_initio.run_ab_initio`, in
  a worker thread: new passes go into the map at their own poses meanwhile, never
  refined, and are added to the ab initio when re-posed), then fed every
  new pass and re-posing the map's particles least recently posed first. Once its
  resolution schedule has run out (its band is then as fine as the schedule and its
  internal FSC allow) and every particle was posed after that, the session moves to
  ``local``: new passes are refined locally (network informative) or
  searched globally then refined (not), re-posed particles locally, always against the
  particle's own half map.
- **Re-posing.** After each refined pass, up to ``repose_per_pass`` particles already in
  the map are re-posed against the current reference: those never refined first (oldest
  first), then those refined against the oldest maps, least certain (largest angular
  spread) first. Their images are read again from their stacks; the old contribution is
  removed from the accumulator and the new one added, so the map equals one built from
  scratch with the new poses (:meth:`~cryofastar.recon.HalfSetAccumulator.remove`).
- **References.** A map is published (and becomes the reference) as soon as the map
  reaches ``refine_after`` particles, and again whenever it has grown by a quarter or
  been edited by re-posing, at most every ``publish_seconds``.
- **While idle.** When no new particles wait, the daemon keeps re-posing (the map goes on
  improving between bursts and after the session) until a whole sweep over the map has
  moved the median particle by less than ``CONVERGED_DEGREES``; new particles resume it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from cryofastar.recon.ab_initio import (
    AbInitio,
    AbInitioResult,
    AbInitioSettings,
    AbInitioVerdict,
    PoseConfirmation,
    SoftPoses,
    confirm_poses,
    run_ab_initio,
)
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.refinement import RefinementReference, RefineSettings, images_to_working_box

from .policy import (
    AB_INITIO_ATTEMPTS,
    CLASS_POSES_WAIT_SECONDS,
    CONFIRM_SEED_OFFSET,
    ab_initio_attempts,
    is_informative,
    network_won_fraction,
)

logger = logging.getLogger(__name__)

__all__ = ["COARSE", "NEVER", "UNREADABLE", "ClassProbe", "RankPolicy", "RefinedPoses", "StreamingRefiner"]

NEVER = 0
"""``refined`` value of a particle never refined (map versions start at 1)."""
COARSE = -1
"""``refined`` value of a particle given only a first pose by a global search (re-posed first, locally)."""
UNREADABLE = np.iinfo(np.int32).max
"""``refined`` value of a particle whose stack could not be read again (never re-posed)."""
PROBE_CHUNK = 256
"""Particles the class poses' probe matches at a time (a stop request is heard between chunks)."""
CONVERGED_DEGREES = 1.0
"""Idle re-posing stops once a whole sweep moved the median particle by less than this."""


@dataclass
class RefinedPoses:
    """Poses of `n` particles after matching, with the map version they were matched against."""

    rotations: torch.Tensor  # (n, 3, 3) float64 RELION matrices
    origins_angstrom: torch.Tensor  # (n, 2) float64 rlnOriginX/YAngst
    scores: torch.Tensor  # (n,) float32 normalised cross-correlation
    spread_degrees: torch.Tensor  # (n,) float32 posterior angular spread
    mode: str
    version: int
    soft: SoftPoses | None = None  # the ab initio's soft poses (ab-initio phase only)

    def subset(self, keep: torch.Tensor) -> RefinedPoses:
        """The poses of the particles ``keep`` (an `(n,)` bool mask or indices) selects."""
        return RefinedPoses(self.rotations[keep], self.origins_angstrom[keep], self.scores[keep],
                            self.spread_degrees[keep], self.mode, self.version,
                            None if self.soft is None else self.soft[keep])


@dataclass
class ClassProbe:
    """What the probe of class poses found (:meth:`StreamingRefiner.class_probe_work`)."""

    poses: RefinedPoses  # the probed particles' poses after the best probe
    won: float  # share of particles whose class pose's neighbourhood beat a global search
    informative: bool  # the policy's verdict on ``won``
    confirmation: PoseConfirmation | None  # the random ab initio start's verdict (informative poses only)
    particles: int  # particles probed


@dataclass(frozen=True)
class RankPolicy:
    """How another rank of a live session (``watch --nproc``) gives its passes their first poses: what rank 0's
    refiner would do with a pass in a hurry (:meth:`StreamingRefiner.hurried_mode`), which it sends at each sync.

    The other ranks never run the probe, the ab initio or the class poses (rank 0's, on the whole map); their
    particles go in at these first poses and rank 0 re-poses them like its own.

    Attributes
    ----------
    network: bool
        Pose passes with the network (in rank 0's session frame); else random poses.
    network_mode, random_mode: str
        ``own`` (the pass goes in at its network or random poses, unrefined) or ``coarse`` (the global search
        alone against the reference, version :data:`COARSE`), for network and random poses.
    version: int
        The reference's map version (0: none yet).
    """

    network: bool = False
    network_mode: str = "own"
    random_mode: str = "own"
    version: int = 0

    def mode(self, network: bool) -> str:
        """``own`` or ``coarse`` for a pass posed by the network (``network``) or at random."""
        return self.network_mode if network else self.random_mode


class StreamingRefineSettings(Protocol):
    """What the streaming refiner reads of a session's settings (:class:`cryofastar.daemon.settings.DaemonSettings`).

    Attributes as documented there: ``refine``, ``refine_after``, ``repose_per_pass``,
    ``refine_box``, ``probe_every``, ``interpolation``.
    """

    refine: bool
    refine_after: int
    repose_per_pass: int
    refine_box: int
    probe_every: int
    interpolation: str


class StreamingRefiner:
    """The refinement policy of one session, pass by pass (module docstring).

    Parameters
    ----------
    settings: StreamingRefineSettings
        The session's settings.
    device: torch.device
        Where matching and ab initio run.
    poses_from: str
        Where the session's poses come from: ``network``, ``map-only`` (the effective
        source: ``map-only`` also when the network could not be loaded) or ``classes``.
    """

    def __init__(self, settings: StreamingRefineSettings, device: torch.device, poses_from: str = "network") -> None:
        self.settings = settings
        self.device = device
        self.poses_from = poses_from
        self.reference: RefinementReference | None = None
        self.reference_source: tuple[torch.Tensor, float, float] | None = None
        """(half maps `(2, B, B, B)`, Å/px, FSC resolution Å) the reference was made from (sent to other ranks)."""
        self.version = 0
        self._passes = 0
        self._probes: collections.deque[float] = collections.deque(maxlen=4)  # network win fraction per probe
        self.search = RefineSettings(working_box=settings.refine_box)
        self.reference_particles = 0  # particles in the map the reference was made from
        self.phase = "waiting" if settings.refine else "off"
        self.ab: AbInitio | None = None
        self.ab_settings = AbInitioSettings()
        self.ab_verdict: AbInitioVerdict | None = None  # the last bootstrap's verdict
        self._ab_attempts = 0  # bootstraps run
        self._retry_seed: int | None = None  # seed set of the next attempt after a negative verdict
        self._bootstrapping: AbInitioSettings | None = None  # the settings of a bootstrap handed out, not finished
        self._soft: SoftPoses | None = None  # per pose-table row (rows with _has_soft)
        self._has_soft = np.zeros(0, dtype=bool)
        self._final_band_version: int | None = None  # first ab step at the final band
        self._sweep: list[torch.Tensor] = []  # how far re-posed particles moved since new particles came
        self._swept = 0
        self.converged = False
        self.class_poses: dict | None = None  # what the class poses and their probe found (classes sessions)
        self._classes_since: float | None = None  # time.monotonic() the session began waiting for classes

    def wants_reference(self, n_particles: int) -> bool:
        """Whether the map should be published now to become a (first or fresher) reference."""
        if not self.settings.refine or n_particles < self.settings.refine_after or self.phase in ("ab-initio",
                                                                                                    "classes"):
            return False
        return self.reference is None or n_particles >= 1.25 * self.reference_particles

    def note_new_particles(self) -> None:
        """New particles arrived: the map changes, idle re-posing is worth doing again."""
        self._sweep, self._swept, self.converged = [], 0, False

    def note_moves(self, degrees: torch.Tensor, n_particles: int) -> None:
        """Record how far re-posed particles moved; a whole sweep under CONVERGED_DEGREES: converged.

        Only in the ``local`` phase: the ab initio goes on until its own end (:meth:`maybe_finish_ab_initio`).
        """
        if self.phase != "local":
            return
        self._sweep.append(degrees.float())
        self._swept += len(degrees)
        if self._swept >= n_particles:
            moved = float(torch.cat(self._sweep).median())
            self.converged = moved < CONVERGED_DEGREES
            logger.info("re-posing sweep over %d particles: median move %.2f°%s", self._swept, moved,
                        " (converged)" if self.converged else "")
            self._sweep, self._swept = [], 0
    @property
    def active(self) -> bool:
        """Whether new passes are refined (the map reached ``refine_after`` particles)."""
        return self.phase not in ("waiting", "off", "classes") and (self.reference is not None
                                                                    or self.phase == "ab-initio")

    @property
    def network_informative(self) -> bool | None:
        """Whether recent probes found the network's poses the better start (``None``: no probe yet)."""
        if not self._probes:
            return None
        return is_informative(self._probes)

    def update_reference(self, half_volumes: torch.Tensor, apix: float, resolution_angstrom: float,
                         n_particles: int) -> None:
        """Take a new map as the reference (``(2, B, B, B)`` half maps), once it holds enough particles."""
        if not self.settings.refine or n_particles < self.settings.refine_after:
            return
        self.reference = RefinementReference(half_volumes, apix, resolution_angstrom, self.search, self.device)
        self.reference_source = (half_volumes, float(apix), float(resolution_angstrom))
        self.reference_particles = n_particles
        self.version += 1
        if self.phase == "waiting":
            self.phase = {"map-only": "ab-initio", "classes": "classes"}.get(self.poses_from, "probe")
            if self.phase == "classes":
                self._classes_since = time.monotonic()
        logger.info("refinement reference v%d: %d particles, %.1f Å (band %.3f cycles/px at %d px)", self.version,
                    n_particles, resolution_angstrom, self.reference.local_band, self.reference.work)

    def _mode(self, network: bool) -> str:
        """How the next pass is matched: ``best`` (the probe of network poses), ``local`` or ``global``."""
        if not network:
            return "global"
        if self.phase == "probe":
            return "best"
        if self.poses_from != "network":
            return "global"
        if self.network_informative:
            return "best" if self._passes % self.settings.probe_every == 0 else "local"
        return "best"  # an uninformative network's poses come only to be probed (wants_network_poses)

    def wants_network_poses(self, calls: int) -> bool:
        """Whether the network should pose the next pass (the poser asks; a hint read without a lock, so a
        stale answer costs one pass its network poses or an unneeded forward pass, nothing else).

        Its poses are used before refinement starts and by the probe, by local refinement while the network
        is informative, and every ``probe_every``-th pass (``calls`` counts the poser's passes) to probe an
        uninformative network again; never while the ab initio or the class poses pose the session.
        """
        if self.poses_from != "network" or self.phase in ("off", "waiting", "probe"):
            return self.poses_from == "network"
        if self.phase == "local":
            return bool(self.network_informative) or calls % self.settings.probe_every == 0
        return False

    def hurried_mode(self, network: bool) -> str:
        """How a pass in a hurry is posed outside the probe and the ab initio: ``own`` (its network or random
        poses, unrefined) or ``coarse`` (the global search alone). ``network``: its poses are the network's.

        Its own poses before refinement starts, during the probe, while the ab initio's schedule runs and when
        the network is informative; else the coarse search of the reference.
        """
        if not self.active or self.reference is None or self.phase == "probe":
            return "own"
        if self.phase == "ab-initio":
            return "coarse" if self._final_band_version is not None else "own"
        if network and self.phase == "local" and self.network_informative:
            return "own"
        return "coarse"

    def rank_policy(self) -> RankPolicy:
        """What the other ranks of a live session need to pose their passes now (:class:`RankPolicy`)."""
        network = self.poses_from == "network" and (self.phase in ("off", "waiting", "probe") or (
            self.phase == "local" and bool(self.network_informative)))
        return RankPolicy(network, self.hurried_mode(True), self.hurried_mode(False),
                          self.version if self.reference is not None else 0)

    @property
    def needs_bootstrap(self) -> bool:
        """Whether the ab initio must be started (on the map's oldest particles) before the next step."""
        return self.phase == "ab-initio" and self.ab is None and self._bootstrapping is None

    def retry_due(self, n_particles: int) -> bool:
        """Whether ab initio, whose verdict was negative, should start again now (policy: a doubled seed set).

        True once the map holds the larger seed set, while ab initio is still the phase.
        """
        return (self.phase == "ab-initio" and self._retry_seed is not None and self.ab is not None
                and self._bootstrapping is None and n_particles >= self._retry_seed)

    @property
    def seed_particles(self) -> int:
        """Particles the next ab initio bootstrap runs on."""
        return self._retry_seed or AbInitioSettings().seed_particles

    def _working(self, images: torch.Tensor) -> torch.Tensor:
        return images_to_working_box(images, min(self.settings.refine_box, images.shape[-1]))

    def bootstrap_work(self, images: torch.Tensor, half_sets: torch.Tensor, ctf: CtfParams | None,
                       apix: float, check: Callable[[], None] | None = None) -> Callable[[], AbInitioResult]:
        """The ab initio start on particles already in the map (`(n, B, B)` images at the session box, pixel size
        ``apix`` Å), as a function that touches no state of the refiner: the daemon runs it in a worker thread
        (:class:`~cryofastar.engine.background_step.BackgroundStep`) while new particles go on into the map, then
        hands its result to :meth:`finish_bootstrap`. Until then :attr:`needs_bootstrap` and :meth:`retry_due`
        are false (one bootstrap at a time). ``check`` is called after each of its passes; what it raises
        stops the run (:meth:`~cryofastar.engine.background_step.BackgroundStep.check`)."""
        small = self._working(images)
        apix_work = apix * images.shape[-1] / small.shape[-1]
        attempts = list(ab_initio_attempts(AbInitioSettings(interpolation=self.settings.interpolation),
                                           max(len(images), self.seed_particles)))
        settings = attempts[min(self._ab_attempts, len(attempts) - 1)]
        seed, device = 1000 * self._ab_attempts, self.device
        self._bootstrapping = settings
        callback = None if check is None else (lambda *_: check())
        return lambda: run_ab_initio(small, half_sets, apix_work, passes=1, ctf=ctf, settings=settings, seed=seed,
                                     device=device, callback=callback)

    def finish_bootstrap(self, result: AbInitioResult | None, rows: np.ndarray) -> RefinedPoses | None:
        """Take a finished bootstrap (:meth:`bootstrap_work`) on pose-table ``rows``: its poses (to move those
        rows to) and its state for the passes and re-posing that follow. ``None`` (the bootstrap failed): the
        session goes on with global search instead (phase ``local``), and ``None`` is returned."""
        settings, self._bootstrapping = self._bootstrapping, None
        if result is None or settings is None:
            self.phase = "local"
            return None
        self.ab_settings = settings
        self.ab = result.ab_initio
        self._has_soft[:] = False  # a new ab initio holds only these rows; the others are added to it when re-posed
        self.ab_verdict = result.verdict
        self._ab_attempts += 1
        more = self._ab_attempts < AB_INITIO_ATTEMPTS and not result.verdict.converged
        self._retry_seed = 2 * self.ab_settings.seed_particles if more else None
        self.version += 1
        logger.info("ab initio bootstrapped on %d particles in %.1f s (band %.1f Å): %s", len(rows), result.seconds,
                    self.ab.resolution_angstrom, result.verdict.summary())
        if more:
            logger.warning("ab initio did not converge; it starts again on %d particles once the map holds them",
                           self._retry_seed)
        return self._soft_result(result.poses, rows)

    @property
    def bootstrapping(self) -> bool:
        """Whether a bootstrap was handed out (:meth:`bootstrap_work`) and not yet finished."""
        return self._bootstrapping is not None

    def _soft_result(self, soft: SoftPoses, rows: np.ndarray | None) -> RefinedPoses:
        if rows is not None:
            self.record_soft(rows, soft)
        return RefinedPoses(soft.rotations, soft.origins_angstrom, soft.scores, soft.spread_degrees, "ab-initio",
                            self.version, soft)

    def record_soft(self, rows: np.ndarray, soft: SoftPoses) -> None:
        """Keep the ab initio's soft poses of pose-table ``rows`` (needed to re-pose them)."""
        needed = int(rows.max()) + 1 if len(rows) else 0
        if self._soft is None or len(self._soft) < needed:
            grown = SoftPoses.empty(max(needed, 2 * (0 if self._soft is None else len(self._soft))),
                                    soft.candidate_weights.shape[1])
            if self._soft is not None:
                grown.set(torch.arange(len(self._soft)), self._soft)
            self._soft = grown
            self._has_soft = np.concatenate([self._has_soft, np.zeros(len(grown) - len(self._has_soft), bool)])
        self._soft.set(torch.as_tensor(rows), soft)
        self._has_soft[rows] = True

    def refine(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
               origins_angstrom: torch.Tensor, ctf: CtfParams | None = None, network: bool = True,
               hurry: bool = False) -> RefinedPoses | None:
        """Pose or refine one pass's particles (`(n, B, B)` images at the session box; module docstring).

        ``network``: ``rotations`` are the network's poses (else random ones: the pass is searched globally).
        ``hurry`` (particles wait behind this pass): only a first pose, the rest is left to re-posing — the
        network's poses as they are when it is informative (``None`` is returned: the pass goes in unrefined),
        else the global search alone (``coarse``, version :data:`COARSE`); in the ab-initio phase the ab initio
        poses the pass until its schedule has run out, then the global search alone against the latest map.
        In the ab-initio phase the returned ``soft`` poses must be handed to
        :meth:`record_soft` with the particles' pose-table rows once they are inserted.
        """
        if self.phase == "ab-initio" and not (hurry and self._final_band_version is not None
                                              and self.reference is not None):
            assert self.ab is not None
            self._passes += 1
            return self._soft_result(self.ab.add(self._working(images), half_sets, ctf), None)
        # (in a hurry once the ab initio's schedule has run out: a coarse search of the map its poses make, and
        # the ab initio poses the pass again when it is re-posed, before the phase ends)
        assert self.reference is not None
        mode = self._mode(network)
        if hurry and self.phase != "probe":  # the session's first probe decides its course: never skipped
            if self.hurried_mode(network) == "own":
                return None  # the informative network's poses, refined when re-posed (no periodic probe in a hurry)
            mode = "coarse"
        self._passes += 1
        match, origins = self.reference.match(images, half_sets, rotations if network else None, origins_angstrom,
                                              mode, ctf)
        if mode == "best":  # which start won: the network's neighbourhood or the global search
            won = network_won_fraction(match.rotations, rotations, self.search.local_range_degrees)
            self._probes.append(won)
            logger.info("probe: the network's poses were the better start for %.0f%% of %d particles", 100 * won,
                        len(images))
            if self.phase == "probe":
                self.phase = "local" if self.network_informative else "ab-initio"
                logger.info("the network is %sinformative: %s", "" if self.network_informative else "not ",
                            "refining its poses locally" if self.phase == "local" else "map-only ab initio")
        return RefinedPoses(match.rotations, origins, match.scores, match.spread_degrees, mode,
                            COARSE if mode == "coarse" else self.version)

    @property
    def wants_class_views(self) -> bool:
        """Whether the session waits for a settled 2D class set to pose its particles by (module docstring)."""
        return self.phase == "classes"

    def classes_overdue(self, now: float | None = None) -> bool:
        """Whether the session has waited for settled classes longer than ``CLASS_POSES_WAIT_SECONDS``."""
        return (self.phase == "classes" and self._classes_since is not None
                and (time.monotonic() if now is None else now) - self._classes_since > CLASS_POSES_WAIT_SECONDS)

    def start_class_poses(self) -> int:
        """A new map version for the particles moved to their class poses (returned)."""
        self.version += 1
        return self.version

    def class_probe_work(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
                         origins_angstrom: torch.Tensor, ctf: CtfParams | None,
                         check: Callable[[], None] | None = None) -> Callable[[], ClassProbe]:
        """The ``best`` probe of class-posed particles against the map they make, and the confirmation, as a
        function to run in a worker thread; :meth:`finish_class_probe` takes its result and decides the phase.

        `(n, B, B)` images at the session box, `(n,)` half sets, `(n, 3, 3)` class poses and `(n, 2)` origins
        (Å); the reference must be the map of the class poses (:meth:`update_reference`); nothing else uses it
        meanwhile (the session waits in the ``classes`` phase). Informative poses must also be confirmed by one
        random ab initio start on the same particles (policy, :func:`~cryofastar.recon.ab_initio.confirm_poses`).
        ``check`` is called between its steps; what it raises stops it.
        """
        assert self.reference is not None and self.phase == "classes"
        reference, local_range = self.reference, self.search.local_range_degrees
        check = check or (lambda: None)

        def probe() -> ClassProbe:
            parts = []
            for first in range(0, len(images), PROBE_CHUNK):  # chunks: a stop request is heard between them
                check()
                at = slice(first, first + PROBE_CHUNK)
                parts.append(reference.match(images[at], half_sets[at], rotations[at], origins_angstrom[at], "best",
                                             None if ctf is None else ctf[at]))
            matches = [m for m, _ in parts]
            poses = RefinedPoses(torch.cat([m.rotations for m in matches]), torch.cat([o for _, o in parts]),
                                 torch.cat([m.scores for m in matches]), torch.cat([m.spread_degrees for m in matches]),
                                 "best", 0)
            won = network_won_fraction(poses.rotations, rotations, local_range)
            informative = is_informative(won)
            confirmation = self._confirm(images, half_sets, poses.rotations, ctf, reference,
                                         lambda *_: check()) if informative else None
            return ClassProbe(poses, won, informative, confirmation, len(images))

        return probe

    def finish_class_probe(self, probe: ClassProbe, record: dict) -> RefinedPoses:
        """Take a finished probe (:meth:`class_probe_work`): ``record`` (classes posed, particles moved, class set)
        is kept in :attr:`class_poses` with the probe's and the confirmation's figures. Informative and confirmed:
        ``local`` (the next published map becomes the reference); else ``ab-initio``. Returns the probed
        particles' poses (the better of the class pose's neighbourhood and a global search, per particle)."""
        self.class_poses = {**record, "probed": probe.particles, "won_fraction": probe.won,
                            "informative": probe.informative}
        logger.info("class poses: their neighbourhood was the better start for %.0f%% of %d particles%s",
                    100 * probe.won, probe.particles, "" if probe.informative else ": map-only ab initio")
        used = probe.informative
        if probe.confirmation is not None:
            self.class_poses["confirmation"] = probe.confirmation.as_dict()
            used = probe.confirmation.agree
            logger.info("class poses: %s: %s", probe.confirmation.summary(),
                        "refining them locally" if used else "map-only ab initio")
        self.class_poses["used"] = used
        self.phase = "local" if used else "ab-initio"
        if used:
            self.reference = None  # the next published map (of the probed poses) becomes the reference
        probe.poses.version = self.version
        return probe.poses

    def _confirm(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
                 ctf: CtfParams | None, reference: RefinementReference, callback) -> PoseConfirmation:  # noqa: ANN001
        """One random ab initio start on these particles (session box) against their ``rotations`` (policy)."""
        small = self._working(images)
        return confirm_poses(small, half_sets, reference.apix * images.shape[-1] / small.shape[-1], rotations,
                             ctf, AbInitioSettings(interpolation=self.settings.interpolation), seed=CONFIRM_SEED_OFFSET,
                             device=self.device, callback=callback)

    def give_up_classes(self, why: str, record: dict | None = None) -> None:
        """No class poses to use (the 2D lane failed, posing failed, or the two decoder starts disagree, with
        their ``record``): map-only ab initio instead."""
        if self.phase == "classes":
            logger.warning("no class poses (%s): map-only ab initio instead", why)
            self.class_poses = {**(record or {}), "error": why, "informative": False, "used": False}
            self.phase = "ab-initio"

    def repose(self, images: torch.Tensor, half_sets: torch.Tensor, rotations: torch.Tensor,
               origins_angstrom: torch.Tensor, ctf: CtfParams | None = None,
               rows: np.ndarray | None = None, mode: str = "local") -> RefinedPoses:
        """Re-pose particles already in the map (pose-table ``rows``): ab initio, or ``mode`` (``local``, or
        ``global`` for particles never refined in a session without a network) against the reference."""
        if self.phase == "ab-initio":
            assert self.ab is not None and rows is not None
            small = self._working(images)
            known = self._has_soft[rows] if len(self._has_soft) > int(rows.max()) else np.zeros(len(rows), bool)
            soft = SoftPoses.empty(len(rows), self.ab_settings.top_k)
            halves = torch.as_tensor(half_sets)
            for mask, again in ((known, True), (~known, False)):  # two groups, not a loop over particles
                if mask.any():
                    where = torch.as_tensor(np.nonzero(mask)[0])
                    part_ctf = None if ctf is None else ctf[where]
                    soft.set(where, self.ab.repose(small[where], halves[where], self._soft[torch.as_tensor(
                        rows[mask])], part_ctf) if again else self.ab.add(small[where], halves[where], part_ctf))
            self.version += 1  # every ab step is a new map: particles least recently posed go first
            if self._final_band_version is None and self.ab.poses_done >= self.ab_settings.schedule_particles:
                self._final_band_version = self.version  # the band is as fine as the schedule and the FSC allow
            return self._soft_result(soft, rows)
        assert self.reference is not None
        match, origins = self.reference.match(images, half_sets, rotations, origins_angstrom, mode, ctf)
        return RefinedPoses(match.rotations, origins, match.scores, match.spread_degrees, mode, self.version)

    def maybe_finish_ab_initio(self, refined: np.ndarray) -> bool:
        """Move from ``ab-initio`` to ``local`` once every particle was posed after the schedule ran out."""
        if self.phase != "ab-initio" or self._final_band_version is None or len(refined) == 0:
            return False
        if int(refined.min()) < self._final_band_version:
            return False
        logger.info("ab initio done (band %.1f Å): local refinement against the half maps from now on",
                    self.ab.resolution_angstrom if self.ab else float("nan"))
        self.phase, self.ab, self._soft, self._has_soft = "local", None, None, np.zeros(0, dtype=bool)
        self.reference = None  # the next published map becomes the reference
        self.converged = False
        return True

    def pick_stale(self, refined: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """Rows (into the pose table) to re-pose now: at most ``repose_per_pass`` (module docstring).

        ``refined`` `(n,)` map version each particle was last matched against (0: never);
        ``spread`` `(n,)` its angular spread (NaN: unknown, taken as largest).
        """
        stale = np.nonzero(refined < self.version)[0]
        if len(stale) == 0 or self.settings.repose_per_pass == 0:
            return stale[:0]
        uncertainty = np.where(np.isfinite(spread[stale]), spread[stale], np.inf)
        order = np.lexsort((stale, -uncertainty, refined[stale]))  # last key first: oldest map, least sure, oldest
        return stale[order[: self.settings.repose_per_pass]]


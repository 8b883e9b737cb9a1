"""Offline map-only ab initio over a particle set held in memory (:func:`run_ab_initio`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..accumulator import HalfSetAccumulator
from ..ctf import CtfParams
from ..particle_diameter import estimate_particle_diameter
from ..pose_alignment import pose_agreement
from ..rotations import geodesic_degrees
from .settings import AbInitioSettings
from .soft_poses import SoftPoses
from .streaming import AbInitio

__all__ = ["AbInitioResult", "AbInitioVerdict", "run_ab_initio"]


@dataclass
class AbInitioVerdict:
    """Did ab initio converge? The verdict and its evidence.

    Ab initio is judged converged when two independent random starts of the seed stage
    found the same structure: their poses of the same seed particles agree after one
    global rotation and hand (median angle at most ``agreement_degrees``), allowing for an
    unknown Cn symmetry of the map (:func:`~cryofastar.recon.pose_alignment.pose_agreement`). A wrong start
    settles in a self-consistent map of its own (its half maps agree, its scores look
    fine); two wrong starts rarely settle in the same one. The scores of the restarts are
    recorded but are not the verdict: they are not comparable across molecules.

    Attributes
    ----------
    converged: bool
        Two restarts agreed.
    restarts: int
        Seed stages run.
    kept: int
        Which restart (1-based) was kept: the best-scoring of the agreeing ones (of all, if none agreed).
    agreement_degrees: float
        The smallest median angle between two restarts' poses after alignment (``nan`` with one restart).
    scores: list[float]
        Each restart's mean best score of the seed set at the shared band.
    pair_degrees: dict[str, float]
        ``"i-j"`` -> median angle between restarts i and j (1-based).
    particle_diameter_angstrom: float
        The diameter the schedule was tied to (given or estimated, Å).
    symmetry_order: int | None
        When converged: the cyclic symmetry the agreement needed (1: the starts gave the same
        poses; n: the same up to a Cn symmetry of the map, whose particles took different
        equivalent poses in the two starts).
    """

    converged: bool
    restarts: int
    kept: int
    agreement_degrees: float
    scores: list[float]
    pair_degrees: dict[str, float]
    particle_diameter_angstrom: float
    symmetry_order: int | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able dict (``None`` for a non-finite ``agreement_degrees``)."""
        out = asdict(self)
        out["agreement_degrees"] = self.agreement_degrees if math.isfinite(self.agreement_degrees) else None
        return out

    def summary(self) -> str:
        """One line for logs and status messages."""
        diameter = f"particle diameter {self.particle_diameter_angstrom:.0f} Å"
        if self.converged:
            symmetric = f", up to C{self.symmetry_order}" if self.symmetry_order and self.symmetry_order > 1 else ""
            return (f"converged: 2 of {self.restarts} random starts agree "
                    f"(median {self.agreement_degrees:.1f}°{symmetric}); {diameter}")
        return (f"NOT converged: no 2 of {self.restarts} random starts agree (closest pair "
                f"{self.agreement_degrees:.0f}°); {diameter}")


@dataclass
class AbInitioResult:
    """What :func:`run_ab_initio` returns.

    Attributes
    ----------
    poses: SoftPoses
        Final poses of every particle (input order).
    ab_initio: AbInitio
        The state (internal working-box maps), e.g. to continue streaming.
    accumulator: HalfSetAccumulator
        Full-box half maps built from the best poses (hard assignment).
    verdict: AbInitioVerdict
        Whether ab initio converged, with its evidence.
    seconds: float
        Wall time of the passes (without the final full-box insertion).
    history: list[dict]
        Per pass: its label, the band and the internal half-map FSC 0.143 resolution (Å),
        seconds since the start (seed passes: also the median change of the best
        orientations, degrees).
    """

    poses: SoftPoses
    ab_initio: AbInitio
    accumulator: HalfSetAccumulator
    verdict: AbInitioVerdict
    seconds: float
    history: list[dict] = field(default_factory=list)


def run_ab_initio(images: torch.Tensor, half_sets: torch.Tensor, apix: float, passes: int = 3,
                  ctf: CtfParams | None = None, settings: AbInitioSettings | None = None, seed: int = 0,
                  device: torch.device | str = "cpu", interpolation: str = "trilinear",
                  callback: Callable[[str, SoftPoses, torch.Tensor], None] | None = None) -> AbInitioResult:
    """Offline map-only ab initio over a particle set held in memory.

    *Seed:* a random subset of ``settings.seed_particles`` is added, then re-posed
    at least ``settings.seed_passes - 1`` times and until the median change of the best
    orientations in a pass is at most ``settled_change_degrees`` (at most
    ``max_seed_passes`` passes in all): a thousand particles suffice for a low
    resolution map, and each pass over few particles is one cheap EM step. The seed
    stage runs from other random starts until two agree (at least ``seed_restarts``, at
    most ``max_seed_restarts``); of the agreeing ones, the one whose maps match the seed set
    best (mean best score at ``shared_resolution_angstrom``) is kept, and the agreement is
    the verdict (:class:`AbInitioVerdict`). Before it, unless the settings give the
    particle's diameter, it is estimated from (at most 2,000 of) the images, and the
    schedule is tied to it (:meth:`AbInitioSettings.resolved`). *Passes:*
    the other particles are added (pass 1), then all are re-posed ``passes - 1`` times.
    Orders are random; every step goes minibatch by minibatch. (With no more particles
    than the seed subset, the seed stage alone runs, ``max(seed_passes, passes)`` times.)
    Finally the particles are inserted at their best poses into a full-box accumulator.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles [y, x], centre ``B // 2``.
    half_sets: torch.Tensor
        `(n,)` 1 or 2.
    apix: float
        Pixel size (Å).
    passes: int
        Passes over all the data after the seed stage (>= 1).
    ctf: CtfParams | None
        Per-particle CTF, or ``None``.
    settings: AbInitioSettings | None
        See :class:`AbInitioSettings`.
    seed: int
        Seed of the random start and of the particle order.
    device: torch.device | str
        Where to compute.
    interpolation: str
        Insertion of the full-box accumulator returned.
    callback: Callable[[str, SoftPoses, torch.Tensor], None] | None
        Called after each pass with its label (``"seed 2"``, ``"pass 1/3"``), the poses
        so far and the `(n,)` bool mask of particles posed so far (progress, benchmarks;
        its time counts in ``seconds``).

    Returns
    -------
    AbInitioResult
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    settings = settings or AbInitioSettings()
    run = _Run(images, torch.as_tensor(half_sets).long().cpu(), ctf, settings, seed, callback)
    everyone = torch.randperm(run.n, generator=run.order_generator)
    seed_set = everyone[: min(run.n, settings.seed_particles)]
    seed_passes = settings.seed_passes if seed_set.numel() < run.n else max(settings.seed_passes, passes)
    run.settings = settings = run.with_diameter(everyone, apix)
    state, verdict = run.seed_stage(seed_set, seed_passes, apix, device)
    if seed_set.numel() < run.n:
        run.step(state, f"pass 1/{passes}", everyone[seed_set.numel():], new=True)
        for p in range(1, passes):
            run.step(state, f"pass {p + 1}/{passes}", everyone, new=False)
    seconds = time.perf_counter() - run.start
    acc = HalfSetAccumulator(images.shape[-1], apix, interpolation=interpolation, device=device)
    acc.add(images, run.poses.rotations, run.poses.origins_angstrom, run.halves, ctf=ctf)
    return AbInitioResult(run.poses, state, acc, verdict, seconds, run.history)


class _Run:
    """The particles of one :func:`run_ab_initio`, their poses so far and its history (internal)."""

    def __init__(self, images: torch.Tensor, halves: torch.Tensor, ctf: CtfParams | None, settings: AbInitioSettings,
                 seed: int, callback: Callable[[str, SoftPoses, torch.Tensor], None] | None) -> None:
        self.images, self.halves, self.ctf, self.settings = images, halves, ctf, settings
        self.seed, self.callback = seed, callback
        self.n = images.shape[0]
        self.order_generator = torch.Generator().manual_seed(seed + 1)
        self.poses = SoftPoses.empty(self.n, settings.top_k)
        self.seen = torch.zeros(self.n, dtype=torch.bool)
        self.history: list[dict] = []
        self.start = time.perf_counter()

    def step(self, state: AbInitio, label: str, members: torch.Tensor, new: bool) -> None:
        """Add (``new``) or re-pose ``members`` in a random order, minibatch by minibatch; record the step."""
        order = members[torch.randperm(members.numel(), generator=self.order_generator)]
        sub_ctf = None if self.ctf is None else self.ctf[order]
        if new:
            result = state.add(self.images[order], self.halves[order], sub_ctf)
            self.seen[order] = True
        else:
            result = state.repose(self.images[order], self.halves[order], self.poses[order], sub_ctf)
        self.poses.set(order, result)
        self.history.append({"stage": label, "band_angstrom": state.resolution_angstrom,
                             "half_map_fsc_angstrom": state.half_map_resolution_angstrom,
                             "seconds": time.perf_counter() - self.start})
        if self.callback is not None:
            self.callback(label, self.poses, self.seen.clone())

    def with_diameter(self, everyone: torch.Tensor, apix: float) -> AbInitioSettings:
        """The settings, with the particle's diameter measured on (at most) 2,000 of ``everyone`` if not given."""
        if self.settings.particle_diameter_angstrom is not None:
            return self.settings
        sample = everyone[:2000]
        diameter = estimate_particle_diameter(self.images[sample], apix, None if self.ctf is None else self.ctf[sample])
        return replace(self.settings, particle_diameter_angstrom=diameter)

    def seed_start(self, seed_set: torch.Tensor, seed_passes: int, apix: float, device: torch.device | str,
                   restart: int) -> tuple[float, AbInitio, SoftPoses]:
        """One random start of the seed stage (restart number ``restart``, 0-based): its score, state and poses.

        The seed set is added, then re-posed at least ``seed_passes - 1`` times and until the median change
        of the best orientations is at most ``settled_change_degrees`` (``max_seed_passes`` in all at most).
        The score is the seed set's mean best score at the shared band (comparable between restarts).
        """
        s = self.settings
        state = AbInitio(self.images.shape[-1], apix, s, seed=self.seed + 7919 * restart, device=device)
        prefix = f"restart {restart + 1} "
        self.step(state, f"{prefix}seed 1", seed_set, new=True)
        p = 1
        while True:  # at least seed_passes, then until the poses settle (or max_seed_passes)
            before = self.poses.rotations[seed_set].clone()
            p += 1
            self.step(state, f"{prefix}seed {p}", seed_set, new=False)
            change = float(geodesic_degrees(before, self.poses.rotations[seed_set]).median())
            self.history[-1]["median_change_degrees"] = change
            if p >= seed_passes and (change <= s.settled_change_degrees or p >= s.max_seed_passes):
                break
        check = state.match(self.images[seed_set], self.halves[seed_set],
                            None if self.ctf is None else self.ctf[seed_set],
                            resolution_angstrom=state.settings.shared_resolution_angstrom)
        score = float(check.scores.mean())
        self.history[-1]["restart_score"] = score
        return score, state, self.poses[seed_set]

    def seed_stage(self, seed_set: torch.Tensor, seed_passes: int, apix: float,
                   device: torch.device | str) -> tuple[AbInitio, AbInitioVerdict]:
        """Seed stages from random starts until two agree (:class:`AbInitioSettings`); the kept one and the verdict."""
        s = self.settings
        runs: list[tuple[float, AbInitio, SoftPoses]] = []  # (score at the shared band, state, seed-set poses)
        pairs: dict[tuple[int, int], float] = {}  # (i, j) -> median angle between the restarts' poses
        agreeing: list[tuple[int, int]] = []
        orders: dict[tuple[int, int], int] = {}  # agreeing pair -> the cyclic symmetry the agreement needed
        while len(runs) < max(1, s.max_seed_restarts):
            restart = len(runs)
            runs.append(self.seed_start(seed_set, seed_passes, apix, device, restart))
            for j in range(restart):
                agreement = pose_agreement(runs[restart][2].rotations, runs[j][2].rotations, s.agreement_degrees)
                pairs[(j, restart)] = agreement.median_degrees
                if agreement.agree:
                    agreeing.append((j, restart))
                    orders[(j, restart)] = agreement.order
            if agreeing and len(runs) >= s.seed_restarts:
                break
        members = sorted({i for pair in agreeing for i in pair}) or list(range(len(runs)))
        kept = max(members, key=lambda i: runs[i][0])
        self.poses.set(seed_set, runs[kept][2])
        verdict = AbInitioVerdict(
            converged=bool(agreeing), restarts=len(runs), kept=kept + 1,
            agreement_degrees=min(pairs.values()) if pairs else float("nan"),
            symmetry_order=min(orders.values()) if orders else None,
            scores=[r[0] for r in runs], pair_degrees={f"{i + 1}-{j + 1}": d for (i, j), d in pairs.items()},
            particle_diameter_angstrom=float(runs[kept][1].settings.particle_diameter_angstrom))
        return runs[kept][1], verdict

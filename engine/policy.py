"""The refinement policy shared by the offline job and the daemon (docs/refinement.md).

One place for each rule, so that ``reconstruct`` and ``watch`` decide alike:

- **Is the network informative?** A ``best`` probe matches particles both around the
  network's poses and by a global search and keeps the better per particle; the network
  is informative when its neighbourhood won (the kept pose lies within
  ``NEIGHBOURHOOD_RANGES`` local search ranges of the network's) for at least
  ``INFORMATIVE_FRACTION`` of the particles. Otherwise poses come from map-only ab initio.
  Class poses (``--poses-from classes``) must first pass their own verdict (two decoder
  starts agree, ``CLASS_AGREEMENT_DEGREES``), then are judged the same way: offline on every particle,
  live on up to ``CLASS_PROBE_PARTICLES`` of the map's once the 2D classes have settled
  (map-only ab initio when they have not within ``CLASS_POSES_WAIT_SECONDS``).
- **Class poses judged informative are confirmed**: one random start of ab initio's seed
  stage on ``CONFIRM_PARTICLES`` of the particles (live: the probed ones) must find the
  same structure (ab initio's own agreement rule,
  :func:`~cryofastar.recon.ab_initio.confirm_poses`); else map-only ab initio replaces them.
  The decoder can be wrong in a self-consistent way (its two starts agree, its map matches
  its particles: a Cn oligomer's common lines are n-fold ambiguous); a random start shares
  none of its errors. (The network's poses are not confirmed: it is not informative on
  unseen molecules, and the probe already sends it to ab initio.)
- **Ab initio that did not converge is run again** (``AB_INITIO_ATTEMPTS``): when no two
  random starts of its seed stage agree (its verdict, :class:`AbInitioVerdict`), the next
  attempt has a seed set twice as large (more signal per map update, as low SNR needs).
- **Ab initio's passes**: the offline job runs ``AB_INITIO_PASSES`` passes over all
  particles after the seed stage; its poses are capped at ab initio's own small box, so at
  least ``MIN_LOCAL_ROUNDS_AFTER_AB_INITIO`` local round always follows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import torch
from cryofastar.recon.ab_initio import AbInitioSettings
from cryofastar.recon.rotations import geodesic_degrees

__all__ = ["AB_INITIO_ATTEMPTS", "AB_INITIO_PASSES", "CLASS_AGREEMENT_DEGREES", "CLASS_POSES_WAIT_SECONDS",
           "CLASS_PROBE_PARTICLES", "CONFIRM_PARTICLES", "CONFIRM_SEED_OFFSET", "INFORMATIVE_FRACTION",
           "MIN_LOCAL_ROUNDS_AFTER_AB_INITIO", "NEIGHBOURHOOD_RANGES", "POSE_SOURCES", "ab_initio_attempts",
           "check_pose_source", "confirmation_rows", "is_informative", "network_won_fraction", "random_rows"]

INFORMATIVE_FRACTION = 0.5
"""The network is informative when its neighbourhood wins the ``best`` probe for at least this fraction."""
NEIGHBOURHOOD_RANGES = 1.5
"""A ``best`` pose within this many local search ranges of the network's counts as the network's win."""
AB_INITIO_PASSES = 2
"""Offline: passes over all particles after ab initio's seed stage (as bench/bench_ab_initio.py measures it)."""
MIN_LOCAL_ROUNDS_AFTER_AB_INITIO = 1
"""Ab initio's poses are capped at its own small box: at least this many local rounds follow it."""
AB_INITIO_ATTEMPTS = 2
"""Ab initio runs at most this many times; each attempt after a negative verdict doubles the seed set."""
CLASS_AGREEMENT_DEGREES = AbInitioSettings().agreement_degrees
"""Class poses are trusted when two decoder starts agree within this median angle: ab initio's rule for two random
starts (:func:`~cryofastar.recon.pose_alignment.pose_agreement`)."""
CLASS_PROBE_PARTICLES = 1000
"""The daemon's class poses: particles of the ``best`` probe that decides whether they are informative (offline:
every particle)."""
CONFIRM_PARTICLES = AbInitioSettings().seed_particles
"""Class poses judged informative are confirmed by one random ab initio start on this many particles (its seed set's
size: the start is as likely to converge as ab initio's own); the daemon uses the ``CLASS_PROBE_PARTICLES`` probed."""
CONFIRM_SEED_OFFSET = 555
"""The confirming start's random seed: the session's seed (offline ``--seed``; live 0) plus this, so that it shares
no random start with ab initio's own restarts."""
CLASS_POSES_WAIT_SECONDS = 600.0
"""The daemon's class poses: a session whose 2D classes have not settled this long after its map reached
``--refine-after`` particles turns to map-only ab initio (a map must not wait on the 2D lane for ever)."""
POSE_SOURCES = ("network", "map-only", "classes")
"""Where a session's first poses come from: the CryoFastAR network on particles, none (map-only ab initio), or
the geometric decoder on 2D class averages (each particle through its class)."""


def check_pose_source(poses_from: str, refine: bool, refine_box: int) -> None:
    """Raise ValueError (one line, naming the option) unless the source of poses and refinement fit together.

    ``map-only`` has no poses but refinement's; the working box ``refine_box`` (px) must be 16..512.
    """
    if poses_from not in POSE_SOURCES:
        raise ValueError(f"--poses-from must be network, map-only or classes, got {poses_from!r}")
    if poses_from == "map-only" and not refine:
        raise ValueError("--poses-from map-only needs refinement (it is the only source of poses): drop --no-refine")
    if not 16 <= refine_box <= 512:
        raise ValueError(f"--refine-box must be 16..512 px, got {refine_box}")


def network_won_fraction(matched: torch.Tensor, network: torch.Tensor, local_range_degrees: float) -> float:
    """Fraction of particles whose ``best`` pose stayed in the network's neighbourhood.

    Parameters
    ----------
    matched: torch.Tensor
        `(n, 3, 3)` RELION matrices kept by the ``best`` probe.
    network: torch.Tensor
        `(n, 3, 3)` the network's poses the probe started from.
    local_range_degrees: float
        Half-width of the local search (degrees), :attr:`RefineSettings.local_range_degrees`.
    """
    moved = geodesic_degrees(matched.double(), network.double())
    return float((moved <= NEIGHBOURHOOD_RANGES * local_range_degrees).double().mean())


def is_informative(won_fractions: float | Iterable[float]) -> bool:
    """Whether the network is informative, from one probe's won fraction or the mean of several."""
    values = [won_fractions] if isinstance(won_fractions, float | int) else list(won_fractions)
    return bool(values) and float(np.mean(values)) >= INFORMATIVE_FRACTION


def ab_initio_attempts(settings: AbInitioSettings, n_particles: int) -> Iterator[AbInitioSettings]:
    """The settings of each ab initio attempt (the caller stops at the first that converges).

    The first is ``settings``; each next one doubles the seed set (at most every particle),
    while ``n_particles`` allow a larger one (one attempt when the seed set already holds
    every particle).
    """
    seeds = [settings.seed_particles]
    while len(seeds) < AB_INITIO_ATTEMPTS and seeds[-1] < n_particles:
        seeds.append(min(2 * seeds[-1], n_particles))
    for seed in seeds:
        yield replace(settings, seed_particles=seed)


def random_rows(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted rows of ``min(n, count)`` of ``n`` particles, drawn at random and reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(n, generator=generator)[: min(n, count)].numpy())


def confirmation_rows(n: int, seed: int) -> np.ndarray:
    """Sorted rows of the ``min(n, CONFIRM_PARTICLES)`` particles (of ``n``) the confirming start runs on (random,
    reproducible from ``seed``)."""
    return random_rows(n, CONFIRM_PARTICLES, seed)

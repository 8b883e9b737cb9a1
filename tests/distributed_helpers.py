"""Worker functions of tests/test_distributed.py: they run in the processes ``engine.distributed.launch`` spawns,
which import them by name (``pythonpath = ["tests"]`` in pyproject.toml; spawned workers inherit ``sys.path``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
from cryofastar.engine import distributed as d
from cryofastar.engine.offline import (
    ReconstructSettings,
    _blocks,
    _Job,
    _match_all,
    _read_working_images,
)
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.io import ParticleSource
from cryofastar.recon.refinement import RefineSettings
from cryofastar.recon.rotations import random_rotations

BOX, APIX = 24, 3.0


def particles(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """`n` random particles: `(n, B, B)` images, `(n, 3, 3)` rotations, `(n, 2)` origins (Å), `(n,)` half sets,
    and a CTF (every rank draws the same ones)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, BOX, BOX, generator=generator)
    rotations = random_rotations(n, generator)
    origins = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 2
    halves = torch.randint(1, 3, (n,), generator=generator)
    defocus = 15_000 + 5_000 * torch.rand(n, generator=generator, dtype=torch.float64)

    def each(value: float) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.float64)

    ctf = CtfParams(defocus, defocus - 300, each(30.0), each(300.0), each(2.7), each(0.1), each(0.0))
    return images, rotations, origins, halves, ctf


def accumulate_share(n: int, unit: int) -> dict:
    """Each rank inserts its share of :func:`particles` (units of ``unit`` rows, round-robin) and all-reduces;
    also gathers a per-row array and broadcasts rank 0's object. Returns what the test compares."""
    ranks = d.Ranks.join("cpu")
    try:
        images, rotations, origins, halves, ctf = particles(n)
        rows = d.deal(d.units(np.arange(n), unit), ranks.rank, ranks.world)
        at = torch.as_tensor(rows)
        acc = HalfSetAccumulator(BOX, APIX)
        acc.add(images[at], rotations[at], origins[at], halves[at], ctf[at])
        d.all_reduce_accumulator(acc, ranks)
        gathered = d.gather_rows(ranks, rows, rotations[at])
        to_root = d.gather_rows(ranks, rows, origins[at], root_only=True)
        with d.alone(ranks):  # rank 0 alone: every core; the others keep their share of them
            alone = torch.get_num_threads()
        return {"rank": ranks.rank, "world": ranks.world, "backend": ranks.backend, "rows": rows, "alone": alone,
                "grids": acc.grids.clone(), "counts": acc.particle_counts.clone(), "gathered": gathered,
                "to_root": to_root, "broadcast": d.broadcast(ranks, {"from": ranks.rank}),
                "threads": torch.get_num_threads()}
    finally:
        ranks.leave()


def fail_on_rank(failing: int, how: str) -> int:
    """Rank ``failing`` raises (``how="raise"``) or kills itself (``"kill"``) after joining; the others wait in a
    collective that never completes (the launcher must stop them)."""
    ranks = d.Ranks.join("cpu")
    if ranks.rank == failing:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"the stack of rank {failing}'s share is unreadable")
    d.all_reduce_accumulator(HalfSetAccumulator(BOX, APIX), ranks)  # waits for the failed rank
    ranks.leave()
    return ranks.rank


def refine_round(star: Path, chunk: int, views: int) -> dict | None:
    """One back-projection and one ``local`` round of the offline job on the particles of ``star`` at their true
    poses, shared by the ranks of the group this process joins (or by one process outside a group); returns the
    gathered poses and the map on rank 0."""
    ranks = d.Ranks.join("cpu") if d.in_torchrun_environment() else d.Ranks.single("cpu")
    try:
        settings = ReconstructSettings(device="cpu", views=views, refine_box=BOX, chunk=chunk)
        source = ParticleSource.from_star(star)
        job = _Job(source, ranks.device, settings, ranks)
        job.take_share(d.deal(_blocks(job), ranks.rank, ranks.world))
        _read_working_images(job)
        table = source.table
        rotations, origins = table.rotations().double(), table.origins_angstrom().double()
        acc = job.backproject(rotations, origins)
        rotations, origins, scores, spread = _match_all(job, acc, RefineSettings(working_box=BOX), rotations, origins,
                                                        "local")
        after = job.backproject(rotations, origins)
        if not ranks.root:
            return None
        return {"rotations": rotations, "origins": origins, "scores": scores, "spread": spread,
                "volume": after.volume(), "allreduces": job.allreduces, "share": len(job.rows)}
    finally:
        ranks.leave()

"""Worker functions of tests/test_distributed.py and tests/test_rank_sync.py: they run in the processes
``engine.distributed.launch`` spawns, which import them by name (``pythonpath = ["tests"]`` in pyproject.toml;
spawned workers inherit ``sys.path``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from cryofastar.daemon.fingerprints import image_fingerprints
from cryofastar.daemon.ingest import SessionGeometry
from cryofastar.daemon.journal import IngestJournal
from cryofastar.daemon.rank_sync import (
    Command,
    Handover,
    InsertedChunk,
    RanksLost,
    announce,
    hand_over,
    lead,
    receive,
)
from cryofastar.engine import distributed as d
from cryofastar.engine.offline import (
    ReconstructSettings,
    _blocks,
    _Job,
    _match_all,
    _read_working_images,
)
from cryofastar.engine.streaming_refiner import RankPolicy
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


def reduce_share(n: int) -> dict:
    """Each rank inserts its rows of :func:`particles` (rank ``r``: rows ``r, r + world, ...``), then
    :func:`~cryofastar.engine.distributed.reduce_accumulator`; returns the grids and counts."""
    ranks = d.Ranks.join("cpu")
    try:
        images, rotations, origins, halves, ctf = particles(n)
        mine = torch.arange(ranks.rank, n, ranks.world)
        acc = HalfSetAccumulator(BOX, APIX)
        acc.add(images[mine], rotations[mine], origins[mine], halves[mine], ctf[mine])
        returned = d.reduce_accumulator(acc, ranks)
        return {"same": returned is acc, "grids": acc.grids.clone(), "counts": acc.particle_counts.clone()}
    finally:
        ranks.leave()


# ---------------------------------------------------------------------- tests/test_rank_sync.py
SYNC_STACK = "/session/Particles/a_particles.mrcs"


def start_command() -> Command:
    """The ``start`` rank 0 announces in :func:`sync_session` (a journal of two stacks, a policy, a reference)."""
    journal = IngestJournal()
    journal.add("/session/old.mrcs", np.array([1, 2, 5]))
    journal.add(SYNC_STACK, np.array([40]))
    halves = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    return Command("start", RankPolicy(True, "own", "coarse", 3), (halves, APIX, 11.5, 3), {"views": 16},
                   SessionGeometry(BOX, APIX), journal.state_dict())


def inserted_chunk(rows: torch.Tensor, n: int) -> InsertedChunk:
    """What a rank records of rows ``rows`` of :func:`particles` (``n``) inserted at their true poses."""
    images, rotations, origins, halves, ctf = particles(n)
    return InsertedChunk(np.array([SYNC_STACK] * len(rows)), rows.numpy() + 1, halves[rows], rotations[rows],
                         origins[rows], torch.full((len(rows),), 2.5), ctf[rows], {"rlnVoltage": 300.0}, None, None,
                         0, image_fingerprints(images[rows]), "/session/a_particles.star")


def sync_session(n: int) -> dict:
    """Rank 0 announces :func:`start_command`, then leads a sync, an empty sync and a stop; rank 1 inserts the odd
    rows of :func:`particles` (rank 0 the even ones) and hands them over at the first sync. Returns what each saw."""
    ranks = d.Ranks.join("cpu", timeout_seconds=60)
    try:
        images, rotations, origins, halves, ctf = particles(n)
        mine = torch.arange(ranks.rank, n, 2)
        acc = HalfSetAccumulator(BOX, APIX)
        acc.add(images[mine], rotations[mine], origins[mine], halves[mine], ctf[mine])
        if ranks.root:
            announce(ranks, start_command())
            first = lead(ranks, Command("sync", RankPolicy(False, "coarse", "coarse", 4)), acc)
            grids, counts = acc.grids.clone(), acc.particle_counts.clone()
            second = lead(ranks, Command("sync"), acc)
            unchanged = torch.equal(acc.grids, grids) and torch.equal(acc.particle_counts, counts)
            last = lead(ranks, Command("stop"), None)  # no particles: no grids needed
            return {"first": first, "second": second, "last": last, "grids": grids, "counts": counts,
                    "unchanged": unchanged}
        commands = [receive(ranks), receive(ranks)]
        handover = Handover([inserted_chunk(mine, n)], rejections=[("/session/b.star", "box 32 px")], waiting=7)
        handover.count("particles_ingested", len(mine))
        handover.count("particles_posed", len(mine))
        hand_over(ranks, handover, acc)
        zeroed = not acc.grids.any() and not acc.particle_counts.any()
        commands.append(receive(ranks))
        acc.add(images[:4], rotations[:4], origins[:4], halves[:4], ctf[:4])  # grids no handover names: not added
        held = acc.grids.clone()
        hand_over(ranks, Handover(waiting=3), acc)
        kept = torch.equal(acc.grids, held)
        commands.append(receive(ranks))
        hand_over(ranks, Handover(), None)
        return {"commands": commands, "zeroed": zeroed, "kept": kept}
    finally:
        ranks.leave()


def lose_rank(how: str, timeout: float) -> dict:
    """A sync with a rank gone (collective timeout ``timeout`` s). ``how``: ``leave`` (rank 1 leaves the group
    after receiving the sync's command), ``torn`` (rank 1 hands over particles, then leaves before the reduce),
    ``root`` (rank 0 leaves after ``start``; rank 1 waits for the next command). Every rank returns normally:
    what it caught (``None``: nothing), and how long its failing call took (s)."""
    ranks = d.Ranks.join("cpu", timeout_seconds=timeout)
    caught = None
    try:
        if ranks.root:
            announce(ranks, Command("start", journal={}))
            if how == "root":
                return {"caught": None, "seconds": 0.0}
            acc = HalfSetAccumulator(BOX, APIX)
            started = time.monotonic()
            try:
                lead(ranks, Command("sync"), acc)
            except RanksLost as exc:
                caught = (exc.torn, str(exc))
            return {"caught": caught, "seconds": time.monotonic() - started}
        receive(ranks)
        if how == "root":
            started = time.monotonic()
            try:
                receive(ranks)
            except RanksLost as exc:
                caught = (exc.torn, str(exc))
            return {"caught": caught, "seconds": time.monotonic() - started}
        receive(ranks)
        if how == "torn":  # hand_over's first two collectives (gather, then the total), not the reduce
            dist.gather_object(Handover([inserted_chunk(torch.arange(3), 3)]), None, dst=0)
            dist.all_reduce(torch.tensor([3, 0], dtype=torch.int64))  # particles inserted, classified
        return {"caught": None, "seconds": 0.0}
    finally:
        ranks.leave()


def classes_sync(n_lead: int, n_follow: int) -> dict:
    """One sync carrying 2D classes: rank 0 sends its classes (``n_lead`` particles classified), rank 1 aligns
    ``n_follow`` more against them as a follower and hands them over; rank 0 takes them. Rank 0 returns how far its
    classes are from those of classifying every particle itself, rank 1 whether its sums were zeroed."""
    import copy

    from cryofastar.daemon.classification_lane import ClassifiedRows
    from cryofastar.recon.classify2d import StreamingClassifier
    from cryofastar.recon.classify2d.class_sums import ClassSums
    from cryofastar.recon.ctf import ctf_array
    from test_classify2d import _classifier, _two_views

    ranks = d.Ranks.join("cpu")
    sim, _, _ = _two_views(n_lead + n_follow, snr=0.5, seed=3)
    new = torch.arange(n_lead, n_lead + n_follow)
    halves = (new % 2 + 1).to(torch.int64)
    try:
        if ranks.root:
            lead_clf = _classifier(k=4, start=n_lead - 20)
            lead_clf.add(sim.images[:n_lead], sim.ctf[torch.arange(n_lead)])
            alone = copy.deepcopy(lead_clf)
            refs = lead_clf.references()
            announce(ranks, Command("start", journal={}))
            sums = ClassSums(4, lead_clf.box, lead_clf.apix)
            handovers = lead(ranks, Command("sync", classes=refs, classify=True), None, sums)
            rows = ClassifiedRows.merged([h.classified for h in handovers], sums.state_dict())
            taken = lead_clf.take(rows.delta)
            alone.add(sim.images[n_lead:], sim.ctf[new], halves)
            scale = float(alone.sums.num.abs().max())
            return {"taken": taken.tolist(), "indices": rows.indices.tolist(),
                    "num": float((lead_clf.sums.num - alone.sums.num).abs().max()) / scale,
                    "classes": bool(np.array_equal(lead_clf.table.classes[: lead_clf.n_particles],
                                                   alone.table.classes[: alone.n_particles]))}
        receive(ranks)
        command = receive(ranks)
        refs = command.classes
        follower = StreamingClassifier(refs.settings, refs.box, refs.apix)
        follower.adopt(refs)
        follower.add(sim.images[n_lead:], sim.ctf[new], halves)
        classified = ClassifiedRows(follower.hand_over(with_sums=False), np.array(["/s.mrcs"] * n_follow),
                                    new.numpy() + 1, ctf_array(sim.ctf[new], n_follow),
                                    image_fingerprints(sim.images[n_lead:]))
        hand_over(ranks, Handover(classified=classified), None, follower.sums)
        return {"zeroed": float(follower.sums.num.abs().max()) == 0.0 and follower.n_particles == 0}
    finally:
        ranks.leave()


def follow_classes(watch: str, give_up: bool) -> dict:
    """Rank 1 runs a real ``RankWorker`` on the stacks in ``watch``; rank 0 leads its syncs by hand, with a lead
    classifier that classified rank 0's own share: its classes go out at the first sync and, with ``give_up``, from
    the sync after the first that brought classified particles on, rank 0 says its lane takes no more (rank 1 is
    then in the middle of its share). Rank 0 returns where each of rank 1's particles went (classified there, or by
    location), how far its class sums are from what its table says every particle adds, and whether particles still
    came classified after it said so."""
    import mrcfile
    from cryofastar.daemon.classification_lane import ClassifiedRows
    from cryofastar.daemon.rank_worker import RankWorker
    from cryofastar.daemon.settings import DaemonSettings
    from cryofastar.engine.classification import ClassifySettings
    from cryofastar.recon.classify2d.class_sums import ClassSums
    from cryofastar.recon.classify2d.fourier_sampling import padded_spectra
    from test_classify2d import APIX as APIX_2D
    from test_classify2d import BOX as BOX_2D
    from test_classify2d import _classifier

    ranks = d.Ranks.join("cpu")
    try:
        settings = DaemonSettings(watch=Path(watch), out=Path(watch) / "out", settle_seconds=0.3, metrics_port=None,
                                  poses_from="map-only", refine_after=100000,
                                  classification=ClassifySettings(classes=4))
        if not ranks.root:
            RankWorker(settings, ranks).run()
            return {}
        stacks = sorted(str(p.resolve()) for p in Path(watch).glob("*.mrcs"))
        images = {name: torch.from_numpy(mrcfile.read(name).copy()) for name in stacks}
        names = np.concatenate([[name] * len(images[name]) for name in stacks])
        indices = np.concatenate([np.arange(1, len(images[name]) + 1) for name in stacks])
        mine = d.owners(names, indices, 2) == 0
        lead_clf = _classifier(k=4, start=40)
        own = [(str(n), int(k)) for n, k in zip(names[mine], indices[mine], strict=True)]
        lead_clf.add(torch.stack([images[n][k - 1] for n, k in own]), None,
                     torch.from_numpy(indices[mine] % 2 + 1).to(torch.int64))
        share = int((~mine).sum())
        geometry = SessionGeometry(BOX_2D, APIX_2D)
        announce(ranks, Command("start", journal=IngestJournal().state_dict()))
        acc = HalfSetAccumulator(BOX_2D, APIX_2D)
        taken, located, inserted, late, step, classify = list(own), [], 0, False, 0, True
        deadline = time.monotonic() + 120
        while True:
            step += 1
            classify = classify and not (give_up and len(taken) > len(own))
            done = inserted >= share and len(taken) - len(own) + len(located) >= share
            op = "stop" if done or time.monotonic() > deadline else "sync"
            sums = ClassSums(4, lead_clf.box, lead_clf.apix)
            command = Command(op, geometry=geometry, classes=lead_clf.references() if step == 1 else None,
                              classify=classify)
            for handover in lead(ranks, command, acc, sums):
                inserted += handover.particles
                located += [(str(n), int(k)) for part in handover.to_classify
                            for n, k in zip(part.stacks, part.indices, strict=True)]
                if handover.classified is not None:
                    late |= not classify
                    rows = ClassifiedRows.merged([handover.classified], sums.state_dict())
                    lead_clf.take(rows.delta)
                    taken += [(str(n), int(k)) for n, k in zip(rows.stacks, rows.indices, strict=True)]
            if op == "stop":
                break
            time.sleep(0.3)
        fresh, t = ClassSums(4, lead_clf.box, lead_clf.apix), lead_clf.table
        spectra = padded_spectra(torch.stack([images[n][k - 1] for n, k in taken]))
        for slot in range(t.keep):
            present = t.classes[: t.n, slot] >= 0
            terms = fresh.contributions(spectra, torch.from_numpy(present), None,
                                        torch.from_numpy(t.psi[: t.n, slot]), torch.from_numpy(t.shifts[: t.n, slot]))
            fresh.add(torch.from_numpy(t.classes[: t.n, slot][present]), torch.from_numpy(t.halves[: t.n][present]),
                      torch.from_numpy(t.weights[: t.n, slot][present]), terms)
        theirs = sorted((str(n), int(k)) for n, k in zip(names[~mine], indices[~mine], strict=True))
        return {"share": theirs, "classified": sorted(taken[len(own):]), "located": sorted(located),
                "inserted": inserted, "late": late, "rows": t.n,
                "sums": float((lead_clf.sums.num - fresh.num).abs().max() / fresh.num.abs().max())}
    finally:
        ranks.leave()

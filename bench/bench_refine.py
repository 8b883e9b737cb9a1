"""Pose refinement in the streaming daemon on held-out molecules: network only, refined, map only, true poses.

A benchmark, not a test. For each held-out molecule (procedural seeds >= 1,000,000,000,
never trained on, model/TRAINING_DATA.md; monomers, so no symmetry confuses the errors)
it simulates ``--n`` particles at ``--box`` px and SNR ``--snr`` (RELION 3.1 stacks +
true poses), then streams the same stacks through the daemon (in-process
:class:`~cryofastar.daemon.pipeline.Daemon`, all stacks renamed into the watched
directory at once) three times:

- **network only**: ``refine=False``, the CryoFastAR network's poses;
- **refined**: the network's poses refined against the running map (or, where the
  network proves uninformative, replaced by the streaming ab initio), older particles
  re-posed (docs/refinement.md);
- **map only**: ``poses_from="map-only"``: no network, random poses until refinement
  starts, then streaming ab initio and local refinement;

and back-projects the **true poses** (the ceiling). After the last particle is in the
map the daemon is left running until its idle re-posing converges (or ``--polish``
seconds), as it would between bursts of a live session. Per row: median geodesic error
(after one global alignment incl. handedness, ``cryofastar-stream evaluate``'s
figure), FSC-0.5 resolution against the true map of the map rebuilt with the poses
moved into the true frame by that alignment, translated onto the truth (an ab initio
map's frame, hand and centre are free), the half-map FSC-0.143
resolution, wall time from the first stack to all particles in the map, the polishing
time after it, and the time per particle of each daemon stage (the daemon's own latency
histograms, polishing included).

    python bench/bench_refine.py                        # 3 molecules, 10,000 particles, box 64, SNR 0.1
    python bench/bench_refine.py --n 2000 --molecules 1  # a quick run
    python bench/bench_refine.py --json refine.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cryofastar.daemon.pipeline import Daemon, DaemonSettings
from cryofastar.model.evaluation import EvaluateSettings, evaluate_particle_sets, map_in_true_frame
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import ParticleSource, read_particles
from cryofastar.recon.map_alignment import resolution_vs_known_map
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, write_session

sys.path.insert(0, str(Path(__file__).parent))
from bench_ab_initio import SEEDS  # noqa: E402 - a sibling script

MODES = {"network only": {"refine": False}, "refined": {}, "map only": {"poses_from": "map-only"}}


def stage_ms_per_particle(daemon: Daemon, n: int) -> dict[str, float]:
    """Total seconds of each daemon stage (latency histogram sums) per particle, in ms."""
    return {stage: 1000.0 * seconds / max(1, n) for stage, (_items, seconds) in daemon.metrics.stage_seconds().items()}


def stream(stacks: list[Path], n: int, root: Path, args: argparse.Namespace, **options: object) -> dict[str, object]:
    """Run one daemon over the stacks; returns its figures (wall time, stage costs, outputs)."""
    watch, out = root / "watch", root / "out"
    watch.mkdir(parents=True)
    settings = DaemonSettings(watch=watch, out=out, zmq="tcp://127.0.0.1:0", metrics_port=None, device=args.device,
                              settle_seconds=0.2, flush_seconds=1.0, **options)
    daemon = Daemon(settings)
    daemon.start()
    t0 = time.monotonic()
    for stack in stacks:
        shutil.copy(stack, watch / f".{stack.name}.part")
        os.replace(watch / f".{stack.name}.part", watch / stack.name)
    while daemon.particles_in_map < n and not daemon.errors:
        time.sleep(0.1)
    wall = time.monotonic() - t0
    t1 = time.monotonic()  # the session is over; the daemon goes on re-posing until converged (or --polish s)
    while settings.refine and not daemon.refinement_converged and time.monotonic() - t1 < args.polish \
            and not daemon.errors:
        time.sleep(0.2)
    polish = time.monotonic() - t1
    status = daemon.status()
    daemon.stop()
    if daemon.errors:
        raise RuntimeError(daemon.errors[0])
    return {"wall_s": wall, "polish_s": polish, "stages_ms": stage_ms_per_particle(daemon, n), "out": out,
            "watch": watch,
            "refined": status["particles_refined"], "reposed": status["particles_reposed"],
            "network_informative": status["refinement"]["network_informative"],
            "phase": status["refinement"]["phase"]}


def true_pose_map(star: Path, truth_table, apix: float) -> tuple[torch.Tensor, float]:  # noqa: ANN001
    """Map and half-map FSC-0.143 resolution from the true poses (all particles read at once)."""
    acc = HalfSetAccumulator(truth_table.box, apix, interpolation="nearest")
    rows = np.arange(len(truth_table))
    images = ParticleSource.from_star(star, table=truth_table).images(rows).all_images()
    acc.add(images, truth_table.rotations(), truth_table.origins_angstrom(),
            truth_table.half_sets())
    return acc.volume(), acc.resolution_angstrom()


def run_molecule(name: str, atoms, k: int, args: argparse.Namespace, root: Path) -> list[dict]:  # noqa: ANN001
    apix = 2.0 * atoms.radius_angstrom() / (args.fill * args.box)
    truth_map = atoms_to_volume(atoms, args.box, apix)
    session = root / "session"
    star = write_session(session, truth_map, apix, args.n, args.snr, seed=k + 1, per_stack=args.per_stack)
    stacks = sorted(session.glob("particles_*.mrcs"))
    truth = read_particles(star)
    rows = []
    for mode, options in MODES.items():
        if mode not in args.modes:
            continue
        figures = stream(stacks, args.n, root / mode.replace(" ", "-"), args, **options)
        truth_here = figures["watch"] / "truth.star"  # the true poses naming this run's copies of the stacks
        shutil.copy(star, truth_here)
        errors = evaluate_particle_sets(EvaluateSettings(figures["out"] / "particles.star", truth_here))
        volume, _ = map_in_true_frame(figures["out"] / "particles.star", errors.predicted.alignment)
        history = (figures["out"] / "fsc_history.tsv").read_text().strip().splitlines()[-1].split("\t")
        rows.append({"molecule": name, "apix": apix, "poses": mode,
                     "median_geodesic_degrees": errors.predicted.geodesic_median_degrees,
                     "chance_geodesic_degrees": errors.chance.geodesic_median_degrees,
                     "median_shift_px": errors.predicted.translation_median_px,
                     "fsc05_vs_truth_angstrom": resolution_vs_known_map(volume, truth_map, apix),
                     "half_map_fsc0143_angstrom": float(history[2]), "wall_s": figures["wall_s"],
                     "polish_s": figures["polish_s"],
                     "ms_per_particle": figures["stages_ms"], "refined": figures["refined"],
                     "reposed": figures["reposed"], "network_informative": figures["network_informative"],
                     "phase": figures["phase"]})
        print(_line(rows[-1]), flush=True)
    t0 = time.perf_counter()
    volume, resolution = true_pose_map(star, truth, apix)
    rows.append({"molecule": name, "apix": apix, "poses": "true poses", "median_geodesic_degrees": 0.0,
                 "fsc05_vs_truth_angstrom": resolution_vs_known_map(volume, truth_map, apix),
                 "half_map_fsc0143_angstrom": resolution, "wall_s": time.perf_counter() - t0, "polish_s": 0.0,
                 "ms_per_particle": {}})
    print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    stages = " ".join(f"{k} {v:.2f}" for k, v in sorted(row["ms_per_particle"].items()) if k != "checkpoint")
    return (f"{row['molecule']:<24}{row['poses']:<14}{row.get('phase', '-'):<10}{row['median_geodesic_degrees']:>9.1f}"
            f"{row['fsc05_vs_truth_angstrom']:>10.1f}{row['half_map_fsc0143_angstrom']:>9.1f}{row['wall_s']:>8.0f}"
            f"{row['polish_s']:>9.0f}  "
            f"{stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="particles per molecule")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--molecules", type=int, default=3, help="held-out procedural molecules")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="held-out procedural seeds (default: the first --molecules of bench_ab_initio.SEEDS)")
    parser.add_argument("--fill", type=float, default=0.6, help="molecule diameter / box")
    parser.add_argument("--per-stack", type=int, default=500)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                        help=f"daemon runs to make (default: all of {', '.join(MODES)})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--polish", type=float, default=120.0,
                        help="seconds the daemon may go on re-posing after the last particle (until converged)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep sessions and outputs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}; {args.n} particles, box {args.box}, "
          f"SNR {args.snr}")
    print(f"{'molecule':<24}{'poses':<14}{'phase':<10}{'med geo°':>9}{'FSC.5 Å':>10}{'half Å':>9}{'wall s':>8}"
          f"{'polish s':>9}  ms/particle by stage")
    rows = []
    seeds = args.seeds if args.seeds is not None else SEEDS[: args.molecules]
    for k, seed in enumerate(seeds):  # held-out monomers (no symmetry to confuse the errors)
        name, atoms = f"procedural-{seed}", procedural_molecule(seed)
        if args.keep is not None:
            root = args.keep / name
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            rows += run_molecule(name, atoms, k, args, root)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows += run_molecule(name, atoms, k, args, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

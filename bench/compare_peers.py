"""Side by side with a real peer: cryoDRGN ab initio vs cryofastar-stream on the same particles.

For each cell of the grid (box x SNR x particles) this script, in one run on one machine:

1. simulates a particle set of a held-out molecule (procedural seed >= 1,000,000,000, never
   trained on: model/TRAINING_DATA.md) with the project's own simulator
   (``cryofastar-stream simulate``, no CTF, shifts up to 4 px, true poses kept);
2. runs ``cryofastar-stream reconstruct`` on its STAR file (network poses, refinement, map);
3. runs the peer(s) on the same STAR file and stacks, each capped at ``--peer-cap`` seconds:
   ``cryodrgn abinit_homo_old`` (cryoDRGN2) and, with ``--peers ...,abinit``, ``cryodrgn abinit``
   (cryoDRGN-AI), from cryoDRGN 4.3.1 in its own virtual environment ``bench/.venv-cryodrgn``
   (created here: torch==2.13.0 first, then cryodrgn==4.3.1; never a project dependency).
   The peer writes poses after every epoch (``pose.N.pkl``); the time each appeared gives its
   error against wall time, so one capped run answers "what error had it reached after ×1,
   ×10, ×100 our wall time";
4. scores every pose set the same way: after one global alignment (rotation and hand) of the
   predicted frame onto the true one (``cryofastar.model.evaluation.pose_errors``), mean
   ‖ΔR‖_F (not squared), median geodesic error (°), median translation error (px); then the
   poses, moved into the true frame, are back-projected by one back-projector for every method
   (``HalfSetAccumulator``, so maps differ only by their poses) and the map's FSC against the
   true map gives the 0.5 and 0.143 resolutions (Å). True poses give the ceiling, SO(3)-uniform
   random poses with zero shifts the floor.

cryoDRGN's pose convention is measured, not assumed: ``cryodrgn parse_pose_star`` on the true
STAR file must give rotations equal to RELION's matrix A (``recon/euler.py``) and translations
equal to rlnOrigin (px) / box, else the run stops. Our particles are bright (positive
contrast), so the peer gets ``--uninvert-data``; all its other settings are its defaults.

Results merge into ``--json`` (one entry per cell; existing cells are kept unless ``--redo``),
so the grid can be filled over several runs; the figure of error vs wall time is drawn from it
with the peer environment's matplotlib (bench/plot_peers.py). docs/benchmarks.md has the figures.

    python bench/compare_peers.py --box 64 --snr 1 --n 2000                # one cell
    python bench/compare_peers.py                                          # the whole grid
    python bench/compare_peers.py --box 64 --snr 1 --n 300 --peer-cap 120 --json /tmp/smoke.json --work /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch
from cryofastar.model.evaluation import network_poses
from cryofastar.recon.io import ParticleTable, image_keys, read_particles

sys.path.insert(0, str(Path(__file__).parent))
from compare_cell import Truth, ceiling_and_floor, score, timed  # noqa: E402 - a sibling module
from compare_report import draw_figure, markdown_tables, peer_line, score_row  # noqa: E402 - a sibling module
from peer_cryodrgn import (  # noqa: E402 - a sibling module
    BUDGET_FACTORS,
    PEER_VENV,
    PEERS,
    check_peer_convention,
    ensure_peer_env,
    peer_versions,
    probe_first_poses,
    run_peer,
    score_peer_poses,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# a held-out monomer (model/TRAINING_DATA.md: seeds >= 1e9 are never trained on); radius 50 Å
DEFAULT_SEED = 1_000_000_005
# pixel size per box: the same 128 Å field of view, the molecule filling ~80 % of it
APIX_FOR_BOX = {64: 2.0, 128: 1.0}


def machine_facts() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryofastar

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cryofastar": cryofastar.__version__, "gpu": None}



# ---------------------------------------------------------------------------- methods
def simulate(sim: Path, n: int, box: int, apix: float, snr: float, seed: int) -> float:
    sim.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cryofastar", "simulate", "--out", str(sim), "--n", str(n), "--box", str(box),
           "--apix", str(apix), "--snr", str(snr), "--no-ctf", "--per-stack", "1000", "--seed", str(seed)]
    return timed(cmd, sim.parent / "simulate.log")


def run_ours(cell: Path, truth: Truth) -> dict:
    out = cell / "cryofastar"
    cmd = [sys.executable, "-m", "cryofastar", "reconstruct", str(cell / "sim" / "particles.star"), "-o", str(out),
           "--device", "cpu", "--no-progress", "--seed", "0"]
    wall = timed(cmd, cell / "cryofastar.log")
    return {"wall_s": wall, "command": " ".join(["cryofastar-stream", *cmd[3:]]), **score_ours(cell, truth)}


def score_ours(cell: Path, truth: Truth) -> dict:
    """Score ``reconstruct``'s output STAR file in ``cell/cryofastar`` (and its network's poses)."""
    table = read_particles(cell / "cryofastar" / "particles.star")
    order = _rows_in_truth_order(table, truth.table)
    result = score(truth, table.rotations().double()[order], table.origins_angstrom().double()[order] / table.apix)
    return {**result, **ours_pipeline(cell, truth, table, order)}


def ours_pipeline(cell: Path, truth: Truth, table: ParticleTable, order: np.ndarray) -> dict:
    """Which path ``reconstruct`` took (its log) and how good the network's own poses were.

    ``reconstruct`` keeps the network's pose of each particle (before refinement) in the
    NETWORK_COLUMNS of its STAR file; they are scored like every other pose set. Its log says
    whether the network's poses started refinement or map-only ab initio replaced them.
    ``table`` is its output STAR file, ``order`` its rows in the order of ``truth``.
    """
    log = (cell / "cryofastar.log").read_text(errors="replace")
    posed = re.search(r"posed in ([\d.]+) s", log)
    refined = next((line.strip() for line in log.splitlines() if line.startswith("refined in")), None)
    kept = network_poses(table)
    network = None
    if kept is not None:
        network = {"pose_s": float(posed.group(1)) if posed else None,
                   **score(truth, kept[0][order], kept[1][order])}
    return {"refinement_log": refined, "network_replaced_by_ab_initio": bool(refined and "uninformative" in refined),
            "network_poses": network}


def _rows_in_truth_order(table: ParticleTable, truth: ParticleTable) -> np.ndarray:
    """Rows of ``table`` in the order of ``truth``, matched by image (``recon.io.image_keys``)."""
    wanted = image_keys(truth)
    rows = image_keys(table).get_indexer(wanted)
    if (rows < 0).any():
        raise SystemExit(f"error: {int((rows < 0).sum())} particles missing from the output, "
                         f"e.g. {wanted[int(np.argmax(rows < 0))]}")
    return rows


def run_cell(args: argparse.Namespace, python: Path | None, box: int, snr: float, n: int) -> dict:
    apix = APIX_FOR_BOX.get(box, 128.0 / box)
    name = f"box{box}_snr{snr:g}_n{n}"
    cell = args.work / name
    print(f"\n== {name}: {n} particles, box {box} at {apix} Å/px, SNR {snr}, molecule seed {args.seed}", flush=True)
    sim_s = simulate(cell / "sim", n, box, apix, snr, args.seed)
    truth = Truth.load(cell / "sim")
    result: dict = {"cell": name, "box": box, "apix": apix, "snr": snr, "n": n, "seed": args.seed,
                    "simulate_s": sim_s}
    result.update(ceiling_and_floor(truth))
    print(f"   true poses: {score_row(result['true_poses'])}\n"
          f"   random poses: {score_row(result['random_poses'])}", flush=True)
    ours = run_ours(cell, truth)
    result["cryofastar"] = ours
    print(f"   cryofastar-stream reconstruct: {ours['wall_s']:.1f} s, {score_row(ours)}\n"
          f"      {ours['refinement_log']}", flush=True)
    if ours["network_poses"]:
        print(f"   its network's poses alone: {score_row(ours['network_poses'])}", flush=True)
    result["peers"] = {}
    if python is not None:
        result["peer_convention"] = check_peer_convention(python, cell, truth)
        for peer in args.peers:
            cap = min(args.peer_cap, max(BUDGET_FACTORS) * ours["wall_s"])
            probe = None
            if peer == "abinit_homo_old" and not args.no_probe:
                probe = probe_first_poses(python, cell, n)
                print(f"   {PEERS[peer]}: pretraining {probe['pretrain_images_per_s']:.1f} images/s, pose search "
                      f"{probe['search_images_per_s']:.2f} images/s; first poses after ≈"
                      f"{probe['first_poses_estimate_s']:.0f} s (not before "
                      f"{probe['first_poses_lower_bound_s']:.0f} s)", flush=True)
                if probe["first_poses_lower_bound_s"] > cap:
                    result["peers"][peer] = {"label": PEERS[peer], "dropped": True, "probe": probe, "cap_s": cap,
                                             "failure": None, "checkpoints": [], "final": None}
                    print(f"   {PEERS[peer]}: dropped: no poses before the {cap:.0f} s cap", flush=True)
                    continue
            print(f"   {PEERS[peer]}: running, capped at {cap:.0f} s ...", flush=True)
            got = run_peer(python, peer, cell, truth, cap, ours, args.peer_args.split())
            if probe is not None:  # kept beside the measured run: how good the estimate was
                got["probe"] = probe
            result["peers"][peer] = got
            print(f"   {PEERS[peer]}: {peer_line(got, ours)}", flush=True)
    return result


def rescore_cell(work: Path, entry: dict) -> dict:
    """Score a measured cell again from its files in ``work`` (no tool is rerun).

    Wall times and the peers' pose-writing times are kept from ``entry``; every error and
    map is recomputed with the current scoring (e.g. after the scoring itself changed).
    """
    cell = work / entry["cell"]
    if not (cell / "sim" / "particles.star").exists():
        raise SystemExit(f"error: cannot rescore {entry['cell']}: {cell / 'sim'} is gone (rerun it with --redo)")
    truth = Truth.load(cell / "sim")
    entry = {**entry, **ceiling_and_floor(truth)}
    entry["cryofastar"] = {**entry["cryofastar"], **score_ours(cell, truth)}
    for name, got in entry.get("peers", {}).items():
        if got.get("dropped") or not got.get("checkpoints"):
            continue
        written = {c["epoch"]: c["t_s"] for c in got["checkpoints"]}
        entry["peers"][name] = {**got, **score_peer_poses(cell / name, truth, written, got["cap_s"],
                                                          entry["cryofastar"])}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="held-out molecule seed (>= 1e9)")
    parser.add_argument("--peers", type=lambda s: s.split(","), default=["abinit_homo_old"],
                        help="comma-separated: abinit_homo_old, abinit")
    parser.add_argument("--peer-cap", type=float, default=3600.0,
                        help="seconds; each peer run stops at min(this, 100 × our wall time)")
    parser.add_argument("--peer-args", default="",
                        help="extra arguments for the peer (e.g. '--pretrain 100 -n 3' for a quick check); "
                             "the figures in docs/benchmarks.md use none")
    parser.add_argument("--no-probe", action="store_true",
                        help="run the peer to the cap even where a short probe says it would write no poses by then")
    parser.add_argument("--no-peer", action="store_true", help="only our method, the ceiling and the floor")
    parser.add_argument("--work", type=Path, default=HERE / ".compare-peers", help="particles and outputs (large)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "compare_peers_cpu.json")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "images" / "compare_peers.png")
    parser.add_argument("--redo", action="store_true", help="rerun cells already in --json")
    parser.add_argument("--report", action="store_true",
                        help="only print the tables and redraw the figure from --json, running nothing")
    parser.add_argument("--rescore", action="store_true",
                        help="score the chosen cells already in --json again from their files in --work, "
                             "running no tool (wall times kept)")
    args = parser.parse_args()
    if args.seed < 1_000_000_000:
        parser.error("--seed must be a held-out seed (>= 1,000,000,000): the network trained on the others")
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {sorted(unknown)}; choose from {sorted(PEERS)}")
    results = json.loads(args.json.read_text()) if args.json.exists() else {"cells": {}}
    if args.report:
        print(markdown_tables(results))
        draw_figure(args.json, args.figure)
        return
    if args.rescore:
        for name in [f"box{b}_snr{s:g}_n{n}" for b in args.box for s in args.snr for n in args.n]:
            if name in results["cells"]:
                print(f"{name}: rescoring from {args.work / name}", flush=True)
                results["cells"][name] = rescore_cell(args.work, results["cells"][name])
                args.json.write_text(json.dumps(results, indent=1) + "\n")
        print("\n" + markdown_tables(results))
        return
    python = None if args.no_peer else ensure_peer_env(PEER_VENV)
    results["machine"] = machine_facts()
    if python is not None:
        results["peer_versions"] = peer_versions(python)
    for box in args.box:
        for snr in args.snr:
            for n in args.n:
                name = f"box{box}_snr{snr:g}_n{n}"
                if name in results["cells"] and not args.redo:
                    print(f"{name}: already in {args.json} (--redo to rerun)")
                    continue
                results["cells"][name] = run_cell(args, python, box, snr, n)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + markdown_tables(results))
    if python is not None:
        draw_figure(args.json, args.figure)



if __name__ == "__main__":
    main()

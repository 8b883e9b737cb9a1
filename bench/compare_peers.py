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
import math
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from cryofastar.model.evaluation import apply_alignment_to_rotations, network_poses, pose_errors
from cryofastar.recon import HalfSetAccumulator, fsc, resolution_at_threshold
from cryofastar.recon.io import ParticleSource, ParticleTable, image_keys, read_particles, read_volume
from cryofastar.recon.map_alignment import translate_onto
from cryofastar.recon.rotations import random_rotations

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_VENV = HERE / ".venv-cryodrgn"
TORCH_PIN = "torch==2.13.0"
CRYODRGN_PIN = "cryodrgn==4.3.1"
# a held-out monomer (model/TRAINING_DATA.md: seeds >= 1e9 are never trained on); radius 50 Å
DEFAULT_SEED = 1_000_000_005
# pixel size per box: the same 128 Å field of view, the molecule filling ~80 % of it
APIX_FOR_BOX = {64: 2.0, 128: 1.0}
BUDGET_FACTORS = (1, 10, 100)
PEERS = {"abinit_homo_old": "cryoDRGN2 (abinit_homo_old)", "abinit": "cryoDRGN-AI (abinit)"}


# ---------------------------------------------------------------------------- peer environment
def ensure_peer_env(venv: Path) -> Path:
    """Create ``venv`` with torch==2.13.0 then cryodrgn==4.3.1 unless it has them; returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and _peer_versions(python).get("cryodrgn") == CRYODRGN_PIN.split("==")[1]:
        return python
    print(f"creating {venv} ({TORCH_PIN}, then {CRYODRGN_PIN}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, CRYODRGN_PIN, TORCH_PIN], check=True)  # torch pinned again: never upgraded
    found = _peer_versions(python)
    if found.get("cryodrgn") != CRYODRGN_PIN.split("==")[1]:
        raise SystemExit(f"error: {venv} has cryodrgn {found.get('cryodrgn')}, wanted {CRYODRGN_PIN}")
    return python


def _peer_versions(python: Path) -> dict[str, str]:
    code = ("import json, torch, cryodrgn; "
            "print(json.dumps({'cryodrgn': cryodrgn.__version__, 'torch': torch.__version__}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


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


# ---------------------------------------------------------------------------- truth and scoring
@dataclass
class Truth:
    """One simulated cell: its particles in memory and the true answer."""

    table: ParticleTable
    images: torch.Tensor  # (n, B, B) float32
    rotations: torch.Tensor  # (n, 3, 3) float64 RELION matrices A
    shifts_px: torch.Tensor  # (n, 2) float64 (rlnOriginX, rlnOriginY) in px
    halves: torch.Tensor  # (n,) 1 or 2
    true_map: torch.Tensor  # (B, B, B)
    apix: float

    @classmethod
    def load(cls, sim: Path) -> Truth:
        table = read_particles(sim / "particles.star")
        true_map, _ = read_volume(sim / "reference.mrc")
        images = ParticleSource.from_star(table.star_path, table=table).images().all_images()
        return cls(table, images, table.rotations().double(),
                   table.origins_angstrom().double() / table.apix, table.half_sets(), true_map, table.apix)


def score(truth: Truth, rotations: torch.Tensor, shifts_px: torch.Tensor | None, with_map: bool = True) -> dict:
    """Pose errors after one global alignment (incl. hand) and the FSC of the aligned map vs the truth.

    The alignment is the map's gauge: a rotation, the hand and a translation (shift errors
    are measured after removing the fitted map translation, ``map_translation_px``, since
    an ab-initio map may sit off-centre; the FSC is likewise measured after centring).
    ``rotations`` `(n, 3, 3)` RELION matrices, ``shifts_px`` `(n, 2)` rlnOrigin in px, both in
    the row order of ``truth``. Resolutions in Å (``inf`` where the FSC never rises above it).
    """
    errors = pose_errors(rotations, truth.rotations, shifts_px, None if shifts_px is None else truth.shifts_px,
                         fit_translation=True)
    out = {"frobenius_mean": errors.frobenius_mean, "geodesic_median_deg": errors.geodesic_median_degrees,
           "geodesic_mean_deg": errors.geodesic_mean_degrees, "mirrored": errors.alignment.mirrored,
           "translation_median_px": errors.translation_median_px,
           "translation_mean_px": errors.translation_mean_px,
           "map_translation_px": None if errors.map_translation_px is None else errors.map_translation_px.tolist()}
    if with_map:
        aligned = apply_alignment_to_rotations(rotations, errors.alignment)
        origins = torch.zeros(len(truth.table), 2, dtype=torch.float64) if shifts_px is None else shifts_px
        out.update(map_resolution(truth, aligned, origins * truth.apix))
    return out


def map_resolution(truth: Truth, rotations: torch.Tensor, origins_angstrom: torch.Tensor) -> dict:
    acc = HalfSetAccumulator(truth.true_map.shape[0], truth.apix)
    acc.add(truth.images, rotations, origins_angstrom, truth.halves)
    volume = translate_onto(acc.volume(), truth.true_map)
    curve = fsc(volume, truth.true_map)
    return {"fsc05_angstrom": resolution_at_threshold(curve, truth.apix, 0.5),
            "fsc0143_angstrom": resolution_at_threshold(curve, truth.apix, 0.143)}


# ---------------------------------------------------------------------------- methods
def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` to completion with its output in ``log``; wall seconds. A failure stops the run."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t0


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


def check_peer_convention(python: Path, cell: Path, truth: Truth) -> dict:
    """Measure cryoDRGN's pose convention on the true poses: ``parse_pose_star`` vs RELION's A.

    Returns the largest differences; stops the run unless rots == A and trans == rlnOrigin / box.
    """
    box = truth.true_map.shape[0]
    out = cell / "peer_convention.pkl"
    cmd = [str(python.parent / "cryodrgn"), "parse_pose_star", str(cell / "sim" / "particles.star"),
           "-o", str(out), "-D", str(box), "--Apix", str(truth.apix)]
    timed(cmd, cell / "peer_convention.log")
    rots, trans = _read_pose_pkl(out)
    rot_diff = float((torch.from_numpy(rots).double() - truth.rotations).abs().max())
    trans_diff = float((torch.from_numpy(trans).double() * box - truth.shifts_px).abs().max())
    if rot_diff > 1e-4 or trans_diff > 1e-3:
        raise SystemExit(f"error: cryoDRGN's pose convention differs from what this script assumes "
                         f"(max |rots - A| {rot_diff:.3g}, max |trans*box - origin_px| {trans_diff:.3g} px)")
    return {"rots_minus_relion_A_max": rot_diff, "trans_times_box_minus_origin_px_max": trans_diff}


def _read_pose_pkl(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open("rb") as fh:
        pose = pickle.load(fh)
    if isinstance(pose, tuple):
        rots, trans = pose[0], (pose[1] if len(pose) > 1 else None)
    else:
        rots, trans = pose, None
    rots = np.asarray(rots, dtype=np.float64)
    return rots, (None if trans is None else np.asarray(trans, dtype=np.float64))


def _epoch(path: Path) -> int:
    """N of cryoDRGN's ``pose.N.pkl``."""
    return int(re.findall(r"\d+", path.name)[0])


def peer_command(python: Path, peer: str, cell: Path, out: Path, extra: list[str]) -> list[str]:
    sim = cell / "sim"
    common = [str(sim / "particles.star"), "-o", str(out), "--datadir", str(sim), "--uninvert-data",
              "--seed", "0", "--checkpoint", "1"]
    base = [str(python.parent / "cryodrgn"), peer]
    if peer == "abinit":  # cryoDRGN-AI: homogeneous (no latent), threads as many as cores
        return [*base, *common, "--zdim", "0", "--max-threads", str(os.cpu_count()), *extra]
    return [*base, *common, *extra]


def run_peer(python: Path, peer: str, cell: Path, truth: Truth, cap: float, ours: dict,
             extra: list[str]) -> dict:
    """Run one peer capped at ``cap`` s; score each epoch's poses; errors at ×1/×10/×100 our wall time."""
    out = cell / peer
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("pose.*.pkl"):
        old.unlink()
    cmd = peer_command(python, peer, cell, out, extra)
    log = cell / f"{peer}.log"
    t0_wall = time.time()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=cap)
            capped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            returncode, capped = None, True
    wall = time.perf_counter() - t0
    failure = None
    if returncode not in (None, 0):  # recorded, not fatal: the other methods' figures stand
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        failure = f"exit status {returncode}: {lines[-1] if lines else 'no output'}"
    written = {_epoch(path): path.stat().st_mtime - t0_wall for path in out.glob("pose.*.pkl")}
    return {"label": PEERS[peer], "command": " ".join(["cryodrgn", *cmd[1:]]), "cap_s": cap, "capped": capped,
            "finished": not capped and failure is None, "failure": failure, "wall_s": wall,
            **score_peer_poses(out, truth, written, cap, ours)}


def score_peer_poses(out: Path, truth: Truth, written: dict[int, float], cap: float, ours: dict) -> dict:
    """Score a peer's ``pose.N.pkl`` files; its errors at ×1/×10/×100 our wall time.

    ``written`` maps each epoch N to the seconds after the peer's start when its poses
    were written. Returns ``checkpoints`` (one score per epoch), ``final`` (the last poses
    with their map), ``at_budget`` and ``time_to_match_s`` (when it first reached our
    median error, or ``None``).
    """
    box = truth.true_map.shape[0]
    checkpoints, last = [], None
    for path in sorted(out.glob("pose.*.pkl"), key=_epoch):
        rots, trans = _read_pose_pkl(path)
        if rots.shape[0] != len(truth.table) or _epoch(path) not in written:
            continue
        last = (torch.from_numpy(rots), None if trans is None else torch.from_numpy(trans) * box)
        checkpoints.append({"epoch": _epoch(path), "t_s": written[_epoch(path)],
                            **score(truth, *last, with_map=False)})
    budgets = {}
    for factor in BUDGET_FACTORS:
        budget = factor * ours["wall_s"]
        reached = [c for c in checkpoints if c["t_s"] <= budget]
        entry = {"budget_s": budget, "within_cap": budget <= cap}
        if reached:
            best = reached[-1]  # the poses it had at that moment: its latest checkpoint
            entry.update(epoch=best["epoch"], t_s=best["t_s"], frobenius_mean=best["frobenius_mean"],
                         geodesic_median_deg=best["geodesic_median_deg"])
        budgets[f"x{factor}"] = entry
    final = None
    if last is not None:  # the last poses again, now with their map
        final = {"epoch": checkpoints[-1]["epoch"], "t_s": checkpoints[-1]["t_s"], **score(truth, *last)}
    # the first epoch whose poses are as good as ours (median geodesic error), if any
    match = next((c["t_s"] for c in checkpoints if c["geodesic_median_deg"] <= ours["geodesic_median_deg"]), None)
    return {"checkpoints": checkpoints, "final": final, "at_budget": budgets, "time_to_match_s": match}


def probe_first_poses(python: Path, cell: Path, n: int, k: int = 64) -> dict:
    """Estimate when ``abinit_homo_old`` would write its first poses for ``n`` particles.

    A short run on the first ``k`` particles (``--ind``, ``--pretrain k -n 1``) measures its
    pretraining rate and its first pose search's rate (images/s, from its log's timestamps and
    "Finished in"); the estimate is startup + min(n, 10,000 default pretraining images) /
    pretraining rate + n / search rate. Later pose searches are slower (its L radius grows).

    The pretraining rate of so short a run is pessimistic: its first batches carry the
    warm-up (measured at box 128: 2.0 images/s in the probe, 4.3 in the full run), so the
    estimate can overshoot. ``first_poses_lower_bound_s`` leaves pretraining out (startup +
    n / search rate); a cell is dropped for the peer only when even that is past the cap.
    """
    ind = cell / "probe_ind.pkl"
    with ind.open("wb") as fh:
        pickle.dump(np.arange(k), fh)
    out = cell / "abinit_homo_old_probe"
    # its pretraining is one pass over the data at most
    cmd = peer_command(python, "abinit_homo_old", cell, out, ["--ind", str(ind), "--pretrain", str(k), "-n", "1"])
    log = cell / "abinit_homo_old_probe.log"
    wall = timed(cmd, log)
    text = log.read_text(errors="replace")
    stamp = r"\((\d+-\w+-\d+ \d+:\d+:\d+)\)"
    start = re.search(stamp + r" Using random poses", text)
    end = re.search(stamp + r" # =====> Epoch: 1 .*Finished in (\d+):(\d+):([\d.]+)", text)
    if start is None or end is None:
        raise SystemExit(f"error: could not read the probe's timings from {log}")
    fmt = "%d-%b-%Y %H:%M:%S"
    span = (datetime.strptime(end.group(1), fmt) - datetime.strptime(start.group(1), fmt)).total_seconds()
    search_s = 3600 * int(end.group(2)) + 60 * int(end.group(3)) + float(end.group(4))
    pretrain_s = max(span - search_s, 1.0)
    startup_s = max(wall - span, 0.0)
    pretrain_rate, search_rate = k / pretrain_s, k / search_s
    estimate = startup_s + min(n, 10_000) / pretrain_rate + n / search_rate
    return {"probe_particles": k, "probe_wall_s": wall, "pretrain_images_per_s": pretrain_rate,
            "search_images_per_s": search_rate, "startup_s": startup_s, "first_poses_estimate_s": estimate,
            "first_poses_lower_bound_s": first_poses_lower_bound(startup_s, search_rate, n)}


def first_poses_lower_bound(startup_s: float, search_images_per_s: float, n: int) -> float:
    """Seconds before the peer's first poses at the least: startup + its first pose search, no pretraining."""
    return startup_s + n / search_images_per_s


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
    print(f"   true poses: {_row(result['true_poses'])}\n   random poses: {_row(result['random_poses'])}", flush=True)
    ours = run_ours(cell, truth)
    result["cryofastar"] = ours
    print(f"   cryofastar-stream reconstruct: {ours['wall_s']:.1f} s, {_row(ours)}\n      {ours['refinement_log']}",
          flush=True)
    if ours["network_poses"]:
        print(f"   its network's poses alone: {_row(ours['network_poses'])}", flush=True)
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
            print(f"   {PEERS[peer]}: {_peer_line(got, ours)}", flush=True)
    return result


def ceiling_and_floor(truth: Truth) -> dict:
    """The true poses (ceiling) and SO(3)-uniform random poses with zero shifts (floor), scored."""
    n = len(truth.table)
    t = time.perf_counter()
    ceiling = score(truth, truth.rotations, truth.shifts_px)
    generator = torch.Generator().manual_seed(7)
    floor = score(truth, random_rotations(n, generator).double(), torch.zeros(n, 2, dtype=torch.float64))
    return {"true_poses": {"wall_s": time.perf_counter() - t, **ceiling}, "random_poses": {"wall_s": 0.0, **floor}}


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


def _row(r: dict) -> str:
    return (f"mean ‖ΔR‖_F {r['frobenius_mean']:.3f}, median {r['geodesic_median_deg']:.1f}°, "
            f"shift {_f(r.get('translation_median_px'), 2)} px, FSC 0.5 {_f(r.get('fsc05_angstrom'), 1)} Å, "
            f"0.143 {_f(r.get('fsc0143_angstrom'), 1)} Å")


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _dropped_text(got: dict) -> str:
    """Why a peer has no row of figures in a cell: the probe's lower bound was past the cap."""
    probe, cap = got["probe"], got["cap_s"]
    bound, estimate = probe["first_poses_lower_bound_s"], probe["first_poses_estimate_s"]
    return f"dropped, first poses not before ≈{bound:.0f} s (probe; estimate ≈{estimate:.0f} s) > {cap:.0f} s cap"


def _peer_line(got: dict, ours: dict) -> str:
    if got["failure"]:
        return f"FAILED after {got['wall_s']:.0f} s ({got['failure']}); command: {got['command']}"
    state = "finished" if got["finished"] else f"stopped at the {got['cap_s']:.0f} s cap"
    parts = [f"{state} after {got['wall_s']:.0f} s, {len(got['checkpoints'])} epochs with poses"]
    if got["final"]:
        parts.append(f"last: {_row(got['final'])}")
    for key, b in got["at_budget"].items():
        reached = f"{b['geodesic_median_deg']:.1f}° (epoch {b['epoch']})" if "epoch" in b else "no poses yet"
        when = f"{b['budget_s']:.0f} s" if b["within_cap"] else f"{b['budget_s']:.0f} s is beyond the cap; at the cap"
        parts.append(f"{key} ({when}): {reached}")
    match = got["time_to_match_s"]
    parts.append(f"our error ({ours['geodesic_median_deg']:.1f}°) reached after "
                 + (f"{match:.0f} s = {match / ours['wall_s']:.1f}× our wall time" if match is not None
                    else "never within the cap"))
    return "\n      ".join(parts)


# ---------------------------------------------------------------------------- report
def markdown_tables(results: dict) -> str:
    """The docs/benchmarks.md tables, from the merged JSON."""
    lines = ["| cell | method | wall time | mean ‖ΔR‖_F | median error | shift error | FSC 0.5 | FSC 0.143 |",
             "|---|---|---|---|---|---|---|---|"]
    budget_lines = ["| cell | our wall time | peer | ×1 | ×10 | ×100 | reaches our error after | peer cap |",
                    "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["cells"].items(), key=lambda kv: (kv[1]["box"], -kv[1]["snr"], kv[1]["n"])):
        rows = [("true poses (ceiling)", "–", r["true_poses"]), ("random poses (floor)", "–", r["random_poses"]),
                ("**cryofastar-stream**", f"**{r['cryofastar']['wall_s']:.0f} s**", r["cryofastar"])]
        network = r["cryofastar"].get("network_poses")
        if network:
            rows.append(("cryofastar network poses alone (before refinement)",
                         f"{network['pose_s']:.0f} s of the run", network))
        for peer, got in r["peers"].items():
            if got["final"]:
                state = "" if got["finished"] else f" (stopped at cap, epoch {got['final']['epoch']})"
                rows.append((f"{PEERS[peer]}{state}", f"{got['final']['t_s']:.0f} s", got["final"]))
            elif got.get("dropped"):
                rows.append((f"{PEERS[peer]}: {_dropped_text(got)}", "–", None))
            elif got.get("failure"):
                rows.append((f"{PEERS[peer]}: failed ({got['failure']})", f"{got['wall_s']:.0f} s", None))
            else:
                rows.append((f"{PEERS[peer]}: no poses within {got['cap_s']:.0f} s", f"{got['wall_s']:.0f} s", None))
        for method, wall, s in rows:
            if s is None:
                lines.append(f"| {name} | {method} | {wall} | – | – | – | – | – |")
                continue
            lines.append(f"| {name} | {method} | {wall} | {s['frobenius_mean']:.3f} | {s['geodesic_median_deg']:.1f}° "
                         f"| {_f(s.get('translation_median_px'), 2)} px | {_f(s.get('fsc05_angstrom'), 1)} Å "
                         f"| {_f(s.get('fsc0143_angstrom'), 1)} Å |")
        ours = r["cryofastar"]
        for peer, got in r["peers"].items():
            if got.get("failure"):
                continue
            if got.get("dropped"):
                bound = got["probe"]["first_poses_lower_bound_s"]
                columns = (f"no poses | no poses | no poses | first poses not before ≈{bound:.0f} s (probe, "
                           f"≥{bound / ours['wall_s']:.0f}×)")
                budget_lines.append(f"| {name} | {ours['wall_s']:.0f} s ({ours['geodesic_median_deg']:.1f}°) | "
                                    f"{PEERS[peer]} | {columns} | {got['cap_s']:.0f} s |")
                continue
            cells = []
            for key in ("x1", "x10", "x100"):
                b = got["at_budget"][key]
                reached = (f"{b['geodesic_median_deg']:.1f}° / {b['frobenius_mean']:.2f}" if "epoch" in b
                           else "no poses yet")
                cells.append(reached if b["within_cap"] else f"beyond the cap; at the cap: {reached}")
            match = got["time_to_match_s"]
            reach = (f"{match:.0f} s ({match / ours['wall_s']:.0f}×)" if match is not None
                     else f"not within {got['cap_s']:.0f} s (>{got['cap_s'] / ours['wall_s']:.0f}×)")
            budget_lines.append(f"| {name} | {ours['wall_s']:.0f} s ({ours['geodesic_median_deg']:.1f}°) | "
                                f"{PEERS[peer]} | {' | '.join(cells)} | {reach} | {got['cap_s']:.0f} s |")
    return "\n".join(lines) + "\n\n" + "\n".join(budget_lines) + "\n"


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
        results["peer_versions"] = _peer_versions(python)
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


def draw_figure(json_path: Path, figure: Path) -> None:
    """Error against wall time (bench/plot_peers.py, with the peer environment's matplotlib)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"no figure: {python} is missing (a run with the peer creates it)")
        return
    subprocess.run([str(python), str(HERE / "plot_peers.py"), str(json_path), str(figure)], check=True)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()

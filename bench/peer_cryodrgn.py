"""The peer of bench/compare_peers.py: cryoDRGN 4.3.1 in its own virtual environment.

Its environment (``bench/.venv-cryodrgn``: torch==2.13.0 first, then cryodrgn==4.3.1), the check of its
pose convention on the true poses, a capped run of ``abinit_homo_old`` or ``abinit`` with the score of
each epoch's poses, and the short probe that estimates when its first poses would come.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_cell import Truth, score, timed  # noqa: E402 - a sibling module

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".venv-cryodrgn"
TORCH_PIN = "torch==2.13.0"
CRYODRGN_PIN = "cryodrgn==4.3.1"
BUDGET_FACTORS = (1, 10, 100)
PEERS = {"abinit_homo_old": "cryoDRGN2 (abinit_homo_old)", "abinit": "cryoDRGN-AI (abinit)"}


# ---------------------------------------------------------------------------- peer environment
def ensure_peer_env(venv: Path) -> Path:
    """Create ``venv`` with torch==2.13.0 then cryodrgn==4.3.1 unless it has them; returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and peer_versions(python).get("cryodrgn") == CRYODRGN_PIN.split("==")[1]:
        return python
    print(f"creating {venv} ({TORCH_PIN}, then {CRYODRGN_PIN}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, CRYODRGN_PIN, TORCH_PIN], check=True)  # torch pinned again: never upgraded
    found = peer_versions(python)
    if found.get("cryodrgn") != CRYODRGN_PIN.split("==")[1]:
        raise SystemExit(f"error: {venv} has cryodrgn {found.get('cryodrgn')}, wanted {CRYODRGN_PIN}")
    return python


def peer_versions(python: Path) -> dict[str, str]:
    code = ("import json, torch, cryodrgn; "
            "print(json.dumps({'cryodrgn': cryodrgn.__version__, 'torch': torch.__version__}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}



# ---------------------------------------------------------------------------- runs and scores
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


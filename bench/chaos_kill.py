"""Crash anywhere (issue 20, item 2): SIGKILL the real daemon >= 100 times during a live session.

A simulated session (``cryofastar-stream simulate``: small box, stacks of a few
particles) is written into a watched directory over time, one stack per kill cycle at a
random moment, while the real daemon (``cryofastar-stream watch``, a subprocess) is
killed with SIGKILL and restarted, ``--kills`` times. For the first ``--refine-from`` of
the cycles poses are ``map-only`` with refinement not yet started (random poses); after
that poses come from the network and refinement is on (refine-after 150), so particles
are refined and re-posed (the map-only streaming ab initio is not used there: it starts
again at every restart, since its progress is not checkpointed, and never reached
re-posing between kills). Each kill is aimed at one moment class:

- ``startup``: while the process imports, loads the checkpoint, cleans up;
- ``random``: a uniform moment after it printed its ``watching`` line;
- ``checkpoint`` / ``particles_star`` / ``map``: the moment the temporary file of an
  atomic write of ``checkpoint.pt`` / ``particles.star`` / a map file (``volume*.mrc``,
  ``volume_fsc.tsv``, ``fsc_history.tsv``) appears in ``--out`` (polled every ms), the
  first, second or third such write of the run (so the session moves on between kills);
  the kill "landed" when that temporary file is still there after the kill;
- ``repose``: (refinement cycles) the moment ``/metrics`` shows the re-posing counter
  moving, plus up to 0.3 s ("landed": it moved).

After each kill the checkpoint is loaded and checked (its journal, pose table and grids
hold the same particles), and the next start must remove every temporary file the kill
left. One bad (truncated) stack lies in the directory from the start: ``rejected.tsv``
must hold it once, however many restarts. At the end a clean run with ``--idle-exit``
drains the session; then every simulated particle must be in ``particles.star`` exactly
once and the live ``volume.mrc`` must equal a fresh ``cryofastar-stream backproject`` of
``particles.star`` (max |difference| < 2 % of max |fresh|, the e2e test's tolerance).

Resumable: progress is saved in ``WORK/progress.json`` after every cycle; run it again
with the same ``--work`` to go on. Each daemon run's output is in ``WORK/logs/``.

    nice -n 10 .venv/bin/python bench/chaos_kill.py --kills 100 --seed 1 > bench/results/chaos_kill.log 2>&1 &

Writes ``bench/results/chaos_kill.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cryofastar"]  # the real CLI, also where only a --target install is at hand (GPU host)
DEVICE = ["--device", "auto"]  # set from --device in main()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLASSES_OFF = {"startup": 0.10, "random": 0.30, "checkpoint": 0.25, "particles_star": 0.15, "map": 0.20}
CLASSES_ON = {"startup": 0.08, "random": 0.22, "checkpoint": 0.18, "particles_star": 0.10, "map": 0.14,
              "repose": 0.28}
TARGETS = {"checkpoint": re.compile(r"^\.checkpoint\.pt\..*\.tmp$"),
           "particles_star": re.compile(r"^\.particles\.star\..*\.tmp$"),
           "map": re.compile(r"^\.(volume.*|fsc_history\.tsv)\..*\.tmp$")}
TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
AIM_TIMEOUT = 25.0  # s: an aimed kill whose moment does not come is made anyway (labelled "<class>-missed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryofastar-chaos-kill"))
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--per-stack", type=int, default=12)
    parser.add_argument("--refine-from", type=float, default=0.4,
                        help="fraction of the cycles after which refinement is on (refine-after 150)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "chaos_kill.json")
    parser.add_argument("--fresh", action="store_true", help="discard WORK and start over")
    parser.add_argument("--device", default="auto", help="the daemon's --device (auto, cpu or cuda)")
    args = parser.parse_args()
    DEVICE[1] = args.device
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    progress = _setup(work, args)
    started = time.monotonic() - progress.get("seconds", 0.0)
    while progress["cycle"] < args.kills:
        record = _cycle(work, progress, args)
        progress["kills"].append(record)
        progress["cycle"] += 1
        progress["seconds"] = time.monotonic() - started
        _save(work, progress)
        print(f"[{progress['cycle']:3d}/{args.kills}] {record['class']:<15} landed={record['landed']!s:<5} "
              f"after {record['seconds_after_start']:.2f} s  checkpoint: {record['checkpoint']}  "
              f"stale tmp removed at start: {record['stale_removed']}", flush=True)
    result = _final(work, progress, args)
    result["wall_seconds"] = time.monotonic() - started
    _report(result, progress, args)


# ---------------------------------------------------------------------------------------------------- setup
def _setup(work: Path, args: argparse.Namespace) -> dict:
    """Simulate the session once (``WORK/sim``), make ``WORK/watch`` with the bad stack; load or start progress."""
    progress_file = work / "progress.json"
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        print(f"resuming at cycle {progress['cycle']} ({work})", flush=True)
        return progress
    work.mkdir(parents=True, exist_ok=True)
    n_stacks = args.kills + 4
    sim = work / "sim"
    subprocess.run([*CLI, "simulate", "--out", str(sim), "--n", str(n_stacks * args.per_stack), "--box",
                    str(args.box), "--apix", "3.0", "--snr", "1", "--per-stack", str(args.per_stack), "--seed",
                    str(args.seed), "--no-ctf"], check=True, env=ENV, capture_output=True, timeout=1800)
    stacks = sorted(p.name for p in sim.glob("particles_*.mrcs"))
    (work / "watch").mkdir(exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    data = (sim / stacks[0]).read_bytes()
    (work / "watch" / "truncated.mrcs").write_bytes(data[: len(data) // 2])  # rejected once, however many restarts
    for name in stacks[:2]:
        _place(sim / name, work / "watch")
    progress = {"cycle": 0, "stacks": stacks, "placed": 2, "kills": [], "seconds": 0.0,
                "config": {"kills": args.kills, "seed": args.seed, "box": args.box, "per_stack": args.per_stack,
                           "refine_from_cycle": int(args.refine_from * args.kills)}}
    _save(work, progress)
    return progress


def _save(work: Path, progress: dict) -> None:
    tmp = work / ".progress.json.part"
    tmp.write_text(json.dumps(progress, indent=1))
    os.replace(tmp, work / "progress.json")


def _place(stack: Path, directory: Path) -> None:
    """Write a stack as acquisition software should: a hidden name, then a rename into place."""
    hidden = directory / f".{stack.name}.part"
    shutil.copy(stack, hidden)
    os.replace(hidden, directory / stack.name)


def _daemon_args(work: Path, refine: bool, extra: list[str]) -> list[str]:
    return [*CLI, "watch", str(work / "watch"), "--out", str(work / "out"), "--poses-from",
            "network" if refine else "map-only",
            "--settle", "0.3", "--flush", "1", "--publish-every", "1", "--checkpoint-every", "1", "--batch", "48",
            "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "0", "--interpolation", "nearest",
            "--refine-after", "150" if refine else "1000000000", "--repose-per-pass", "48", "--refine-box",
            "32", *DEVICE, *extra]


# ---------------------------------------------------------------------------------------------------- one cycle
def _cycle(work: Path, progress: dict, args: argparse.Namespace) -> dict:
    """Start the daemon, place the next stack at a random moment, kill at an aimed moment; check the checkpoint."""
    i = progress["cycle"]
    rng = random.Random(args.seed * 1_000_003 + i)
    refine = i >= progress["config"]["refine_from_cycle"]
    weights = CLASSES_ON if refine else CLASSES_OFF
    kind = rng.choices(list(weights), list(weights.values()))[0]
    out = work / "out"
    stale = sorted(p.name for p in out.glob(".*.tmp")) if out.exists() else []
    log_path = work / "logs" / f"run_{i:03d}.log"
    timer = None
    if progress["placed"] < len(progress["stacks"]):
        name = progress["stacks"][progress["placed"]]
        timer = threading.Timer(rng.uniform(0.0, 8.0), _place, (work / "sim" / name, work / "watch"))
        progress["placed"] += 1
    with open(log_path, "w") as log:
        process = subprocess.Popen(_daemon_args(work, refine, []), stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                   start_new_session=True)
    spawned = time.monotonic()
    if timer is not None:
        timer.start()
    landed, note, metrics, stale_left = None, "", None, None
    try:
        if kind == "startup":
            delay = rng.uniform(0.2, 9.0)
            watching = _wait_line(log_path, process, r"^watching .* metrics (http://\S+)", delay)
            landed = watching is None  # still starting up when killed
        else:
            watching = _wait_line(log_path, process, r"^watching .* metrics (http://\S+)", 120.0)
            if watching is None:
                raise RuntimeError(f"the daemon did not start: see {log_path}")
            metrics = watching.group(1)
            stale_left = [n for n in stale if (out / n).exists()]  # the start-up removed them before printing
            if kind == "random":
                time.sleep(rng.uniform(0.0, 6.0))
            elif kind in TARGETS:
                for _ in range(rng.randrange(3)):  # let one or two such writes finish first
                    if _wait_for_file(out, TARGETS[kind], process, AIM_TIMEOUT, None) is None:
                        break
                    _wait_for_file(out, TARGETS[kind], process, AIM_TIMEOUT, None, gone=True)
                landed = _wait_for_file(out, TARGETS[kind], process, AIM_TIMEOUT, rng)
                if landed is None:
                    kind, landed = f"{kind}-missed", False
            elif kind == "repose":
                moving = _wait_for_repose(metrics, process, AIM_TIMEOUT * 2)
                if moving:
                    time.sleep(rng.uniform(0.0, 0.3))
                    landed = True
                else:
                    kind, landed = "repose-missed", False
        alive = process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)
        killed_at = time.monotonic() - spawned
        process.wait(timeout=60)
        if not alive:
            raise RuntimeError(f"the daemon exited by itself (rc {process.returncode}): see {log_path}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        if timer is not None:
            timer.join()
    left = sorted(p.name for p in out.glob(".*.tmp")) if out.exists() else []
    if kind in TARGETS and landed:
        landed = any(TARGETS[kind].match(n) for n in left)  # the write was still under way at the kill
    removed = None if stale_left is None else len(stale) - len(stale_left)  # None: killed before it started
    if stale_left:
        note = f"stale temporaries not removed at start: {stale_left}"
    return {"cycle": i, "class": kind, "refine": refine, "poses_from": "network" if refine else "map-only",
            "landed": landed, "seconds_after_start": round(killed_at, 3),
            "leaked_tmp": left, "stale_before": stale, "stale_removed": removed, "checkpoint": _check_checkpoint(out),
            "note": note}


def _wait_line(log_path: Path, process: subprocess.Popen, pattern: str, timeout: float) -> re.Match | None:
    """The first line of the daemon's output matching ``pattern`` within ``timeout`` s (None: not yet)."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern, re.MULTILINE)
    while time.monotonic() < deadline and process.poll() is None:
        match = regex.search(log_path.read_text(errors="replace"))
        if match:
            return match
        time.sleep(0.05)
    return None


def _wait_for_file(out: Path, target: re.Pattern, process: subprocess.Popen, timeout: float,
                   rng: random.Random | None, gone: bool = False) -> bool | None:
    """Poll ``out`` every ms until a name matching ``target`` appears (True; with ``gone``: until none is
    there), or time runs out (None). With ``rng``, half the time return up to 4 ms later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            names = []
        if any(target.match(n) for n in names) != gone:
            if rng is not None and rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.004))  # sometimes a little later in the write
            return True
        time.sleep(0.001)
    return None


def _scrape(metrics: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _wait_for_repose(metrics: str, process: subprocess.Popen, timeout: float) -> bool:
    """Whether the re-posing (or ab initio) counter moved within ``timeout`` s (scraped every 0.1 s)."""
    key_repose = "cryofastar_particles_reposed_total"
    key_ab = 'cryofastar_stage_latency_seconds_count{stage="ab_initio"}'
    deadline = time.monotonic() + timeout
    first = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            values = _scrape(metrics)
        except OSError:
            time.sleep(0.1)
            continue
        now = (values.get(key_repose, 0.0), values.get(key_ab, 0.0))
        if first is None:
            first = now
        elif now != first:
            return True
        time.sleep(0.1)
    return False


def _check_checkpoint(out: Path) -> str:
    """Load ``checkpoint.pt`` as the daemon does: journal, pose table and grids must hold the same particles."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return "none yet"
    import numpy as np
    from cryofastar.daemon.state import SessionState  # imported once, after the first cycle

    state = SessionState.load(path)
    n_grid, n_journal, n_poses = state.n_particles, len(state.journal), len(state.poses)
    names = state.poses.stack_paths(np.arange(n_poses)) if n_poses else []
    ids = set(zip(names, state.poses.column("index")[:n_poses].tolist(), strict=True))
    if not n_grid == n_journal == n_poses == len(ids):
        raise RuntimeError(f"inconsistent checkpoint: grids {n_grid}, journal {n_journal}, poses {n_poses}, "
                           f"distinct {len(ids)}")
    return f"{n_grid} particles"


# ---------------------------------------------------------------------------------------------------- the end
def _final(work: Path, progress: dict, args: argparse.Namespace) -> dict:
    """Place what is left, run cleanly to idle exit, then check particles.star and the map."""
    for name in progress["stacks"][progress["placed"]:]:
        _place(work / "sim" / name, work / "watch")
    progress["placed"] = len(progress["stacks"])
    _save(work, progress)
    out = work / "out"
    stale = sorted(p.name for p in out.glob(".*.tmp"))
    log_path = work / "logs" / "final.log"
    with open(log_path, "w") as log:
        final = subprocess.run(_daemon_args(work, True, ["--idle-exit", "15"]), stdout=log, stderr=subprocess.STDOUT,
                               env=ENV, timeout=3600, check=False)
    if final.returncode != 0:
        raise RuntimeError(f"the final run failed ({final.returncode}): see {log_path}")
    import starfile
    import torch
    from cryofastar.recon.io import read_volume

    particles = starfile.read(out / "particles.star")["particles"]
    found = [f"{int(n.split('@')[0])}@{(out / n.split('@', 1)[1]).resolve()}" for n in particles["rlnImageName"]]
    expected = {f"{i}@{(work / 'watch' / s).resolve()}" for s in progress["stacks"]
                for i in range(1, progress["config"]["per_stack"] + 1)}
    duplicated = len(found) - len(set(found))
    lost = len(expected - set(found))
    extra = len(set(found) - expected)
    fresh_path = work / "fresh.mrc"
    subprocess.run([*CLI, "backproject", str(out / "particles.star"), "-o", str(fresh_path),
                    "--interpolation", "nearest"], check=True, env=ENV, capture_output=True, timeout=1800)
    live, _ = read_volume(out / "volume.mrc")
    fresh, _ = read_volume(fresh_path)
    difference = float((live - fresh).abs().max() / fresh.abs().max())
    rejected = (out / "rejected.tsv").read_text(encoding="utf-8").splitlines()[1:]
    truncated_rows = sum("truncated.mrcs" in row for row in rejected)
    del torch
    return {"particles_expected": len(expected), "particles_found": len(found), "particles_lost": lost,
            "particles_duplicated": duplicated, "particles_unexpected": extra,
            "map_max_difference_relative": difference, "map_tolerance": 0.02,
            "rejected_rows_for_the_bad_stack": truncated_rows, "rejected_rows": len(rejected),
            "stale_tmp_before_final": stale, "stale_tmp_after_final": sorted(p.name for p in out.glob(".*.tmp")),
            "final_log_tail": log_path.read_text(errors="replace").splitlines()[-3:]}


def _report(result: dict, progress: dict, args: argparse.Namespace) -> None:
    kills = progress["kills"]
    by_class: dict[str, dict[str, int]] = {}
    for k in kills:
        row = by_class.setdefault(k["class"], {"kills": 0, "landed": 0})
        row["kills"] += 1
        row["landed"] += bool(k["landed"])
    leaked = sum(len(k["leaked_tmp"]) for k in kills)
    removed = sum(k["stale_removed"] or 0 for k in kills)
    notes = [k["note"] for k in kills if k["note"]]
    passed = (result["particles_lost"] == 0 and result["particles_duplicated"] == 0
              and result["particles_unexpected"] == 0 and result["map_max_difference_relative"] < 0.02
              and result["rejected_rows_for_the_bad_stack"] == 1 and not result["stale_tmp_after_final"] and not notes)
    summary = {"kills": len(kills), "kills_by_class": by_class,
               "kills_with_refinement": sum(k["refine"] for k in kills), "temporaries_leaked_by_kills": leaked,
               "temporaries_removed_at_restart": removed, "notes": notes, **result, "passed": passed,
               "config": progress["config"], "per_kill": kills, "command": " ".join(sys.argv)}
    print("\nkills by moment class (landed = the aimed write or phase was under way at the kill):")
    for name, row in sorted(by_class.items()):
        print(f"  {name:<22} {row['kills']:4d} kills, {row['landed']:4d} landed")
    print(f"kills with refinement on: {summary['kills_with_refinement']}; temporaries leaked by kills: {leaked}, "
          f"removed at the next start: {removed}")
    print(f"particles expected {result['particles_expected']}, found {result['particles_found']}, "
          f"lost {result['particles_lost']}, duplicated {result['particles_duplicated']}, "
          f"unexpected {result['particles_unexpected']}")
    print(f"live map vs fresh backproject: max |diff| = {result['map_max_difference_relative']:.2e} of max |fresh| "
          f"(tolerance 0.02)")
    print(f"rejected.tsv rows for the bad stack: {result['rejected_rows_for_the_bad_stack']} (of "
          f"{result['rejected_rows']} rows)")
    print(f"wall time {result['wall_seconds']:.0f} s ({result['wall_seconds'] / max(1, len(kills)):.1f} s per cycle)")
    print("PASS" if passed else "FAIL")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()

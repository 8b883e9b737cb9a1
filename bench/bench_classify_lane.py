"""Does the daemon's 2D lane keep up beside the 3D lane? (issue 21, "Figures to reach")

The issue's figures: the 2D lane classifies >= 300 particles/s at box 64 and >= 100 particles/s at box 128 on
2 cores *while the 3D lane runs* (both lanes' rates side by side), and the first class averages are published
within 30 s of the first 1,000 particles. This script measures both on the real commands:

1. **Session** (not timed): ``cryofastar-stream simulate --out S --n N --box B --apix A --snr 0.1 --ctf
   --per-stack 500 --seed 1`` (default 6,000 particles at box 64, 2.0 Å/px; 3,000 at box 128, 1.0 Å/px),
   reused when ``S/particles.star`` exists (simulate writes it last).
2. **Watched directory** ``WORK/run_<tag>/watch``, made afresh for each run: the session's stacks hard-linked
   into its hidden subdirectory ``.stacks/`` (the watcher ignores hidden paths, but a STAR file may name stacks
   there), and one RELION STAR file per stack (the session's rows for that stack with their optics and CTF, the
   true poses and shifts left out, as picking/extraction writes them). So every particle reaches the daemon
   exactly once, through a STAR file, with its CTF: a stack the watcher saw bare first would be taken without
   CTF (docs/daemon.md, "What it takes").
3. **Daemon**: ``cryofastar-stream watch WATCH --out OUT --zmq tcp://127.0.0.1:PORT --metrics-port -1
   --classes K`` (plus ``--extra-args``), a subprocess with a fresh ``OUT`` (an old one would be resumed),
   its output in ``WORK/run_<tag>/daemon.log``. By default every STAR file is in place before the daemon starts
   (the session fully written); with ``--live-rate R`` they are renamed into place at R particles/s once the
   daemon's first status message arrived (a live session). With ``--warm-up K`` the first K stacks' STAR
   files are placed before the start and the rest (at once, or at ``--live-rate``) only once the 3D lane has
   posed those: both lanes are then up when the bulk arrives. The 3D lane always runs: ``watch`` has no option to
   turn it off (``--no-refine`` leaves the network's posing and the map; pass it with ``--extra-args`` to see
   the 2D lane beside a lighter 3D lane).
4. **Recording**: a :class:`~cryofastar.monitoring.subscriber.Subscriber` (connected before the daemon starts)
   records every ``status`` message (one a second; each sample is taken at the message's own ``time``, the
   daemon's clock): particles read (``particles_ingested``), posed, in the map (``particles_in_map``, the 3D
   lane) and its refinement phase, in the 2D classes (``classification.particles``), waiting for the 2D lane
   (``classification.waiting``), 2D alignments (new and re-aligned), class set version; and every ``classes``
   message (version, particles, time). It stops when both lanes hold every particle (and, with
   ``--until-aligned P``, the 2D lane has made ``P`` alignments per particle), when the daemon exits, or
   after ``--timeout`` s; then it sends the daemon SIGINT and waits for it to write its files and exit.
5. **Figures** (a crossing time is interpolated linearly between the two status samples around it):

   - per lane, **steady** particles/s = particles between two levels / time between their crossings: 10 % to
     90 % of N for the 3D lane; for the 2D lane from the end of the classifier's random start
     (``20 x classes`` particles are placed at random, without alignment, before the classes mean anything;
     docs/classification.md) or 10 % of N if later, to 90 % of N. This 2D figure is the one compared with the
     issue's target. A least-squares slope over the samples inside the same window is printed beside it;
   - the 2D lane's **rate while the 3D lane works**: the same 2D window cut to the time from the 3D lane's
     first particle posed to the map holding every particle. The 3D lane needs tens of seconds before its
     first pose (the network, the session reference); a 2D lane that is done by then ran beside a 3D lane
     that was only starting, and this figure is then empty (said so); ``--live-rate`` or a larger ``--n``
     make the two overlap;
   - the 2D lane's 10-90 % rate (random start included) and both lanes' **overall** rate (N / time from the
     daemon's start, or the first STAR file placed in a live run, to the lane holding all of them), for
     information;
   - **first classes**: the time from the 1,000th particle read to the first ``classes`` message (target
     <= 30 s). When all stacks are in place at the start, the daemon reads 1,000 particles before its first
     status message: that time is then only interpolated, and the figure judged is the upper bound, from the
     daemon's start (Python and the network loading included) to the first classes;
   - the daemon's CPU time (``/proc/PID/stat``, all its threads) over the run, and the load average (with
     ``--nproc`` that process is the launcher, whose ranks are not counted: the figure is then meaningless).

With ``--evaluate``, the lane's last class set (written when the daemon stopped) is then scored against the
session's truth (``bench/classify_eval.py``: each class matched to a projection of the true map; in-plane
error of the real particles): the figures to compare two settings by, e.g. ``--extra-args="--nproc 2"``.

A table of the figures beside the targets (met or not) is printed and the whole record, every sample
included, written as JSON to ``bench/results/classify_lane_<tag>.json``. A benchmark, not a test: the
figures depend on what else runs on the machine (the load average is recorded at start and end).

Example usage::

    .venv/bin/python bench/bench_classify_lane.py                          # box 64, 6,000 particles, 50 classes
    .venv/bin/python bench/bench_classify_lane.py --box 128                # box 128, 3,000 particles, 1.0 Å/px
    .venv/bin/python bench/bench_classify_lane.py --live-rate 600          # stacks arrive at 600 particles/s
    .venv/bin/python bench/bench_classify_lane.py --warm-up 1              # the rest once the 3D lane is up
    .venv/bin/python bench/bench_classify_lane.py --n 2000 --tag b64_n2000_check
    .venv/bin/python bench/bench_classify_lane.py --extra-args "--no-refine"
    .venv/bin/python bench/bench_classify_lane.py --figures-from bench/results/classify_lane_b64_n6000.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import starfile
from bench_classify import cli_command, json_safe
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import ClassesMessage, ProtocolError, StatusMessage
from cryofastar.recon.classify2d import ClassifierSettings

RESULTS = Path(__file__).parent / "results"
DEFAULTS = {64: (6000, 2.0), 128: (3000, 1.0)}
"""Per box: default particles and pixel size (Å)."""
TARGET_2D = {64: 300.0, 128: 100.0}
"""The issue's 2D lane rate, particles/s on 2 cores, per box."""
TARGET_FIRST_CLASSES_S = 30.0
"""The issue's first class averages after the 1,000th particle, seconds."""
FIRST_CLASSES_AT = 1000
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
STOP_WAIT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- the session
def simulate(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """The simulated session (made unless ``S/particles.star`` exists); returns (S, the command run or None)."""
    session = Path(args.work) / f"session_b{args.box}_n{args.n}_apix{args.apix:g}"
    if (session / "particles.star").exists():
        print(f"session: reusing {session}")
        return session, None
    if session.exists():
        shutil.rmtree(session)  # an interrupted simulation: particles.star is written last
    command = [*cli_command(), "simulate", "--out", str(session), "--n", str(args.n), "--box", str(args.box),
               "--apix", f"{args.apix:g}", "--snr", "0.1", "--ctf", "--per-stack", "500", "--seed", "1"]
    print("session:", shlex.join(command), flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not (session / "particles.star").exists():
        raise SystemExit(f"simulate failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return session, command


def prepare_watch(session: Path, run: Path) -> tuple[Path, list[tuple[Path, int]]]:
    """``run/watch`` with the stacks in ``.stacks/`` and one STAR file per stack staged in ``.staging/``.

    Returns the watched directory and ``[(staged STAR file, particles in it), ...]`` in stack order.
    """
    watch = run / "watch"
    stacks, staging = watch / ".stacks", watch / ".staging"
    stacks.mkdir(parents=True)
    staging.mkdir()
    blocks = starfile.read(session / "particles.star", always_dict=True)
    particles = blocks["particles"]
    stack_names = particles["rlnImageName"].str.split("@", n=1).str[1]
    staged = []
    for name in sorted(stack_names.unique()):
        os.link(session / name, stacks / name)
        rows = particles[stack_names == name].drop(columns=[c for c in POSE_COLUMNS if c in particles.columns])
        rows = rows.assign(rlnImageName=rows["rlnImageName"].str.replace("@", "@.stacks/", n=1, regex=False))
        path = staging / (Path(name).stem + ".star")
        starfile.write({"optics": blocks["optics"], "particles": rows.reset_index(drop=True)}, path)
        staged.append((path, len(rows)))
    return watch, staged


def place(staged: list[tuple[Path, int]], watch: Path, rate: float | None, log: dict) -> None:
    """Rename the staged STAR files into the watched directory: all at once, or at ``rate`` particles/s."""
    start = time.time()
    log["first_placed"] = start
    done = 0
    for path, count in staged:
        if rate is not None:
            time.sleep(max(0.0, start + done / rate - time.time()))
        os.rename(path, watch / path.name)
        done += count
    log["all_placed"] = time.time()


# ---------------------------------------------------------------------------------------------- the run
def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc; None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sample(message: StatusMessage) -> dict:
    s, c = message.status, message.status.get("classification") or {}
    phase = (s.get("refinement") or {}).get("phase")
    return {"t": message.time, "read": s.get("particles_ingested"), "posed": s.get("particles_posed"),
            "map": s.get("particles_in_map"), "phase_3d": phase, "reposed": s.get("particles_reposed"),
            "rate_3d": s.get("particles_per_second"), "classified": c.get("particles", 0),
            "waiting_2d": c.get("waiting", 0), "alignments": c.get("alignments", 0),
            "alignments_per_s": c.get("alignments_per_second"), "version": c.get("version", 0),
            "state_2d": c.get("state"), "load1": os.getloadavg()[0]}


def record(args: argparse.Namespace, watch: Path, staged: list[tuple[Path, int]], run: Path, n: int) -> dict:
    """Run the daemon on ``watch`` and record both lanes until both hold ``n`` particles (module docstring)."""
    out, port = run / "out", _free_port()
    command = [*cli_command(), "watch", str(watch), "--out", str(out), "--zmq", f"tcp://127.0.0.1:{port}",
               "--metrics-port", "-1", "--classes", str(args.classes), *shlex.split(args.extra_args)]
    placed: dict = {}
    warm, rest = staged[: args.warm_up], staged[args.warm_up:]
    warm_count = sum(count for _, count in warm)
    if warm:
        place(warm, watch, None, {})
        placed["warm_up_particles"] = warm_count
    elif args.live_rate is None:
        place(rest, watch, None, placed)  # the session is fully written before the daemon starts
        rest = []
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}", topics=("status", "classes"))
    samples, classes, last_status = [], [], None
    log_file = (run / "daemon.log").open("w")
    print("daemon:", shlex.join(command), flush=True)
    started = time.time()
    proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    placer = None
    stop_reason = "timeout"
    try:
        while time.time() - started < args.timeout:
            if proc.poll() is not None:
                stop_reason = f"daemon exited ({proc.returncode})"
                break
            try:
                message = subscriber.receive(0.5)
            except ProtocolError:
                continue
            if isinstance(message, ClassesMessage):
                classes.append({"t": message.time, "received": time.time(), "version": message.version,
                                "particles": message.particles, "classes": len(message.classes),
                                "junk": sum(1 for c in message.classes if c.junk)})
            elif isinstance(message, StatusMessage):
                last_status = message.status
                samples.append(_sample(message))
                last = samples[-1]
                if placer is None and rest and (last["posed"] or 0) >= warm_count:  # live, or after the warm-up
                    placer = threading.Thread(target=place, args=(rest, watch, args.live_rate, placed), daemon=True)
                    placer.start()
                if (last["map"] or 0) >= n and (last["classified"] or 0) >= n and \
                        (last["alignments"] or 0) >= args.until_aligned * n:
                    stop_reason = "both lanes hold every particle"
                    break
                if len(samples) % 10 == 0:
                    print(f"  t={last['t'] - started:6.1f} s  read {last['read']}  map {last['map']} "
                          f"({last['phase_3d']})  "
                          f"2D {last['classified']} (waiting {last['waiting_2d']}, {last['alignments']} alignments, "
                          f"version {last['version']}, {last['state_2d']})  load {last['load1']:.1f}", flush=True)
        cpu = _cpu_seconds(proc.pid)
        wall = time.time() - started
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            exit_code = proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = f"killed: not stopped {STOP_WAIT_S:.0f} s after SIGINT"
        stopped = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subscriber.close()
        log_file.close()
    tail = (run / "daemon.log").read_text(errors="replace").strip().splitlines()[-15:]
    if last_status is not None:
        last_status = {k: v for k, v in last_status.items() if k not in ("views", "rejected_recent")}
    return {"command": shlex.join(command), "started": started, "placed": placed, "stop_reason": stop_reason,
            "stopped_after_s": stopped - started, "exit_code": exit_code, "daemon_cpu_seconds": cpu,
            "daemon_wall_seconds_at_stop": wall, "samples": samples, "classes_messages": classes,
            "last_status": last_status, "daemon_log_tail": tail,
            "rejected_tsv": (out / "rejected.tsv").read_text() if (out / "rejected.tsv").exists() else ""}


# ---------------------------------------------------------------------------------------------- the figures
def crossing(times: np.ndarray, values: np.ndarray, level: float) -> float | None:
    """First time the series reaches ``level``, interpolated between the samples around it (None: never)."""
    reached = np.flatnonzero(values >= level)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0 or values[i] == values[i - 1]:
        return float(times[i])
    return float(times[i - 1] + (level - values[i - 1]) * (times[i] - times[i - 1]) / (values[i] - values[i - 1]))


def _value_at(times: np.ndarray, values: np.ndarray, t: float) -> float:
    return float(np.interp(t, times, values))


def window_rate(times: np.ndarray, values: np.ndarray, lo: float, hi: float, end: float | None = None) -> dict:
    """Particles/s between the crossings of ``lo`` and ``hi`` (the window cut at time ``end`` if earlier).

    Returns ``{"lo", "hi", "t_lo", "t_hi", "seconds", "rate", "fit_rate", "samples"}``; ``rate`` None when the
    window is empty or never reached.
    """
    t_lo, t_hi = crossing(times, values, lo), crossing(times, values, hi)
    result = {"lo": lo, "hi": hi, "t_lo": t_lo, "t_hi": t_hi, "seconds": None, "rate": None, "fit_rate": None,
              "samples": 0}
    if t_lo is None or t_hi is None:
        return result
    if end is not None and end < t_hi:
        t_hi = end
        result["hi"] = hi = _value_at(times, values, end)
        result["t_hi"] = t_hi
    if t_hi <= t_lo:
        return result
    result["seconds"] = t_hi - t_lo
    result["rate"] = (hi - lo) / (t_hi - t_lo)
    inside = (times >= t_lo) & (times <= t_hi)
    result["samples"] = int(inside.sum())
    if inside.sum() >= 3:
        result["fit_rate"] = float(np.polyfit(times[inside], values[inside], 1)[0])
    return result


def overlap_rate(times: np.ndarray, values: np.ndarray, window: dict, t_start: float | None,
                 t_end: float | None) -> dict:
    """Particles/s of ``values`` over ``window`` (:func:`window_rate`) cut to ``[t_start, t_end]``.

    Returns ``{"t_lo", "t_hi", "lo", "hi", "seconds", "rate", "fit_rate", "samples"}``; ``rate`` None when the
    two do not overlap (e.g. the 2D lane was done before the 3D lane posed its first particle).
    """
    result = {"t_lo": None, "t_hi": None, "lo": None, "hi": None, "seconds": None, "rate": None, "fit_rate": None,
              "samples": 0}
    if window["t_lo"] is None or window["t_hi"] is None or t_start is None:
        return result
    t_lo = max(window["t_lo"], t_start)
    t_hi = window["t_hi"] if t_end is None else min(window["t_hi"], t_end)
    if t_hi <= t_lo:
        return result
    lo, hi = _value_at(times, values, t_lo), _value_at(times, values, t_hi)
    inside = (times >= t_lo) & (times <= t_hi)
    result.update(t_lo=t_lo, t_hi=t_hi, lo=lo, hi=hi, seconds=t_hi - t_lo, rate=(hi - lo) / (t_hi - t_lo),
                  samples=int(inside.sum()))
    if inside.sum() >= 3:
        result["fit_rate"] = float(np.polyfit(times[inside], values[inside], 1)[0])
    return result


def figures(rec: dict, n: int, box: int, classes: int) -> dict:
    """The run's figures (module docstring, step 5); times are unix seconds, durations seconds.

    The series start with a point of zeros at ``t0`` (nothing read when the daemon started, or when the first
    STAR file was placed in a live run), so a level reached before the first status message is interpolated
    between ``t0`` and that message (and flagged: the figure is then an estimate).
    """
    samples = rec["samples"]
    if not samples:
        return {"error": "no status message received"}
    placed = rec["placed"].get("first_placed")
    warm = rec["placed"].get("warm_up_particles")
    t0 = rec["started"] if placed is None or warm else max(rec["started"], placed)
    t = np.array([t0] + [s["t"] for s in samples], dtype=float)
    read = np.array([0] + [s["read"] or 0 for s in samples], dtype=float)
    in_map = np.array([0] + [s["map"] or 0 for s in samples], dtype=float)
    classified = np.array([0] + [s["classified"] or 0 for s in samples], dtype=float)
    first_status = float(t[1])
    posed = np.array([0] + [s["posed"] or 0 for s in samples], dtype=float)
    t_3d_done, t_2d_done = crossing(t, in_map, n), crossing(t, classified, n)
    t_3d_first_posed = crossing(t, posed, 1)
    random_start = min(ClassifierSettings(n_classes=classes).start_particles, n)  # placed at random, not aligned
    lo_2d = max(0.1 * n, random_start)
    if lo_2d >= 0.9 * n:
        lo_2d = 0.1 * n  # a session too small for a window past the random start: said in the table
    f = {
        "n": n, "t0": t0, "warm_up": warm, "t_first_status": first_status, "random_start_particles": random_start,
        "window_2d_includes_random_start": lo_2d < random_start,
        "steady_3d": window_rate(t, in_map, 0.1 * n, 0.9 * n),
        "steady_2d": window_rate(t, classified, lo_2d, 0.9 * n),
        "steady_2d_10_90": window_rate(t, classified, 0.1 * n, 0.9 * n),
        "t_3d_first_posed": t_3d_first_posed,
        "t_3d_done": t_3d_done, "t_2d_done": t_2d_done,
        "overall_3d": None if t_3d_done is None else n / (t_3d_done - t0),
        "overall_2d": None if t_2d_done is None else n / (t_2d_done - t0),
        "peak_waiting_2d": int(max(s["waiting_2d"] or 0 for s in samples)),
        "alignments": int(samples[-1]["alignments"] or 0),
    }
    # the 2D window while the 3D lane works: from its first particle posed to the map holding every particle
    f["steady_2d_while_3d_runs"] = overlap_rate(t, classified, f["steady_2d"], t_3d_first_posed, t_3d_done)
    for key in ("steady_3d", "steady_2d", "steady_2d_while_3d_runs", "steady_2d_10_90"):
        w = f[key]
        w["estimated"] = w["t_lo"] is not None and w["t_lo"] < first_status  # lo reached before the first status
    w = f["steady_2d"]
    if w["rate"] is not None:
        align = np.array([0] + [s["alignments"] or 0 for s in samples], dtype=float)
        f["alignments_per_s_in_2d_window"] = (_value_at(t, align, w["t_hi"]) - _value_at(t, align, w["t_lo"])) / \
            w["seconds"]
    level = min(FIRST_CLASSES_AT, n)
    t_level = crossing(t, read, level)
    first = rec["classes_messages"][0] if rec["classes_messages"] else None
    before = t_level is not None and t_level < first_status
    f["first_classes"] = {
        "read_level": level, "t_read_level": t_level, "t_first_classes": None if first is None else first["t"],
        "particles": None if first is None else first["particles"],
        "seconds_after_read_level": None if first is None or t_level is None else first["t"] - t_level,
        # the level was read before the first status message: its time is interpolated, and the delay is at most
        # the time from t0 (the daemon's start, or the first STAR placed) to the first classes
        "read_level_before_first_status": before,
        "seconds_after_t0": None if first is None else first["t"] - t0,
    }
    judged = f["first_classes"]["seconds_after_t0" if before else "seconds_after_read_level"]
    f["class_sets"] = len({m["version"] for m in rec["classes_messages"]})
    target = TARGET_2D.get(box)
    f["targets"] = {"rate_2d": target, "first_classes_s": TARGET_FIRST_CLASSES_S}
    f["met"] = {
        "rate_2d": None if target is None or w["rate"] is None else w["rate"] >= target,
        "rate_2d_while_3d_runs": None if target is None or f["steady_2d_while_3d_runs"]["rate"] is None
        else f["steady_2d_while_3d_runs"]["rate"] >= target,
        # judged on the upper bound when the read time is only interpolated
        "first_classes": None if judged is None or level < FIRST_CLASSES_AT else judged <= TARGET_FIRST_CLASSES_S,
    }
    cpu, wall = rec["daemon_cpu_seconds"], rec["daemon_wall_seconds_at_stop"]
    f["daemon_cores_used"] = None if cpu is None or not wall else cpu / wall
    return f


def _n(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None else format(value, spec)


def _met(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def table(f: dict, box: int, live: float | None) -> str:
    """The figures as a Markdown table (lane rates side by side, then first classes)."""
    def win(w: dict, overlap: bool = False) -> str:
        if w["rate"] is None and overlap:
            return "– (no overlap: the 2D window ended before the 3D lane posed its first particle)"
        if w["rate"] is None:
            return "– (window not reached)"
        fit = "" if w["fit_rate"] is None else f", fit {w['fit_rate']:.0f}"
        est = "; its start interpolated before the first status" if w["estimated"] else ""
        return f"{w['rate']:.0f} ({w['lo']:.0f}→{w['hi']:.0f} in {w['seconds']:.1f} s{fit}{est})"

    target = TARGET_2D.get(box)
    t2d = "–" if target is None else f"≥ {target:.0f}"
    fc = f["first_classes"]
    start = " (random start included: session too small)" if f["window_2d_includes_random_start"] else ""
    zero = "daemon start" if live is None or f.get("warm_up") else "first STAR placed"
    first = f"{_n(fc['seconds_after_read_level'], '.1f')}"
    if fc["read_level_before_first_status"]:
        first = f"≤ {_n(fc['seconds_after_t0'], '.1f')} (read before the first status: bound from {zero})"
    first += f"; version 1 held {_n(fc['particles'], 'd')} particles"
    rows = [
        "| figure | 3D lane (map) | 2D lane (classes) | target (2D) | met |",
        "|---|---|---|---|---|",
        f"| steady particles/s{start} | {win(f['steady_3d'])} | {win(f['steady_2d'])} | {t2d} | "
        f"{_met(f['met']['rate_2d'])} |",
        f"| 2D while the 3D lane poses and inserts | | {win(f['steady_2d_while_3d_runs'], overlap=True)} | {t2d} | "
        f"{_met(f['met']['rate_2d_while_3d_runs'])} |",
        f"| 10–90 % particles/s (2D: random start included) | {win(f['steady_3d'])} | "
        f"{win(f['steady_2d_10_90'])} | | |",
        f"| overall particles/s ({zero} → lane holds all) | {_n(f['overall_3d'])} | {_n(f['overall_2d'])} | | |",
        f"| lane holds all, s after {zero} | {_n(_rel(f['t_3d_done'], f['t0']), '.1f')} | "
        f"{_n(_rel(f['t_2d_done'], f['t0']), '.1f')} | | |",
        f"| 2D alignments/s in the 2D window (new + re-aligned) | | "
        f"{_n(f.get('alignments_per_s_in_2d_window'))} | | |",
        f"| peak particles waiting for the 2D lane | | {f['peak_waiting_2d']} | | |",
        f"| first classes, s after particle {fc['read_level']:,} read | | {first} | "
        f"≤ {TARGET_FIRST_CLASSES_S:.0f} | {_met(f['met']['first_classes'])} |",
        f"| daemon CPU, cores used on average | {_n(f['daemon_cores_used'], '.2f')} | | | |",
    ]
    return "\n".join(rows)


def _rel(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else t - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--box", type=int, default=64, help="box, px (default 64)")
    p.add_argument("--n", type=int, default=None, help="particles (default 6,000 at box 64, 3,000 at box 128)")
    p.add_argument("--apix", type=float, default=None, help="pixel size, Å (default 2.0 at box 64, 1.0 at 128)")
    p.add_argument("--classes", type=int, default=50, help="2D classes (default 50)")
    p.add_argument("--live-rate", type=float, default=None,
                   help="particles/s: the STAR files appear at this rate while the daemon runs (default: all "
                        "in place before it starts)")
    p.add_argument("--warm-up", type=int, default=0, metavar="STACKS",
                   help="place this many stacks' STAR files first and the rest only once the 3D lane has posed "
                        "them (so that both lanes are up when the rest comes; default 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="stop recording after this many s (default 900)")
    p.add_argument("--work", default="/tmp/bench_classify_lane", help="working directory (sessions, runs)")
    p.add_argument("--extra-args", default="", help="extra arguments for watch (one string)")
    p.add_argument("--tag", default=None, help="JSON name: bench/results/classify_lane_<tag>.json")
    p.add_argument("--until-aligned", type=float, default=0.0, metavar="PASSES",
                   help="also wait until the 2D lane has made this many alignments per particle (its idle "
                        "re-alignment goes on to --passes, 4 by default)")
    p.add_argument("--evaluate", action="store_true",
                   help="after the run, score the 2D lane's last class set against the session's truth "
                        "(bench/classify_eval.py: class correlation with the true map, in-plane error)")
    p.add_argument("--figures-from", default=None, metavar="JSON",
                   help="run nothing: compute the figures of a recorded run (its JSON) again, print them and "
                        "write them back into it")
    args = p.parse_args(argv)
    n, apix = DEFAULTS.get(args.box, (3000, 1.0))
    args.n = n if args.n is None else args.n
    args.apix = apix if args.apix is None else args.apix
    if args.n < 1 or args.classes < 1 or args.box < 8 or args.box % 2:
        p.error("--n and --classes must be >= 1, --box even and >= 8")
    if args.warm_up < 0:
        p.error("--warm-up must be >= 0")
    if args.live_rate is not None and args.live_rate <= 0:
        p.error("--live-rate must be > 0")
    return args


def refigure(path: Path) -> int:
    """Compute a recorded run's figures again from its samples (``--figures-from``); print and write them back."""
    payload = json.loads(path.read_text())
    settings = payload["settings"]
    f = figures(payload["run"], payload["figures"]["n"], settings["box"], settings["classes"])
    print(table(f, settings["box"], settings["live_rate"]))
    payload["figures"] = f
    path.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


def evaluate_against_truth(session: Path, run: Path) -> dict:
    """The lane's last class set (``run/out/classes``) scored against the simulated ``session``'s truth
    (:func:`classify_eval.evaluate_classification`). The lane names particles relative to ``--out`` and through the
    watched directory's hard links, so the truth is rewritten to name the same links (``run/truth``) and the
    class files are read from a folder beside ``out`` (``run/classes_scored``), where those names resolve."""
    import starfile
    from classify_eval import evaluate_classification

    truth = starfile.read(session / "particles.star", always_dict=True)
    particles = truth["particles"].copy()
    links = (run / "watch" / ".stacks").resolve()
    parts = particles["rlnImageName"].str.split("@", n=1, expand=True)
    particles["rlnImageName"] = parts[0] + "@" + parts[1].map(lambda name: str(links / Path(name).name))
    folder = run / "truth"
    folder.mkdir(exist_ok=True)
    starfile.write({"optics": truth["optics"], "particles": particles}, folder / "particles.star", overwrite=True)
    reference = folder / "reference.mrc"
    if not reference.exists():
        reference.symlink_to((session / "reference.mrc").resolve())
    scored = run / "classes_scored"
    shutil.copytree(run / "out" / "classes", scored, dirs_exist_ok=True)
    return evaluate_classification(scored, folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.figures_from is not None:
        return refigure(Path(args.figures_from))
    tag = args.tag or (f"b{args.box}_n{args.n}" + ("" if args.live_rate is None else f"_live{args.live_rate:g}")
                       + ("" if not args.warm_up else f"_warm{args.warm_up}"))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    session, simulate_command = simulate(args)
    run = Path(args.work) / f"run_{tag}"
    if run.exists():
        shutil.rmtree(run)  # a fresh watched directory and --out (an old --out would be resumed)
    watch, staged = prepare_watch(session, run)
    n = sum(count for _, count in staged)
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load at start: {uptime_start}", flush=True)
    rec = record(args, watch, staged, run, n)
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    f = figures(rec, n, args.box, args.classes)
    print(f"\nstopped: {rec['stop_reason']}; daemon exit {rec['exit_code']}; load at end: {uptime_end}")
    print("daemon's last lines:\n" + "\n".join("    " + line for line in rec["daemon_log_tail"][-4:]))
    if "error" not in f:
        mode = "all stacks in place before start" if args.live_rate is None else f"live at {args.live_rate:g} p/s"
        if args.warm_up:
            mode = f"{args.warm_up} stack(s) first, the rest once posed: " + mode.replace(" before start", "")
        print(f"\n{n:,} particles, box {args.box}, {args.apix:g} Å/px, {args.classes} classes, {mode}, "
              f"{os.cpu_count()} CPUs, extra args {args.extra_args!r}\n")
        print(table(f, args.box, args.live_rate))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"classify_lane_{tag}.json"
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "settings": vars(args), "session": str(session), "simulate_command":
               None if simulate_command is None else shlex.join(simulate_command),
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "python": platform.python_version(), "uptime_start": uptime_start,
                           "uptime_end": uptime_end},
               "figures": f, "run": rec}
    if args.evaluate:
        quality = evaluate_against_truth(session, run)
        payload["quality"] = quality
        inplane = quality["inplane"]
        print(f"\nclasses against the truth: good fraction {quality['good_fraction']:.3f}, median class correlation "
              f"{quality['median_class_correlation']:.3f}, in-plane error median {inplane['median_degrees']:.2f}° "
              f"(90th percentile {inplane['p90_degrees']:.1f}°, within 5° {inplane['within_5_degrees']:.3f})")
    path.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    print(f"\nwrote {path}")
    complete = rec["stop_reason"] == "both lanes hold every particle" and rec["exit_code"] == 0
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end throughput of the streaming daemon, in-process, against the bare model rate.

A benchmark, not a test: the figures vary by ±20 % from run to run on a shared VM.

What it measures, in one process and one run:

1. **Simulation** (not timed as part of any figure): ``--n`` particles of a procedural
   molecule at ``--box`` px and ``--apix`` Å (default 1.5 Å, more if the molecule would not
   fit in 80 % of the box), SNR ``--snr``, in stacks of ``--per-stack``,
   written into ``<root>/watch/.staging`` (hidden, so the watcher ignores it).
2. **Daemon end to end** (first, so its peak memory is its own): a :class:`~cryofastar.daemon.pipeline.Daemon` watches
   ``<root>/watch`` (empty of particle files) with ``metrics_port=None``, ZeroMQ on
   ``tcp://127.0.0.1:0``, settle 0.2 s, flush 1 s, a map every ``publish_particles``
   particles (``--publish-particles``, default min(1000, n/4)) or 10 s, checkpoints every
   60 s (the daemon default). A :class:`~cryofastar.monitoring.subscriber.Subscriber`
   connects, then the stacks are renamed from the staging directory into the watched one
   (all at once, or at ``--rate`` particles/s). A rename inside the watched tree is complete
   at once (no settle wait), like acquisition software that writes a hidden name and
   renames it. ``daemon.particles_in_map`` is polled every 50 ms. Figures:

   - time from the first stack placed to the first published map (the subscriber's first
     volume message) and to the first particle in the map;
   - **sustained rate** = (particles accumulated after the first accumulation) /
     (time of the last accumulation - time of the first), so reference selection, the
     first pass and the final map + checkpoint are outside the window;
   - **steady rate** = (particles not in the first poser call) / (time all are in the map -
     time the first poser call finished). The same idea, but robust to a map that grows in
     bursts: on a CPU the poser can hold the compute lock while the accumulator waits, and
     the first -> last accumulation window then shrinks to the final burst;
   - end-to-end rate = all particles / (last accumulation - first stack placed);
   - the time ``Daemon.stop()`` takes (final map, particles.star, checkpoint), separately;
   - the daemon's own stage latencies (prometheus histogram
     ``cryofastar_stage_latency_seconds``), in the window and at stop.

3. **Bare rate**: the same images, already in memory, Fourier-cropped to the model box
   (``to_model_box``) and posed with :class:`~cryofastar.model.session_frame.SessionFrame`
   (same ``--batch`` views, same anchors and sets per pass as the daemon), after a
   warm-up pass, in a worker thread like the daemon's poser; no I/O, no insertion, no
   queues. Timed once over the whole set in one call (full passes: the model-bound
   ceiling), and once one stack per call (how the daemon's poser receives them: a stack of
   200 is one pass of 119 new particles plus one of 81).
4. **Ratios** steady and sustained daemon rate / bare rate (one call); the issue's target
   is ≥ 0.90 (model-bound).
5. Peak resident memory (``ru_maxrss``) after each stage; the daemon runs before the bare
   stage so its peak does not include the bare stage's image array.
6. **The dashboard's cost** (``--dashboard none,server,browser --rounds N``): the daemon
   run is repeated on the same stacks (hard links), alternating: without a dashboard;
   with the dashboard process subscribed (``server``, as ``--dashboard-port`` runs it);
   and with, in addition, a headless Debian chromium page showing it on the same machine
   (``browser``: the worst case, a browser competing for the daemon's cores). A table
   gives the steady rate of each run and each mode's mean against ``none``; the main
   report above is the first run's.

    python bench/bench_stream.py                                   # defaults: 4000 particles, box 128, CPU
    python bench/bench_stream.py --device cuda                     # on a GPU
    python bench/bench_stream.py --rate 300                        # stacks arrive at 300 particles/s
    python bench/bench_stream.py --n 600 --box 64 --per-stack 100  # quick smoke run
    python bench/bench_stream.py --json stream.json --keep /tmp/stream-run
    python bench/bench_stream.py --dashboard none,server,browser --rounds 2   # the dashboard's cost
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from cryofastar.daemon.pipeline import Daemon, DaemonSettings
from cryofastar.engine.posing import NetworkPoser, sets_per_pass
from cryofastar.model.preprocess import to_model_box
from cryofastar.model.weights import load_model
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import ProtocolError, VolumeMessage
from cryofastar.recon.device import resolve_device
from cryofastar.recon.io.mrc import read_images
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, write_session

TARGET_RATIO = 0.90
STAGES = ("read", "pose", "accumulate", "map", "checkpoint")
POLL_SECONDS = 0.05
SETTLE_SECONDS = 0.2
FLUSH_SECONDS = 1.0
PUBLISH_SECONDS = 10.0


# ---------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mib() -> float:
    """Peak resident set of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024


def current_rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(device: torch.device) -> dict[str, float | None]:
    out: dict[str, float | None] = {"peak_rss_mib": peak_rss_mib(), "rss_mib": current_rss_mib()}
    if device.type == "cuda":
        out["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def stage_latencies(daemon: Daemon) -> dict[str, tuple[float, float]]:
    """``{stage: (count, total seconds)}`` from the daemon's latency histogram (0 for a stage not yet run)."""
    observed = daemon.metrics.stage_seconds()
    return {stage: tuple(map(float, observed.get(stage, (0, 0.0)))) for stage in STAGES}


def counter(daemon: Daemon, name: str) -> float:
    return daemon.metrics.total(name)


def in_worker_thread(fn, *args):  # noqa: ANN001, ANN002, ANN201
    """``fn(*args)`` in a fresh thread, as the daemon's poser runs (its result, or its exception re-raised).

    On a loaded 2-core VM the same forward pass ran 2-5x slower in the main thread than in
    a worker thread (cause not pinned down; OpenMP thread teams are per calling thread), so
    the bare figure is taken the way the daemon's poser runs.
    """
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="bench-bare")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def choose_apix(box: int, radius: float, apix: float | None) -> float:
    """``--apix`` if given, else 1.5 Å or more so the molecule's diameter is at most 80 % of the box."""
    if apix is not None:
        return apix
    return max(1.5, math.ceil(2.5 * radius / box * 20) / 20)


# ---------------------------------------------------------------------------- stages
def simulate(staging: Path, args: argparse.Namespace) -> tuple[list[Path], float, float]:
    """Write the session into ``staging``; returns (stacks in order, apix, seconds)."""
    t0 = time.perf_counter()
    atoms = procedural_molecule(args.seed)
    radius = atoms.radius_angstrom()
    apix = choose_apix(args.box, radius, args.apix)
    if radius > 0.5 * args.box * apix:
        print(f"warning: molecule radius {radius:.0f} Å exceeds half the box ({0.5 * args.box * apix:.0f} Å): "
              "it is cut off; use a larger --box or --apix")
    volume = atoms_to_volume(atoms, args.box, apix)
    snr = None if args.snr is None or not math.isfinite(args.snr) else args.snr
    write_session(staging, volume, apix, args.n, snr, args.seed, per_stack=args.per_stack)
    stacks = sorted(staging.glob("particles_*.mrcs"))
    return stacks, apix, time.perf_counter() - t0


class VolumeWatch:
    """A subscriber thread noting when the first map arrives (and how many distinct maps came)."""

    def __init__(self, address: str) -> None:
        self.subscriber = Subscriber(address, topics=("volume",))
        self.first_at: float | None = None
        self.first_particles: int | None = None
        self.maps: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.subscriber.receive(0.05)
            except ProtocolError:
                continue
            if isinstance(message, VolumeMessage):
                if self.first_at is None:
                    self.first_at = time.monotonic()
                    self.first_particles = message.particles
                self.maps.add((message.session, message.seq))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.subscriber.close()


def place(stacks: list[Path], watch: Path, per_stack: list[int], rate: float | None, log: dict) -> None:
    """Rename the stacks into the watched directory, all at once or at ``rate`` particles/s."""
    start = time.monotonic()
    log["first_placed"] = start
    done = 0
    for stack, count in zip(stacks, per_stack, strict=True):
        if rate is not None:
            time.sleep(max(0.0, start + done / rate - time.monotonic()))
        os.rename(stack, watch / stack.name)
        done += count
    log["all_placed"] = time.monotonic()


class DashboardLoad:
    """The live dashboard beside the daemon: ``server`` (its own process, as ``--dashboard-port`` runs it)
    or ``browser`` (plus a headless Debian chromium page showing it, on the same machine)."""

    def __init__(self, mode: str, address: str) -> None:
        from cryofastar.monitoring.dashboard_process import DashboardProcess, connectable

        self.mode, self.page, self._pw, self._browser = mode, None, None, None
        self.server = DashboardProcess(connectable(address), 0)
        if mode == "browser":
            from cryofastar.monitoring.headless_browser import launch_chromium
            from playwright.sync_api import sync_playwright

            self._pw = sync_playwright().start()
            self._browser = launch_chromium(self._pw)
            self.page = self._browser.new_page(viewport={"width": 1400, "height": 1400})
            self.page.goto(self.server.url)

    def close(self) -> dict[str, object]:
        """Stop everything; what the page showed last (particles in its map), if a page was open."""
        shown = None
        if self.page is not None:
            time.sleep(1.0)  # the final map's message
            text = (self.page.text_content("#map-note") or "").split()
            shown = int(text[0]) if text and text[0].isdigit() else 0
            self._browser.close()
            self._pw.stop()
        self.server.stop()
        return {"mode": self.mode, "page_map_particles": shown}


def run_daemon(root: Path, stacks: list[Path], counts: list[int], args: argparse.Namespace,
               publish_particles: int, dashboard: str = "none") -> dict[str, object]:
    watch, out = root / "watch", root / "out"
    settings = DaemonSettings(
        watch=watch, out=out, zmq="tcp://127.0.0.1:0", metrics_port=None, device=args.device, batch=args.batch,
        settle_seconds=SETTLE_SECONDS, flush_seconds=FLUSH_SECONDS, publish_seconds=PUBLISH_SECONDS,
        publish_particles=publish_particles, interpolation=args.interpolation, refine=args.refine,
    )
    expected = sum(counts)
    t0 = time.monotonic()
    daemon = Daemon(settings)
    daemon.start()
    startup = time.monotonic() - t0
    assert daemon.address is not None
    load = None if dashboard == "none" else DashboardLoad(dashboard, daemon.address)
    volumes = VolumeWatch(daemon.address)
    time.sleep(0.5)  # let the SUB connection and subscription reach the publisher (ZeroMQ slow joiner)

    placed: dict[str, float] = {}
    placer = threading.Thread(target=place, args=(stacks, watch, counts, args.rate, placed), daemon=True)
    placer.start()
    while "first_placed" not in placed:
        time.sleep(0.001)
    t_place = placed["first_placed"]
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    first_posed: tuple[float, int] | None = None
    timeline: list[tuple[float, int, int]] = []  # (seconds since first stack placed, posed, in map) at each change
    n_prev = posed_prev = 0
    reason = "all particles in the map"
    while True:
        now = time.monotonic()
        n_now = daemon.particles_in_map
        posed_now = int(daemon.status()["particles_posed"])
        if posed_now != posed_prev and first_posed is None:
            first_posed = (now, posed_now)
        if n_now != n_prev:
            if first is None:
                first = (now, n_now)
            last = (now, n_now)
        if n_now != n_prev or posed_now != posed_prev:
            timeline.append((round(now - t_place, 3), posed_now, n_now))
            n_prev, posed_prev = n_now, posed_now
        if n_now >= expected:
            break
        if daemon.errors:
            reason = f"daemon error: {daemon.errors[0]}"
            break
        quiet = now - (last[0] if last else t_place)
        if "all_placed" in placed and quiet > 3.0 and daemon.wait_idle(0.01):
            reason = f"daemon idle with {n_now} of {expected} particles (see {out / 'rejected.tsv'})"
            break
        if quiet > args.stall:
            reason = f"no progress for {args.stall:.0f} s at {n_now} of {expected} particles"
            break
        time.sleep(POLL_SECONDS)
    placer.join()
    status = daemon.status()
    in_window = stage_latencies(daemon)
    batches = counter(daemon, "batches")
    maps_in_window = counter(daemon, "maps_published")
    t_stop = time.monotonic()
    daemon.stop()
    stop_seconds = time.monotonic() - t_stop
    total = stage_latencies(daemon)
    time.sleep(0.2)  # the final map's message
    volumes.close()
    shown = {"mode": "none"} if load is None else load.close()

    assert first is not None and last is not None and first_posed is not None, "no particle was ever accumulated"
    window = last[0] - first[0]
    n_window = last[1] - first[1]
    steady_window = last[0] - first_posed[0]
    n_steady = last[1] - first_posed[1]
    result: dict[str, object] = {
        "finished": reason,
        "particles_expected": expected,
        "particles_in_map": daemon.particles_in_map,
        "particles_rejected": status["particles_rejected"],
        "files_rejected": status["files_rejected"],
        "startup_seconds": startup,
        "placing_seconds": placed["all_placed"] - t_place,
        "first_particle_seconds": first[0] - t_place,
        "first_particle_count": first[1],
        "first_map_seconds": None if volumes.first_at is None else volumes.first_at - t_place,
        "first_map_particles": volumes.first_particles,
        "first_map_at_stop": volumes.first_at is not None and volumes.first_at >= t_stop,
        "window_seconds": window,
        "window_particles": n_window,
        "sustained_rate": n_window / window if window > 0 else math.nan,
        "first_posed_seconds": first_posed[0] - t_place,
        "first_posed_count": first_posed[1],
        "steady_window_seconds": steady_window,
        "steady_particles": n_steady,
        "steady_rate": n_steady / steady_window if steady_window > 0 else math.nan,
        "run_seconds": last[0] - t_place,
        "end_to_end_rate": last[1] / (last[0] - t_place),
        "max_posed_not_in_map": max((p - m for _, p, m in timeline), default=0),
        "daemon_reported_rate": status["particles_per_second"],
        "stop_seconds": stop_seconds,
        "forward_passes_in_window": batches,
        "maps_in_window": maps_in_window,
        "maps_received": len(volumes.maps),
        "stages_in_window": {k: {"count": c, "seconds": s} for k, (c, s) in in_window.items()},
        "stages_at_stop": {k: {"count": total[k][0] - c, "seconds": total[k][1] - s}
                           for k, (c, s) in in_window.items()},
        "timeline_posed_in_map": timeline,
        "dashboard": shown,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    return result


def bare_rate(stacks: list[Path], device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    """Crop + pose rate of the same images in memory, without the daemon."""
    images = [read_images(path) for path in stacks]
    everything = torch.cat(images)
    model = load_model(None, device)
    defaults = DaemonSettings(watch=Path("."), out=Path("."))
    poser = NetworkPoser(model, views=args.batch, anchors=defaults.anchors)  # the daemon's recipe
    sets = sets_per_pass(device)
    mb = poser.model_box
    poser.choose_reference(everything[:2])  # warm-up
    t0 = time.perf_counter()
    poser.choose_reference(everything[: defaults.candidates])
    reference_seconds = time.perf_counter() - t0
    frame = poser.frame  # crop and forward passes timed apart below
    per_pass = args.batch - 1 - frame.n_anchors
    frame.pose(to_model_box(everything[: args.batch - 1], mb))  # warm-up; the bootstrap pass chooses the anchors
    frame.pose(to_model_box(everything[: sets * per_pass], mb))  # warm-up of a full pass with anchors

    def timed(fn):  # noqa: ANN001, ANN202
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value, time.perf_counter() - t0

    cropped, crop_seconds = timed(lambda: to_model_box(everything, mb))
    _, pose_seconds = timed(lambda: frame.pose(cropped))
    n = everything.shape[0]

    def per_stack() -> None:
        for stack in images:
            frame.pose(to_model_box(stack, mb))

    _, per_stack_seconds = timed(per_stack)
    return {
        "particles": n,
        "model_box": mb,
        "views": args.batch,
        "anchors": frame.n_anchors,
        "sets_per_pass": sets,
        "new_particles_per_pass": per_pass,
        "reference_candidates": min(defaults.candidates, n),
        "reference_seconds": reference_seconds,
        "crop_seconds": crop_seconds,
        "pose_seconds": pose_seconds,
        "rate": n / (crop_seconds + pose_seconds),
        "pose_only_rate": n / pose_seconds,
        "per_stack_seconds": per_stack_seconds,
        "per_stack_rate": n / per_stack_seconds,
    }


# ---------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def report(hw: dict, args: argparse.Namespace, sim: dict, daemon: dict, bare: dict, mem: dict) -> None:
    gpu = f", GPU {hw['gpu']}" if "gpu" in hw else ""
    print(f"# {hw['cpu']}, {hw['cpus']} cpus ({hw['cpus_usable']} usable), torch {hw['torch']} with "
          f"{hw['torch_threads']} threads, device {hw['device']}{gpu}, load average {fmt(hw['load_average_1min'])}")
    s = daemon["settings"]
    print(f"# session: {args.n} particles, box {args.box} px at {sim['apix']:.2f} Å, SNR {args.snr}, "
          f"stacks of {args.per_stack}, seed {args.seed}; simulated in {sim['seconds']:.1f} s (not timed below)")
    print(f"# daemon: batch {s['batch']}, anchors {s['anchors']}, interpolation {s['interpolation']}, settle "
          f"{s['settle_seconds']} s, flush {s['flush_seconds']} s, map every {s['publish_particles']} particles "
          f"or {s['publish_seconds']} s, checkpoint every {s['checkpoint_seconds']} s, read chunk {s['read_chunk']}, "
          f"stacks placed {f'at {args.rate:g} particles/s' if args.rate else 'all at once'}")
    print()
    print(f"{'figure':<56} {'value':>10}")
    rate = f"{daemon['window_particles']} in {daemon['window_seconds']:.1f} s"
    steady = f"{daemon['steady_particles']} in {daemon['steady_window_seconds']:.1f} s"
    rows = [
        ("bare: crop + pose, whole set in one call (particles/s)", fmt(bare["rate"], ".1f"), ""),
        ("bare: pose only, whole set in one call (particles/s)", fmt(bare["pose_only_rate"], ".1f"), ""),
        ("bare: crop + pose, one call per stack (particles/s)", fmt(bare["per_stack_rate"], ".1f"), ""),
        ("bare: reference selection, once per session (s)", fmt(bare["reference_seconds"]),
         f"{bare['reference_candidates']} candidates"),
        ("daemon: sustained, first -> last accumulation (p/s)", fmt(daemon["sustained_rate"], ".1f"), rate),
        ("daemon: steady, first pass posed -> all in map (p/s)", fmt(daemon["steady_rate"], ".1f"), steady),
        ("daemon: end to end, first stack -> all in map (p/s)", fmt(daemon["end_to_end_rate"], ".1f"),
         f"{daemon['particles_in_map']} in {daemon['run_seconds']:.1f} s"),
        ("daemon: its own status rate at the end (p/s)", fmt(daemon["daemon_reported_rate"], ".1f"), ""),
        ("daemon: start-up, model load + bind (s)", fmt(daemon["startup_seconds"]), ""),
        ("daemon: first stack -> first pass posed (s)", fmt(daemon["first_posed_seconds"]),
         f"{daemon['first_posed_count']} particles"),
        ("daemon: first stack -> first particle in map (s)", fmt(daemon["first_particle_seconds"]), ""),
        ("daemon: first stack -> first published map (s)", fmt(daemon["first_map_seconds"]),
         "at stop" if daemon["first_map_at_stop"] else f"{daemon['first_map_particles']} particles"),
        ("daemon: most particles posed but not yet in the map", f"{daemon['max_posed_not_in_map']}", ""),
        ("daemon: stop, final map + checkpoint (s)", fmt(daemon["stop_seconds"]), ""),
        ("peak RSS after simulation (MiB)", fmt(mem["simulation"]["peak_rss_mib"], ".0f"), ""),
        ("peak RSS after daemon run (MiB)", fmt(mem["daemon"]["peak_rss_mib"], ".0f"), ""),
        ("peak RSS after bare stage (MiB)", fmt(mem["bare"]["peak_rss_mib"], ".0f"), ""),
    ]
    if "gpu_peak_allocated_mib" in mem["daemon"]:
        rows.append(("GPU peak allocated, daemon run (MiB)", fmt(mem["daemon"]["gpu_peak_allocated_mib"], ".0f"), ""))
        rows.append(("GPU peak allocated, bare stage (MiB)", fmt(mem["bare"]["gpu_peak_allocated_mib"], ".0f"), ""))
    for name, value, note in rows:
        print(f"{name:<56} {value:>10}   {note}".rstrip())
    for label, key in (("ratio steady / bare", "steady_rate"), ("ratio sustained / bare", "sustained_rate")):
        ratio = daemon[key] / bare["rate"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        if args.rate:
            verdict = "n/a: --rate makes the run input-bound"
        print(f"{label:<56} {ratio:>10.2f}   target ≥ {TARGET_RATIO:.2f}: model-bound ({verdict})")
    if daemon["sustained_rate"] > 1.2 * daemon["steady_rate"]:
        print("note: the map grew in bursts (the accumulator lagged the poser), so the first -> last accumulation "
              "window is too short to be a rate; the steady figure is the one to compare")
    print()
    print(f"daemon: {daemon['particles_in_map']} of {daemon['particles_expected']} particles in the map "
          f"({daemon['finished']}); {daemon['particles_rejected']} particles and {daemon['files_rejected']} files "
          f"rejected; {daemon['forward_passes_in_window']:.0f} forward passes; {daemon['maps_in_window']:.0f} maps "
          f"before stop, {daemon['maps_received']} distinct maps received")
    print(f"bare: {bare['particles']} particles, model box {bare['model_box']}, {bare['views']} views "
          f"({bare['anchors']} anchors, {bare['new_particles_per_pass']} new per pass, {bare['sets_per_pass']} "
          f"set(s) per forward call); crop {bare['crop_seconds']:.2f} s, pose {bare['pose_seconds']:.2f} s, "
          f"per-stack {bare['per_stack_seconds']:.2f} s")
    print()
    run = daemon["run_seconds"]
    print(f"{'stage latency':<13} {'items':>6} {'total s':>9} {'mean ms':>9} {'% of run':>9} "
          f"{'at stop':>8} {'stop s':>8}")
    for stage in STAGES:
        w, st = daemon["stages_in_window"][stage], daemon["stages_at_stop"][stage]
        mean = 1000 * w["seconds"] / w["count"] if w["count"] else math.nan
        share = 100 * w["seconds"] / run if run > 0 else math.nan
        print(f"{stage:<13} {w['count']:>6.0f} {w['seconds']:>9.2f} {fmt(mean, '.1f'):>9} {fmt(share, '.0f'):>9} "
              f"{st['count']:>8.0f} {st['seconds']:>8.2f}")
    print("(run: first stack placed -> all in the map; items: read = files, pose = poser calls (reference selection "
          "in the first), accumulate = passes; on a CPU pose and accumulate times include waiting for the shared "
          "compute lock)")


def dashboard_report(runs: list[dict]) -> None:
    """Daemon rates per dashboard mode, runs in the order they ran (alternating), and each mode's mean."""
    print()
    print(f"{'dashboard':<10} {'steady p/s per run':<34} {'mean':>8} {'vs none':>8}   end-to-end p/s per run")
    by_mode: dict[str, list[dict]] = {}
    for run in runs:
        by_mode.setdefault(run["dashboard"]["mode"], []).append(run)
    base = None
    if "none" in by_mode:
        base = sum(r["steady_rate"] for r in by_mode["none"]) / len(by_mode["none"])
    for mode, group in by_mode.items():
        steady = [r["steady_rate"] for r in group]
        mean = sum(steady) / len(steady)
        versus = "" if base is None or mode == "none" else f"{100 * (mean / base - 1):+.0f} %"
        ends = ", ".join(f"{r['end_to_end_rate']:.1f}" for r in group)
        print(f"{mode:<10} {', '.join(f'{v:.1f}' for v in steady):<34} {mean:>8.1f} {versus:>8}   {ends}")
        shown = [r["dashboard"].get("page_map_particles") for r in group if r["dashboard"].get("page_map_particles")
                 is not None]
        if shown:
            print(f"{'':<10} the page showed {', '.join(map(str, shown))} particles in its map at the end")


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=128, help="views per forward pass (daemon --batch)")
    parser.add_argument("--interpolation", default="nearest", choices=["nearest", "trilinear"])
    parser.add_argument("--n", type=int, default=4000, help="particles in the session")
    parser.add_argument("--box", type=int, default=128, help="particle box (px)")
    parser.add_argument("--apix", type=float, default=None,
                        help="pixel size (Å); default 1.5, or more so the molecule fits in 80 %% of the box")
    parser.add_argument("--snr", type=float, default=1.0)
    parser.add_argument("--per-stack", type=int, default=200)
    parser.add_argument("--rate", type=float, default=None, help="place stacks at this many particles/s")
    parser.add_argument("--publish-particles", type=int, default=None,
                        help="daemon map period in particles (default min(1000, n/4))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stall", type=float, default=300.0, help="give up after this many seconds without progress")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the session and outputs in this directory")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                        help="refine against the running map (the daemon default); --no-refine: network poses only")
    parser.add_argument("--dashboard", default="none",
                        help="comma list of none, server (the dashboard process beside the daemon) and browser "
                             "(plus a headless chromium page on it); each is one daemon run on the same stacks")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the --dashboard runs, alternating, this often")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the daemon's log")
    args = parser.parse_args()
    modes = [m.strip() for m in args.dashboard.split(",") if m.strip()]
    if not modes or any(m not in ("none", "server", "browser") for m in modes):
        parser.error(f"--dashboard {args.dashboard!r}: a comma list of none, server, browser")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.box < 16 or args.box % 2:
        parser.error("--box must be an even number >= 16")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(threadName)s %(message)s")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    args.device = device.type
    publish_particles = args.publish_particles or min(1000, max(1, args.n // 4))

    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep}: not empty")
        root = args.keep
        root.mkdir(parents=True, exist_ok=True)
        temporary = None
    else:
        temporary = tempfile.mkdtemp(prefix="bench-stream-")
        root = Path(temporary)
    try:
        hw = hardware(device)
        staging = root / "watch" / ".staging"
        stacks, apix, sim_seconds = simulate(staging, args)
        counts = [min(args.per_stack, args.n - k * args.per_stack) for k in range(len(stacks))]
        mem = {"simulation": memory(device)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        plan = [mode for _ in range(args.rounds) for mode in modes]
        roots = [root] + [root / f"run{k}" for k in range(1, len(plan))]
        for run_root in roots[1:]:  # the same stacks for every run (hard links: renamed away by each run)
            (run_root / "watch" / ".staging").mkdir(parents=True)
            for stack in stacks:
                os.link(stack, run_root / "watch" / ".staging" / stack.name)
        runs = []
        for k, (mode, run_root) in enumerate(zip(plan, roots, strict=True)):
            run_stacks = [run_root / "watch" / ".staging" / s.name for s in stacks]
            runs.append(run_daemon(run_root, run_stacks, counts, args, publish_particles, mode))
            print(f"# run {k + 1}/{len(plan)}, dashboard {mode}: steady {runs[-1]['steady_rate']:.1f} p/s, "
                  f"end to end {runs[-1]['end_to_end_rate']:.1f} p/s", flush=True)
        daemon_result = runs[0]
        mem["daemon"] = memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bare = in_worker_thread(bare_rate, [root / "watch" / s.name for s in stacks], device, args)
        mem["bare"] = memory(device)
        sim = {"apix": apix, "seconds": sim_seconds}
        report(hw, args, sim, daemon_result, bare, mem)
        if len(runs) > 1:
            dashboard_report(runs)
        if args.json is not None:
            figures = {
                "hardware": hw,
                "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "simulation": sim, "daemon": daemon_result, "bare": bare, "memory": mem,
                "ratio_steady": daemon_result["steady_rate"] / bare["rate"],
                "ratio_sustained": daemon_result["sustained_rate"] / bare["rate"], "target_ratio": TARGET_RATIO,
                "runs": runs,
            }
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
            print(f"figures written to {args.json}")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()

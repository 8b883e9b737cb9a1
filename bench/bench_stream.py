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
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from cryofastar.daemon.pipeline import DaemonSettings
from cryofastar.engine.posing import NetworkPoser, sets_per_pass
from cryofastar.model.preprocess import to_model_box
from cryofastar.model.weights import load_model
from cryofastar.recon.device import resolve_device
from cryofastar.recon.io.mrc import read_images
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, write_session

sys.path.insert(0, str(Path(__file__).parent))
from stream_daemon import run_daemon  # noqa: E402 - a sibling module
from stream_report import TARGET_RATIO, dashboard_report, report  # noqa: E402 - a sibling module


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



# ---------------------------------------------------------------------------- main
def parse_arguments() -> tuple[argparse.Namespace, list[str], torch.device]:
    """Parse and check the command line; set up logging; resolve the device (``args.device`` becomes its type).

    Returns
    -------
    tuple
        The arguments, the ``--dashboard`` modes in order, and the device.
    """
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
    parser.add_argument("--classify", action=argparse.BooleanOptionalAction, default=True,
                        help="the daemon's 2D lane (on by default, as in watch)")
    parser.add_argument("--poses-from", default="network", choices=["network", "map-only", "classes"])
    parser.add_argument("--polish", type=float, default=0.0,
                        help="after the last particle is in the map, leave the daemon running until its refinement "
                             "has caught up (converged, nothing in the background) or this many seconds passed, and "
                             "report how long that took")
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
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty")
    return args, modes, device


def run_root(keep: Path | None) -> tuple[Path, str | None]:
    """The directory of the session and its runs: ``--keep`` (created), or a temporary one.

    Parameters
    ----------
    keep : Path or None
        ``--keep`` (already checked to be absent or empty).

    Returns
    -------
    tuple
        The directory, and the temporary directory to remove at the end (None with ``--keep``).
    """
    if keep is not None:
        root = keep
        root.mkdir(parents=True, exist_ok=True)
        temporary = None
    else:
        temporary = tempfile.mkdtemp(prefix="bench-stream-")
        root = Path(temporary)
    return root, temporary


def daemon_runs(root: Path, stacks: list[Path], counts: list[int], args: argparse.Namespace,
                publish_particles: int, modes: list[str]) -> list[dict]:
    """The daemon runs, ``--rounds`` times each ``--dashboard`` mode, alternating, on the same stacks.

    The first run uses ``root``; each other run its own ``root/runK`` with hard links to the stacks
    (each run renames its links away). A line per run is printed as it ends.

    Parameters
    ----------
    root : Path
        The session's directory (the stacks are in ``root/watch/.staging``).
    stacks : list of Path
        The stacks, in order.
    counts : list of int
        Particles per stack.
    args : argparse.Namespace
        The arguments.
    publish_particles : int
        A map every this many particles.
    modes : list of str
        The ``--dashboard`` modes.

    Returns
    -------
    list of dict
        Each run's figures, in the order they ran.
    """
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
    return runs


def write_figures(path: Path, hw: dict, args: argparse.Namespace, sim: dict, daemon_result: dict, bare: dict,
                  mem: dict, runs: list[dict]) -> None:
    """Write every figure of the benchmark as JSON to ``path`` (``--json``) and say so.

    Parameters
    ----------
    path : Path
        The JSON file.
    hw : dict
        The hardware facts.
    args : argparse.Namespace
        The arguments (written as given, paths as text).
    sim : dict
        ``apix`` and ``seconds`` of the simulation.
    daemon_result : dict
        The first daemon run's figures.
    bare : dict
        The bare stage's figures.
    mem : dict
        Memory after each stage.
    runs : list of dict
        Every daemon run's figures.
    """
    figures = {
        "hardware": hw,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "simulation": sim, "daemon": daemon_result, "bare": bare, "memory": mem,
        "ratio_steady": daemon_result["steady_rate"] / bare["rate"],
        "ratio_sustained": daemon_result["sustained_rate"] / bare["rate"], "target_ratio": TARGET_RATIO,
        "runs": runs,
    }
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {path}")


def main() -> None:
    args, modes, device = parse_arguments()
    publish_particles = args.publish_particles or min(1000, max(1, args.n // 4))
    root, temporary = run_root(args.keep)
    try:
        hw = hardware(device)
        staging = root / "watch" / ".staging"
        stacks, apix, sim_seconds = simulate(staging, args)
        counts = [min(args.per_stack, args.n - k * args.per_stack) for k in range(len(stacks))]
        mem = {"simulation": memory(device)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = daemon_runs(root, stacks, counts, args, publish_particles, modes)
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
            write_figures(args.json, hw, args, sim, daemon_result, bare, mem, runs)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()

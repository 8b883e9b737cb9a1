"""Throughput of a live session on 1 and on N ranks (``cryofastar-stream watch --nproc N``), through the real CLI.

A benchmark, not a test: it prints figures (and writes them with ``--json``). For each
process count in ``--nproc`` (default ``1,2``), in turn, on the same simulated stacks:

1. ``cryofastar-stream simulate`` writes ``--n`` particles of box ``--box`` at ``--apix`` Å,
   SNR ``--snr``, in stacks of ``--per-stack`` (once, outside the watched directory);
2. ``cryofastar-stream watch DIR --nproc K`` starts on an empty directory (its own ZeroMQ
   port, no ``/metrics``, the daemon's defaults otherwise: refinement on; ``--no-classify``
   unless ``--classify``); a :class:`~cryofastar.monitoring.subscriber.Subscriber` follows
   its status messages (``particles_in_map``, every second; with ``--classify`` also
   ``--keep-junk``, so that the map comes to hold every particle);
3. once the session has loaded (its first status message), every stack is linked into the
   directory at once (or at ``--rate`` particles/s);
4. when the map holds every particle (and, with ``--classify``, the 2D lane has classified
   every one) the session is stopped (SIGINT to the command, as a terminal's Ctrl-C) and its
   exit awaited.

Figures per run: **rate** = particles in the map between the first status message that
shows any and the first that shows all, over that time (so the network's start and the
stop are outside); **steady rate** = 80 % of the particles over the time the map took from
10 % to 90 % of them (the first passes' warm-up outside too); time from the first stack
placed to all in the map; the **longest pause** of the map's particle count while particles
wait; the stop's duration; and, for K > 1, the share the other ranks inserted (rank 0's
log line). On 2 CPU cores, K ranks share the cores one process uses, so K = 2 measures the
cost of the ranks' meetings, not a speed-up (docs/scaling.md "Live: watch --nproc").

With ``--classify``, the 2D lane's figures too (its status field ``classification``):
**2D rate** = particles classified between the first status message that shows any and the
first that shows all, over that time; time from the first stack placed to all classified;
and, for K > 1, how many of them the other ranks aligned (rank 0's lane's log line at stop).

    python bench/bench_watch_ranks.py                                  # 4000 particles, box 128, 1 and 2 ranks
    python bench/bench_watch_ranks.py --n 1000 --box 64 --per-stack 100 # a quick run
    python bench/bench_watch_ranks.py --json bench/results/watch_ranks_b128.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import StatusMessage

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def simulate(staging: Path, args: argparse.Namespace) -> list[Path]:
    subprocess.run([str(SCRIPT), "simulate", "--out", str(staging), "--n", str(args.n), "--box", str(args.box),
                    "--apix", str(args.apix), "--snr", str(args.snr), "--per-stack", str(args.per_stack), "--seed",
                    str(args.seed)], check=True, capture_output=True, text=True)
    return sorted(staging.glob("particles_*.mrcs"))


def run_session(root: Path, stacks: list[Path], nproc: int, args: argparse.Namespace,
                run: int = 0) -> dict[str, object]:
    """One session on ``nproc`` ranks (module docstring), the ``run``-th of the bench; its figures."""
    name = f"watch-{nproc}" + (f"-{run}" if run else "")
    watch = root / name
    watch.mkdir()
    address = f"tcp://127.0.0.1:{free_port()}"
    command = [str(SCRIPT), "-v", "watch", str(watch), "--nproc", str(nproc), "--zmq", address, "--metrics-port",
               "-1", *(("--classify", "--keep-junk") if args.classify else ("--no-classify",)), *args.extra]
    log = (root / f"{name}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    counts: list[tuple[float, int]] = []
    classified: list[tuple[float, int]] = []  # (time, particles the 2D lane classified)
    placed = stopped = None
    try:
        with Subscriber(address, topics=("status",)) as subscriber:
            deadline = time.monotonic() + 300
            while placed is None:  # the session has loaded: it sends status messages
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the session did not start (see {log.name})")
                if isinstance(subscriber.receive(timeout_s=1.0), StatusMessage):
                    placed = time.monotonic()
                    place(stacks, watch, args)
            last_change = time.monotonic()
            while True:
                message = subscriber.receive(timeout_s=1.0)
                if process.poll() is not None:
                    raise RuntimeError(f"the session ended early (see {log.name})")
                if not isinstance(message, StatusMessage):
                    if time.monotonic() - last_change > args.stall:
                        raise RuntimeError(f"no progress for {args.stall:.0f} s")
                    continue
                n = int(message.status.get("particles_in_map") or 0)
                lane = int((message.status.get("classification") or {}).get("particles") or 0)
                now = time.monotonic()
                if not counts or n != counts[-1][1] or lane != classified[-1][1]:
                    last_change = now
                counts.append((now, n))
                classified.append((now, lane))
                if n >= args.n and (not args.classify or lane >= args.n):
                    break
                if now - last_change > args.stall:
                    raise RuntimeError(f"no progress for {args.stall:.0f} s at {n} particles")
        stopped = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (root / f"{name}.log").read_text(errors="replace")
    first = next(i for i, (_, n) in enumerate(counts) if n > 0)
    t_first, n_first = counts[first]
    t_all = next(t for t, n in counts if n >= args.n)
    intervals = [b[0] - a[0] for a, b in zip(counts[first:], counts[first + 1:], strict=False)]
    longest, since, previous = 0.0, t_first, n_first
    for t, n in counts[first + 1:]:  # the longest time the count held still while particles waited
        if n != previous:
            since, previous = t, n
        longest = max(longest, t - since)
    def reached(fraction: float) -> float:
        return next(t for t, n in counts if n >= fraction * args.n)

    steady = 0.8 * args.n / max(1e-9, reached(0.9) - reached(0.1))
    share = re.search(r"ranks: the other \d+ posed and inserted (\d+) of the (\d+)", text)
    two_d: dict[str, object] = {}
    if args.classify:
        t_c, n_c = next((t, n) for t, n in classified if n > 0)
        t_c_all = next(t for t, n in classified if n >= args.n)
        aligned = re.search(r"2D lane: \d+ particles classified; the other ranks aligned (\d+)", text)
        two_d = {"classify_rate": (args.n - n_c) / max(1e-9, t_c_all - t_c),
                 "time_to_all_classified_seconds": t_c_all - placed,
                 "other_ranks_aligned": int(aligned.group(1)) if aligned else 0}
    return {**two_d, "nproc": nproc, "particles": args.n, "rate": (args.n - n_first) / max(1e-9, t_all - t_first),
            "steady_rate": steady,
            "time_to_all_seconds": t_all - placed, "longest_pause_seconds": longest,
            "status_interval_seconds": sum(intervals) / max(1, len(intervals)),
            "stop_seconds": time.monotonic() - stopped,
            "exit_code": process.returncode, "other_ranks_inserted": int(share.group(1)) if share else 0}


def place(stacks: list[Path], watch: Path, args: argparse.Namespace) -> None:
    """Link the stacks into ``watch`` (a hidden name, then a rename), all at once or at ``--rate`` particles/s."""
    for stack in stacks:
        hidden = watch / f".{stack.name}"
        os.link(stack, hidden)
        os.replace(hidden, watch / stack.name)
        if args.rate:
            time.sleep(args.per_stack / args.rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", default="1,2", help="process counts to run, in turn (repeats allowed: 1,2,1,2)")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--snr", type=float, default=1.0)
    parser.add_argument("--per-stack", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None, help="place stacks at this many particles/s")
    parser.add_argument("--classify", action=argparse.BooleanOptionalAction, default=False, help="the 2D lane")
    parser.add_argument("--stall", type=float, default=300.0, help="give up after this long without progress (s)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the sessions and logs here")
    parser.add_argument("--json", type=Path, default=None)
    args, args.extra = parser.parse_known_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="cryofastar-ranks-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        stacks = simulate(root / "staging", args)
        runs = []
        for run, nproc in enumerate(int(k) for k in args.nproc.split(",")):
            runs.append(run_session(root, stacks, nproc, args, run))
            r = runs[-1]
            print(f"{nproc} rank(s): {r['rate']:.1f} particles/s ({r['steady_rate']:.1f} from 10 to 90 %), "
                  f"all {args.n} in the map "
                  f"{r['time_to_all_seconds']:.1f} s after the stacks came, longest pause "
                  f"{r['longest_pause_seconds']:.1f} s, stop {r['stop_seconds']:.1f} s, other ranks inserted "
                  f"{r['other_ranks_inserted']}", flush=True)
            if args.classify:
                print(f"    2D lane: {r['classify_rate']:.1f} particles/s, all classified "
                      f"{r['time_to_all_classified_seconds']:.1f} s after the stacks came, other ranks aligned "
                      f"{r['other_ranks_aligned']}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv),
                                         "cpu": platform.processor() or platform.machine(),
                                         "cores": len(os.sched_getaffinity(0)),
                                         "settings": {k: v for k, v in vars(args).items() if k not in ("json", "keep")},
                                         "runs": runs}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

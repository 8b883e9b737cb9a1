"""Soak test of the streaming daemon: a long simulated session, its resources sampled (issue 20, item 4).

A campaign script, not a timed test. What it does:

1. **Pool** (not part of any figure): ``--pool-stacks`` stacks of ``--per-stack`` particles of a
   procedural molecule at ``--box`` px (SNR ``--snr``) are simulated once into ``<root>/pool``
   (outside the watched directory).
2. **Daemon**: the real console script, ``cryofastar-stream watch <root>/watch --out <root>/out``,
   in a subprocess, with ``/metrics`` on a free port, ZeroMQ on a free port, refinement on
   (``--refine-after`` particles, so re-posing and maps run for most of the session).
3. **Writer**: every ``per_stack / rate`` seconds a pool stack is hard-linked into the watched
   directory under a new name (a hidden name, then a rename: complete at once), so each stack
   brings ``--per-stack`` new particles (a particle is its file name and index) while the watched
   directory costs no disk. It stops after ``--minutes`` (or at ``--max-particles``).
4. **Sampler**: every ``--sample-seconds`` one JSON line to ``--log``: seconds since start, the
   daemon's RSS (``VmRSS``, kB → bytes) and peak (``VmHWM``), open file descriptors
   (``/proc/PID/fd``), threads (``/proc/PID/task``), the output directory's disk usage (allocated
   bytes) and file count, leftover temporary files in it, sizes of ``checkpoint.pt``,
   ``particles.star``, ``fsc_history.tsv``, ``rejected.tsv``, and the daemon's counters from
   ``/metrics`` (particles in the map, ingested, re-posed, refined, maps, files rejected).
5. **Report** (also ``--json``): the warm-up is the first ``--warmup-minutes`` (default
   min(10, minutes / 4)), and lasts until the map holds ``--warmup-particles`` (default 1);
   its level is the RSS of the first sample after it. After the warm-up:
   RSS max and median against that level (growth %, the issue's figure: < 5 % over an hour);
   the bytes per particle of the per-particle tables, measured as the slope of the checkpoint's
   size against particles in the map (the journal and pose table grow with the session by
   design); the RSS growth minus those tables (the part that is not particle data); fds and
   threads min/max; the output directory's growth (bytes, bytes per particle) and file count
   min/max; leftover temporary files.

    python bench/soak.py --minutes 3                                  # smoke run
    nohup nice -n 10 python bench/soak.py --minutes 60 > bench/results/soak-60min.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
RESULTS = Path(__file__).parent / "results"
TMP_MARKERS = (".tmp", ".part", ".partial")
COUNTERS = {  # field in a sample: metric name on /metrics
    "particles_in_map": "cryofastar_particles_in_map",
    "ingested": "cryofastar_particles_ingested_total",
    "reposed": "cryofastar_particles_reposed_total",
    "refined": "cryofastar_particles_refined_total",
    "maps": "cryofastar_maps_published_total",
    "files_rejected": "cryofastar_files_rejected_total",
    "particles_rejected": "cryofastar_particles_rejected_total",
}


# ---------------------------------------------------------------------------- the session
def simulate_pool(pool: Path, args: argparse.Namespace) -> list[Path]:
    """Simulate the pool of stacks into ``pool`` (3 Å/px); the stacks in order."""
    result = subprocess.run([str(SCRIPT), "simulate", "--out", str(pool), "--n", str(args.pool_stacks * args.per_stack),
                             "--box", str(args.box), "--apix", "3.0", "--snr", str(args.snr),
                             "--per-stack", str(args.per_stack), "--seed", str(args.seed)],
                            capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise SystemExit(f"simulate failed: {result.stderr}")
    stacks = sorted(pool.glob("particles_*.mrcs"))
    (pool / "particles.star").unlink(missing_ok=True)  # only bare stacks enter the session
    return stacks


class Writer:
    """A thread hard-linking pool stacks into the watched directory at ``rate`` particles/s."""

    def __init__(self, pool: list[Path], watch: Path, per_stack: int, rate: float, seconds: float,
                 max_particles: int | None) -> None:
        self.pool, self.watch, self.per_stack = pool, watch, per_stack
        self.period, self.seconds, self.max_particles = per_stack / rate, seconds, max_particles
        self.written = 0
        self.stacks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - start < self.seconds:
            if self.max_particles is not None and self.written >= self.max_particles:
                break
            source = self.pool[self.stacks % len(self.pool)]
            name = f"stack_{self.stacks:06d}.mrcs"
            hidden = self.watch / f".{name}.part"
            os.link(source, hidden)
            os.replace(hidden, self.watch / name)
            self.stacks += 1
            self.written += self.per_stack
            self._stop.wait(max(0.0, start + self.stacks * self.period - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class DaemonProcess:
    """``cryofastar-stream watch`` in a subprocess; its output lines go to ``log`` and are scanned for the
    metrics URL."""

    def __init__(self, watch: Path, out: Path, args: argparse.Namespace, log: Path) -> None:
        command = [str(SCRIPT), "watch", str(watch), "--out", str(out), "--metrics-port", "0",
                   "--zmq", "tcp://127.0.0.1:0", "--device", args.device, "--batch", str(args.batch),
                   "--settle", "0.2", "--flush", "1", "--publish-every", str(args.publish_every),
                   "--publish-particles", str(args.publish_particles),
                   "--checkpoint-every", str(args.checkpoint_every), "--poses-from", args.poses_from,
                   "--refine-after", str(args.refine_after), "--refine-box", str(args.refine_box),
                   "--repose-per-pass", str(args.repose_per_pass)]
        self.command = command
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.metrics_url: str | None = None
        self.tail: list[str] = []
        self._reader = threading.Thread(target=self._collect, name="soak-daemon-output", daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            self.tail = (self.tail + [line])[-50:]
            match = re.search(r"metrics (http://\S+)", line)
            if match and self.metrics_url is None:
                self.metrics_url = match.group(1)

    def wait_started(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while self.metrics_url is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start:\n" + "".join(self.tail))
            time.sleep(0.1)
        return self.metrics_url

    def stop(self, timeout: float = 600) -> tuple[int, float]:
        """SIGTERM and wait: exit status and seconds the stop took."""
        t0 = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return code, time.monotonic() - t0


# ---------------------------------------------------------------------------- sampling
def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of process ``pid`` in bytes (from /proc/PID/status)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def directory_usage(path: Path) -> dict[str, int]:
    """Allocated bytes, apparent bytes, files and leftover temporary files under ``path`` (recursive)."""
    allocated = apparent = files = leftovers = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # replaced between the listing and the stat
                continue
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += 1
            leftovers += any(marker in name for marker in TMP_MARKERS)
    return {"out_bytes": allocated, "out_apparent_bytes": apparent, "out_files": files, "out_tmp_files": leftovers}


def read_metrics(url: str) -> dict[str, float]:
    """The counters of :data:`COUNTERS` from the daemon's ``/metrics`` (NaN where absent)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return {field: values.get(metric, math.nan) for field, metric in COUNTERS.items()}


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def line_count(path: Path) -> int | None:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return None


def sample(pid: int, url: str, out: Path, writer: Writer, t0: float) -> dict[str, object]:
    """One sample of the daemon's resources (see module docstring)."""
    row: dict[str, object] = {"t": round(time.monotonic() - t0, 2), "unix": round(time.time(), 2),
                              "written": writer.written}
    status = proc_status(pid)
    row["rss_bytes"], row["hwm_bytes"] = status["VmRSS"], status["VmHWM"]
    row["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    row["threads"] = len(os.listdir(f"/proc/{pid}/task"))
    row.update(directory_usage(out))
    for name in ("checkpoint.pt", "particles.star", "fsc_history.tsv", "rejected.tsv"):
        row[name.replace(".", "_") + "_bytes"] = file_size(out / name)
    row["fsc_history_rows"] = line_count(out / "fsc_history.tsv")
    row["rejected_rows"] = line_count(out / "rejected.tsv")
    try:
        row.update(read_metrics(url))
    except OSError as exc:
        row["metrics_error"] = str(exc)
    return row


# ---------------------------------------------------------------------------- figures
def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (NaN with fewer than 2 distinct xs)."""
    if len(set(xs)) < 2:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def summarise(samples: list[dict], warmup_seconds: float, warmup_particles: int = 1) -> dict[str, object]:
    """The figures of the module docstring from the samples (the daemon still running at each).

    The warm-up ends at the first sample at least ``warmup_seconds`` into the session whose map holds at least
    ``warmup_particles`` particles; the samples from there on are compared with that one.
    """
    valid = [s for s in samples if "metrics_error" not in s]
    start = next((k for k, s in enumerate(valid) if s["t"] >= warmup_seconds
                  and s["particles_in_map"] >= warmup_particles), len(valid))
    after = valid[start:]
    if len(after) < 2:
        return {"error": f"{len(after)} sample(s) after the warm-up of {warmup_seconds:.0f} s and "
                         f"{warmup_particles} particle(s): nothing to compare"}
    base = after[0]
    rss = [s["rss_bytes"] for s in after]
    particles = [s["particles_in_map"] for s in after]
    gained = particles[-1] - base["particles_in_map"]
    ckpt = [(s["particles_in_map"], s["checkpoint_pt_bytes"]) for s in after if s["checkpoint_pt_bytes"]]
    table_bytes = slope([p for p, _ in ckpt], [b for _, b in ckpt]) if len(ckpt) >= 2 else math.nan
    at_max = max(after, key=lambda s: s["rss_bytes"])
    expected = (at_max["particles_in_map"] - base["particles_in_map"]) * (0 if math.isnan(table_bytes)
                                                                            else table_bytes)
    out_bytes = [s["out_bytes"] for s in after]
    return {
        "warmup_seconds": warmup_seconds,
        "warmup_particles": warmup_particles,
        "warmup_ended_at_seconds": base["t"],
        "samples_after_warmup": len(after),
        "seconds_after_warmup": after[-1]["t"] - base["t"],
        "particles_at_warmup": base["particles_in_map"],
        "particles_at_end": particles[-1],
        "particles_added_after_warmup": gained,
        "rss_warmup_bytes": base["rss_bytes"],
        "rss_max_bytes": max(rss),
        "rss_median_bytes": statistics.median(rss),
        "rss_last_bytes": rss[-1],
        "rss_growth_max_percent": 100 * (max(rss) - base["rss_bytes"]) / base["rss_bytes"],
        "rss_growth_median_percent": 100 * (statistics.median(rss) - base["rss_bytes"]) / base["rss_bytes"],
        "rss_slope_bytes_per_particle": slope(particles, rss),
        "rss_slope_bytes_per_hour": 3600 * slope([s["t"] for s in after], rss),
        "table_bytes_per_particle": table_bytes,
        "rss_growth_minus_tables_percent": 100 * (at_max["rss_bytes"] - base["rss_bytes"] - expected)
        / base["rss_bytes"],
        "fds_min": min(s["fds"] for s in after), "fds_max": max(s["fds"] for s in after),
        "threads_min": min(s["threads"] for s in after), "threads_max": max(s["threads"] for s in after),
        "out_bytes_warmup": base["out_bytes"], "out_bytes_end": out_bytes[-1], "out_bytes_max": max(out_bytes),
        "out_bytes_per_particle": slope(particles, out_bytes),
        "out_files_min": min(s["out_files"] for s in after), "out_files_max": max(s["out_files"] for s in after),
        "out_tmp_files_max": max(s["out_tmp_files"] for s in after),
        "fsc_history_rows_end": after[-1]["fsc_history_rows"],
        "rejected_rows_end": after[-1]["rejected_rows"],
        "checkpoint_bytes_end": after[-1]["checkpoint_pt_bytes"],
        "particles_star_bytes_end": after[-1]["particles_star_bytes"],
        "reposed_end": after[-1]["reposed"],
        "maps_end": after[-1]["maps"],
        "backlog_end": after[-1]["written"] - after[-1]["ingested"],
    }


def report(summary: dict[str, object]) -> None:
    """Print the figures."""
    if "error" in summary:
        print(summary["error"])
        return
    mib = 1 / 2**20
    s = summary
    print(f"after the warm-up (ended at {s['warmup_ended_at_seconds']:.0f} s, {s['particles_at_warmup']:.0f} "
          f"particles in the map), "
          f"{s['samples_after_warmup']} samples over {s['seconds_after_warmup']:.0f} s, "
          f"+{s['particles_added_after_warmup']:.0f} particles:")
    print(f"  RSS: warm-up {s['rss_warmup_bytes'] * mib:.0f} MiB, max {s['rss_max_bytes'] * mib:.0f} MiB "
          f"({s['rss_growth_max_percent']:+.1f} %), median {s['rss_median_bytes'] * mib:.0f} MiB "
          f"({s['rss_growth_median_percent']:+.1f} %), last {s['rss_last_bytes'] * mib:.0f} MiB")
    print(f"  per-particle tables (checkpoint slope) {s['table_bytes_per_particle']:.0f} B/particle; RSS slope "
          f"{s['rss_slope_bytes_per_particle']:.0f} B/particle; RSS growth minus tables "
          f"{s['rss_growth_minus_tables_percent']:+.1f} %")
    print(f"  fds {s['fds_min']}..{s['fds_max']}, threads {s['threads_min']}..{s['threads_max']}")
    print(f"  --out: {s['out_bytes_warmup'] * mib:.1f} -> {s['out_bytes_end'] * mib:.1f} MiB "
          f"(max {s['out_bytes_max'] * mib:.1f}; {s['out_bytes_per_particle']:.0f} B/particle), files "
          f"{s['out_files_min']}..{s['out_files_max']}, leftover temporaries max {s['out_tmp_files_max']}")
    print(f"  fsc_history rows {s['fsc_history_rows_end']}, rejected rows {s['rejected_rows_end']}, "
          f"re-posed {s['reposed_end']:.0f}, maps {s['maps_end']:.0f}, backlog at end {s['backlog_end']} particles")


# ---------------------------------------------------------------------------- main
def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the session (writer), minutes")
    parser.add_argument("--rate", type=float, default=10.0, help="particles/s the writer drops")
    parser.add_argument("--box", type=int, default=48, help="particle box (px)")
    parser.add_argument("--per-stack", type=int, default=50)
    parser.add_argument("--pool-stacks", type=int, default=20, help="distinct simulated stacks, reused by name")
    parser.add_argument("--snr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-particles", type=int, default=None, help="stop writing after this many particles")
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default min(10, minutes / 4)")
    parser.add_argument("--warmup-particles", type=int, default=1, help="...and until the map holds this many "
                        "particles")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--poses-from", default="network", choices=["network", "map-only"])
    parser.add_argument("--refine-after", type=int, default=500)
    parser.add_argument("--refine-box", type=int, default=32)
    parser.add_argument("--repose-per-pass", type=int, default=64)
    parser.add_argument("--publish-every", type=float, default=10.0)
    parser.add_argument("--publish-particles", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=float, default=60.0)
    parser.add_argument("--root", type=Path, default=None, help="session directory (default: a temporary one, "
                        "removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the session directory")
    parser.add_argument("--log", type=Path, default=None, help="JSON lines of samples (default "
                        "bench/results/soak-<minutes>min.jsonl)")
    parser.add_argument("--json", type=Path, default=None, help="figures (default bench/results/soak.json for "
                        "runs of 60 minutes or more, else bench/results/soak-<minutes>min.json)")
    args = parser.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = min(10.0, args.minutes / 4)
    tag = f"soak-{args.minutes:g}min"
    args.log = args.log or RESULTS / f"{tag}.jsonl"
    args.json = args.json or RESULTS / ("soak.json" if args.minutes >= 60 else f"{tag}.json")
    return args


def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    """The whole soak in ``root``; the figures written to ``args.json``."""
    pool, watch, out = root / "pool", root / "watch", root / "out"
    watch.mkdir(parents=True, exist_ok=True)
    t_sim = time.monotonic()
    stacks = simulate_pool(pool, args)
    print(f"pool: {len(stacks)} stacks of {args.per_stack} at box {args.box} in {time.monotonic() - t_sim:.0f} s",
          flush=True)
    daemon = DaemonProcess(watch, out, args, args.log.with_suffix(".daemon.log"))
    url = daemon.wait_started()
    print(f"daemon pid {daemon.process.pid}, metrics {url}", flush=True)
    writer = Writer(stacks, watch, args.per_stack, args.rate, 60 * args.minutes, args.max_particles)
    samples: list[dict] = []
    t0 = time.monotonic()
    writer.start()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "w") as log:
        while True:
            row = sample(daemon.process.pid, url, out, writer, t0)
            samples.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{row['t']:7.0f} s  written {row['written']}  in map {row.get('particles_in_map')}  "
                  f"RSS {row['rss_bytes'] / 2**20:.0f} MiB  fds {row['fds']}  threads {row['threads']}  "
                  f"out {row['out_bytes'] / 2**20:.1f} MiB / {row['out_files']} files", flush=True)
            if daemon.process.poll() is not None or row["t"] >= 60 * args.minutes:
                break
            time.sleep(max(0.0, t0 + len(samples) * args.sample_seconds - time.monotonic()))
    writer.stop()
    alive = daemon.process.poll() is None
    code, stop_seconds = daemon.stop()
    final = directory_usage(out)
    summary = summarise(samples, 60 * args.warmup_minutes, args.warmup_particles)
    result = {
        "command": " ".join(sys.argv),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "daemon_command": " ".join(daemon.command),
        "daemon_pid": daemon.process.pid,
        "daemon_alive_at_end": alive,
        "daemon_exit_code": code,
        "daemon_stop_seconds": stop_seconds,
        "written_particles": writer.written,
        "after_stop": {**final, "checkpoint_pt_bytes": file_size(out / "checkpoint.pt"),
                       "fsc_history_rows": line_count(out / "fsc_history.tsv")},
        "summary": summary,
        "samples_log": str(args.log),
    }
    report(summary)
    print(f"daemon exit {code} after a {stop_seconds:.1f} s stop; leftover temporaries after the stop: "
          f"{final['out_tmp_files']}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"figures: {args.json}; samples: {args.log}")
    return result


def main() -> None:
    args = parse_arguments()
    if args.root is not None:
        args.root.mkdir(parents=True, exist_ok=True)
        run(args, args.root)
        return
    if args.keep:
        run(args, Path(tempfile.mkdtemp(prefix="cryofastar-soak-")))
        return
    with tempfile.TemporaryDirectory(prefix="cryofastar-soak-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()

"""CPU cost of the live dashboard: its server process and a browser page showing it.

A benchmark, not a test. A stand-in daemon publishes real protocol messages on a ZeroMQ
PUB socket at a live session's cadence: a status message every second (with a growing
view-direction histogram) and a new map every ``--map-every`` seconds (a procedural
molecule at ``--box`` px, a little less noisy each time). The dashboard runs as
``watch --dashboard-port`` runs it (a child process), and a headless Debian chromium
page (Playwright) shows it. For ``--seconds`` it measures the CPU time (user + system,
from /proc) of the dashboard process and of every chromium process, and prints each as a
percentage of one core, with the messages sent. No daemon runs, so nothing else competes.

    python bench/bench_dashboard.py                         # box 128, a map every 6 s, 60 s
    python bench/bench_dashboard.py --box 256 --map-every 3 --seconds 120
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import zmq
from cryofastar.monitoring.dashboard_process import DashboardProcess
from cryofastar.monitoring.headless_browser import launch_chromium
from cryofastar.protocol import StatusMessage, VolumeMessage, encode
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.view_directions import view_direction_histogram
from playwright.sync_api import sync_playwright

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def chromium_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"chromium" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--map-every", type=float, default=6.0, help="seconds between new maps")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    truth = atoms_to_volume(procedural_molecule(1_000_000_001), args.box, args.apix).numpy()
    shells = np.array([np.inf] + [args.box * args.apix / k for k in range(1, args.box // 2 + 1)])
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    dashboard = DashboardProcess(f"tcp://127.0.0.1:{port}", 0)
    rot, tilt = np.zeros(0), np.zeros(0)
    sent = {"volume": 0, "status": 0}

    def publish(now: float, k: int, with_map: bool) -> None:
        nonlocal rot, tilt
        rot = np.concatenate([rot, rng.uniform(-180, 180, 200)])
        tilt = np.concatenate([tilt, np.rad2deg(np.arccos(rng.uniform(-1, 1, 200)))])
        status = {"particles_in_map": len(rot), "particles_per_second": 200.0, "particles_ingested": len(rot),
                  "queues": {"files": 0, "chunks": 1, "posed": 0}, "files_pending": 0, "box": args.box,
                  "apix": args.apix, "views": view_direction_histogram(rot, tilt).to_json(), "rejected_recent": [],
                  "refinement": {"active": False, "phase": "waiting"}}
        pub.send_multipart(encode(StatusMessage(status, seq=2 * k, session="bench", time=now)))
        sent["status"] += 1
        if with_map:
            noise = rng.normal(size=truth.shape).astype(np.float32) * truth.std() * 20 / np.sqrt(len(rot))
            fsc = np.clip(1.2 - np.arange(len(shells)) / (0.3 * len(shells)) + 0.1 * np.log10(len(rot)), -0.05, 1)
            pub.send_multipart(encode(VolumeMessage(truth + noise, args.apix, len(rot), 8.0, shells, fsc,
                                                    seq=2 * k + 1, session="bench", time=now)))
            sent["volume"] += 1

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(dashboard.url)
        start, k, last_map = time.monotonic(), 0, -1e9
        warm_until = start + 10.0  # the page's first load and first map are not measured
        measuring = False
        cpu0 = server0 = t0 = 0.0
        while True:
            now = time.monotonic()
            if not measuring and now >= warm_until:
                measuring, t0 = True, now
                cpu0, server0 = cpu_seconds(chromium_pids()), cpu_seconds([dashboard.process.pid])
                sent = {"volume": 0, "status": 0}
            if measuring and now - t0 >= args.seconds:
                break
            with_map = now - last_map >= args.map_every
            last_map = now if with_map else last_map
            publish(time.time(), k, with_map)
            k += 1
            time.sleep(max(0.0, start + k - time.monotonic()))
        elapsed = time.monotonic() - t0
        browser_cpu = cpu_seconds(chromium_pids()) - cpu0
        server_cpu = cpu_seconds([dashboard.process.pid]) - server0
        shown = page.text_content("#map-note")
        browser.close()
    dashboard.stop()
    pub.close()
    context.term()
    print(f"# {elapsed:.0f} s measured: {sent['status']} status messages, {sent['volume']} maps of box {args.box} "
          f"({torch.get_num_threads()} torch threads here, {os.cpu_count()} cpus); the page shows: {shown}")
    print(f"dashboard server process: {server_cpu:6.2f} CPU s = {100 * server_cpu / elapsed:5.1f} % of one core")
    print(f"chromium (all processes): {browser_cpu:6.2f} CPU s = {100 * browser_cpu / elapsed:5.1f} % of one core")


if __name__ == "__main__":
    main()

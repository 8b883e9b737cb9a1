"""The soak campaign's sampler and figures (bench/soak.py), and a short soak of the real daemon (issue 20, item 4).

The hour-long soak is a campaign (``python bench/soak.py --minutes 60``); here its sampler
runs on real processes and directories, its figures on known samples, and a short
session of the real ``cryofastar-stream watch`` is soaked end to end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_SPEC)
sys.modules["soak"] = soak
_SPEC.loader.exec_module(soak)


def test_the_sampler_counts_a_real_process_s_memory_descriptors_and_threads(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import threading, time, sys
        handles = [open({str(tmp_path)!r} + f"/f{{i}}", "w") for i in range(25)]
        block = bytearray(64 * 2**20)  # 64 MiB touched
        for i in range(0, len(block), 4096):
            block[i] = 1
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait) for _ in range(6)]
        for t in threads:
            t.start()
        print("ready", flush=True)
        sys.stdin.read()
        stop.set()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        status = soak.proc_status(child.pid)
        assert status["VmRSS"] >= 64 * 2**20 and status["VmHWM"] >= status["VmRSS"]
        fds = len(list(Path(f"/proc/{child.pid}/fd").iterdir()))
        assert 25 + 3 <= fds <= 25 + 10  # 25 files, stdin/out/err and the interpreter's own few
        assert len(list(Path(f"/proc/{child.pid}/task").iterdir())) == 7  # main + 6
    finally:
        child.communicate("")


def test_directory_usage_counts_files_bytes_and_leftover_temporaries(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "volume.mrc").write_bytes(b"x" * 10_000)
    (tmp_path / "sub" / "particles.star").write_bytes(b"y" * 100)
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"z")
    usage = soak.directory_usage(tmp_path)
    assert usage["out_files"] == 3 and usage["out_tmp_files"] == 1
    assert usage["out_apparent_bytes"] == 10_101 and usage["out_bytes"] >= 10_000


def _samples(rss, particles, checkpoint, t_step=15.0):
    return [{"t": t_step * i, "written": n, "ingested": n, "rss_bytes": r, "particles_in_map": n, "fds": 21,
             "threads": 24 + i % 2, "out_bytes": 1000 + c, "out_files": 7, "out_tmp_files": 0, "checkpoint_pt_bytes": c,
             "particles_star_bytes": 10 * n, "fsc_history_rows": i, "rejected_rows": None, "reposed": 0, "maps": i}
            for i, (r, n, c) in enumerate(zip(rss, particles, checkpoint, strict=True))]


def test_the_figures_separate_per_particle_tables_from_a_leak():
    base = 1000 * 2**20
    particles = [1000 * i for i in range(10)]
    checkpoint = [10**6 + 150 * n for n in particles]  # 150 B per particle of tables
    # memory that grows exactly as the tables: growth, but none beyond the tables
    tables_only = soak.summarise(_samples([base + 150 * n for n in particles], particles, checkpoint), 30.0)
    assert tables_only["rss_warmup_bytes"] == base + 150 * 2000 and tables_only["particles_added_after_warmup"] == 7000
    assert tables_only["table_bytes_per_particle"] == pytest.approx(150)
    assert tables_only["rss_growth_max_percent"] > 0
    assert tables_only["rss_growth_minus_tables_percent"] == pytest.approx(0)
    # a leak of 1 MiB per sample on top of the tables
    leak = soak.summarise(_samples([base + 150 * n + 2**20 * i for i, n in enumerate(particles)], particles,
                                   checkpoint), 30.0)
    assert leak["rss_growth_minus_tables_percent"] == pytest.approx(100 * 7 * 2**20 / (base + 150 * 2000 + 2 * 2**20))
    assert leak["threads_min"] == 24 and leak["threads_max"] == 25 and leak["fds_min"] == leak["fds_max"] == 21
    assert soak.summarise(_samples([base] * 3, [0] * 3, [0] * 3), 30.0)["error"].startswith("0 sample(s)")  # empty map
    late = soak.summarise(_samples([base] * 10, particles, checkpoint), 30.0, warmup_particles=4000)
    assert late["warmup_ended_at_seconds"] == 60.0 and late["particles_at_warmup"] == 4000


@pytest.mark.skipif(os.environ.get("CRYOFASTAR_SOAK_TEST") is None,
                    reason="a real daemon for ~1-2 minutes on 2 cores: set CRYOFASTAR_SOAK_TEST=1")
def test_a_short_soak_of_the_real_daemon_has_flat_descriptors_and_leaves_no_temporaries(tmp_path):
    """The real ``cryofastar-stream watch`` in a subprocess, fed stacks for 30 s and sampled every 3 s (the warm-up:
    until the map holds a particle: the first pass has created the session's threads and files)."""
    figures = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(Path(soak.__file__)), "--minutes", "0.5", "--rate", "40",
                             "--box", "32", "--per-stack", "20", "--pool-stacks", "3", "--sample-seconds", "3",
                             "--warmup-minutes", "0.1", "--warmup-particles", "1", "--refine-after", "200",
                             "--refine-box", "16",
                             "--publish-every", "2", "--checkpoint-every", "4", "--root", str(tmp_path / "run"),
                             "--log", str(tmp_path / "samples.jsonl"), "--json", str(figures)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(figures.read_text())
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 6 and report["daemon_alive_at_end"] and report["daemon_exit_code"] == 0
    s = report["summary"]
    assert s["fds_max"] - s["fds_min"] <= 2 and s["threads_max"] - s["threads_min"] <= 4
    assert s["particles_at_end"] > 0 and not math.isnan(s["rss_growth_max_percent"])
    assert report["after_stop"]["out_tmp_files"] == 0 and s["out_files_max"] <= 8  # maps, tables, one checkpoint
    assert s["fsc_history_rows_end"] >= 3  # maps were written and published while sampling

"""The streaming daemon end to end: the real console script on a real directory, a real
ZeroMQ subscriber, a real HTTP scrape of /metrics, SIGTERM drains, SIGKILL + restart."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import StatusMessage, VolumeMessage
from cryofastar.recon.io import read_volume, write_stack
from cryofastar.recon.io.star import write_particles
from session_helpers import ENV, SCRIPT, ScriptProcess, place, simulate_stacks

BOX = 48
PER_STACK = 40
N_STACKS = 6
FAST = ["--settle", "0.3", "--flush", "1", "--publish-every", "1", "--checkpoint-every", "1", "--batch", "48",
        "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "0"]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> list[Path]:
    """A simulated session's stacks (written elsewhere; tests move them into the watched directory)."""
    return simulate_stacks(tmp_path_factory.mktemp("simulated"), PER_STACK * N_STACKS, BOX, PER_STACK, seed=11)


class Daemon(ScriptProcess):
    """``cryofastar-stream --watch`` in a subprocess, with the endpoints it printed."""

    def __init__(self, watch: Path, out: Path, *extra: str) -> None:
        super().__init__("--watch", str(watch), "--out", str(out), *FAST, *extra)
        self.zmq, self.metrics = self.wait_for(r"ZeroMQ (tcp://\S+?);? metrics (http://\S+)").groups()

    def scrape(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


@pytest.fixture
def daemons(spawn):
    """Start daemons with ``daemons(watch, out, ...)``; every one is closed after the test."""
    return lambda *args: spawn(Daemon, *args)


def wait_for_message(subscriber: Subscriber, kind: type, wanted, timeout: float, summary):  # noqa: ANN001, ANN201
    """The first message of ``kind`` for which ``wanted(message)`` is true; fails naming ``summary(last)``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        message = subscriber.receive(timeout_s=1.0)
        if isinstance(message, kind):
            last = message
            if wanted(message):
                return message
    seen = None if last is None else summary(last)
    raise AssertionError(f"no such {kind.__name__} within {timeout} s (last: {seen})")


def wait_for_map(subscriber: Subscriber, particles: int, timeout: float = 180) -> VolumeMessage:
    """The first map holding at least ``particles`` particles."""
    return wait_for_message(subscriber, VolumeMessage, lambda m: m.particles >= particles, timeout,
                            lambda m: f"a map of {m.particles} particles, {particles} wanted")


def wait_for_status(subscriber: Subscriber, wanted, timeout: float = 30) -> dict:  # noqa: ANN001
    """The body of the first status message for which ``wanted(body)`` is true."""
    return wait_for_message(subscriber, StatusMessage, lambda m: wanted(m.status), timeout, lambda m: m.status).status


@pytest.mark.slow
@pytest.mark.parametrize("poll", [None, "0.2"], ids=["inotify", "polling"])
def test_a_live_session_streams_to_a_published_map_and_metrics(stacks, tmp_path, poll, daemons):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place(stacks[0], watch)  # present before the daemon starts
    daemon = daemons(watch, out, *([] if poll is None else ["--poll", poll]))
    with Subscriber(daemon.zmq) as subscriber:
        wait_for_map(subscriber, PER_STACK)
        (watch / "run1").mkdir()
        for stack in stacks[1:3]:
            place(stack, watch / "run1")  # a new subfolder: the watch is recursive
        with open(watch / stacks[3].name, "wb") as handle:  # a writer that writes in place, slowly
            data = stacks[3].read_bytes()
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(0.15)
            handle.write(data[len(data) // 2 :])
        volume = wait_for_map(subscriber, 4 * PER_STACK)
        assert volume.volume.shape == (BOX, BOX, BOX) and volume.apix == pytest.approx(3.0)
        assert volume.fsc.shape == (BOX // 2 + 1,)
        assert volume.history is not None and volume.history[-1, 1] == volume.particles  # resolution over time
        assert (volume.history[:, 1] >= PER_STACK).all() and (volume.history[:, 0] <= volume.time + 1).all()
        status = wait_for_status(subscriber, lambda s: s.get("views") and sum(map(sum, s["views"]["counts"])) == 160)
        assert status["particles_in_map"] >= 4 * PER_STACK and status["model"] == "cryofastar-small.safetensors"
        assert len(status["views"]["counts"]) == 18 and len(status["views"]["azimuth_edges_degrees"]) == 37
        assert status["rejected_recent"] == [] and status["watch"] == str(watch)
    # a late subscriber (the real `subscribe` command) gets the latest map within one re-publish period (5 s)
    saved = tmp_path / "received"
    late = subprocess.Popen([str(SCRIPT), "subscribe", daemon.zmq, "--save", str(saved)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    lines: list[str] = []  # read as printed: the map is saved just before its line is echoed

    def read_lines() -> None:
        for line in late.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((saved / "volume.mrc").exists()
                                                   and any("160" in line for line in list(lines))):
            time.sleep(0.1)
    finally:
        late.terminate()
        late.wait(timeout=30)
        reader.join(timeout=30)
        late.stdout.close()
    late_out = "".join(lines)
    received, received_apix = read_volume(saved / "volume.mrc")
    assert received.shape == (BOX, BOX, BOX) and received_apix == pytest.approx(3.0)
    assert "160" in late_out  # its status/volume lines name the particle count
    metrics = daemon.scrape()
    assert metrics["cryofastar_particles_accumulated_total"] == 4 * PER_STACK
    assert metrics["cryofastar_particles_ingested_total"] == 4 * PER_STACK
    assert metrics["cryofastar_files_seen_total"] >= 4
    assert metrics["cryofastar_batches_total"] >= 2
    assert 'cryofastar_stage_latency_seconds_count{stage="pose"}' in metrics
    assert metrics["cryofastar_map_resolution_meters"] > 0
    doc = (Path(__file__).parents[1] / "docs" / "daemon.md").read_text()
    documented = re.findall(r"^\| `(cryofastar_[a-z_]+)", doc, re.MULTILINE)
    assert len(documented) == 26
    for name in documented:  # every documented metric is exported (histograms as _count, labelled ones with labels)
        assert any(key == name or key.startswith((name + "{", name + "_count")) for key in metrics), name
    code, stderr = daemon.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "160 particles in the map" in "".join(daemon.lines)
    particles = starfile.read(out / "particles.star")["particles"]
    assert len(particles) == 4 * PER_STACK and particles["rlnImageName"].is_unique
    volume, apix = read_volume(out / "volume.mrc")
    assert volume.shape == (BOX, BOX, BOX) and apix == pytest.approx(3.0)
    for name in ("volume_half1.mrc", "volume_half2.mrc", "volume_fsc.tsv", "fsc_history.tsv", "checkpoint.pt"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_bad_files_are_rejected_and_the_session_goes_on(stacks, tmp_path, daemons):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place(stacks[0], watch)
    daemon = daemons(watch, out)
    with Subscriber(daemon.zmq) as subscriber:
        wait_for_map(subscriber, PER_STACK)
        data = stacks[1].read_bytes()
        (watch / "truncated.mrcs").write_bytes(data[: len(data) // 2])
        write_stack(watch / "wrong_box.mrcs", torch.randn(3, BOX + 16, BOX + 16), 3.0)
        nan_images = torch.randn(5, BOX, BOX)
        nan_images[2, 0, 0] = float("nan")
        with pytest.warns(RuntimeWarning):
            write_stack(watch / "with_nan.mrcs", nan_images, 3.0)
        write_particles(watch / "outside.star", pd.DataFrame({"rlnImageName": [f"000001@{stacks[2]}"],
                                                              "rlnAngleRot": [0.0], "rlnAngleTilt": [0.0],
                                                              "rlnAnglePsi": [0.0], "rlnOpticsGroup": [1]}),
                        pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [3.0]}))
        place(stacks[2], watch)
        wait_for_map(subscriber, 2 * PER_STACK + 4)
        status = wait_for_status(subscriber, lambda s: len(s["rejected_recent"]) >= 4)
        reasons = " ".join(f"{row['path']} {row['reason']}" for row in status["rejected_recent"])
        assert "wrong_box.mrcs: box 64 px differs" in reasons and status["files_rejected"] >= 3
    code, stderr = daemon.stop(signal.SIGINT)
    assert code == 0, stderr
    rejected = (out / "rejected.tsv").read_text()
    for reason in ("truncated.mrcs: not a readable MRC", "wrong_box.mrcs: box 64 px differs",
                   "with_nan.mrcs: 1 image(s) contain NaN", f"(000003@{(watch / 'with_nan.mrcs').resolve()})",
                   "outside the watched directory"):
        assert reason in rejected, rejected
    assert len(starfile.read(out / "particles.star")["particles"]) == 2 * PER_STACK + 4


def _lying_stack(source: Path, target: Path, fields: dict[int, int], size: int | None = None) -> None:
    """A copy of a real stack with header words (byte offset -> int32) overwritten; ``size``: sparse length."""
    raw = bytearray(source.read_bytes())
    for offset, value in fields.items():
        raw[offset:offset + 4] = np.int32(value).tobytes()
    hidden = target.parent / f".{target.name}.part"
    hidden.write_bytes(bytes(raw))
    if size is not None:
        os.truncate(hidden, size)
    os.replace(hidden, target)


@pytest.mark.slow
def test_files_that_used_to_kill_the_daemon_are_rejected_and_a_restart_goes_on(stacks, tmp_path, daemons):
    """Issue 20, from outside: a huge-box header as the session's first file (a sparse 128 GiB file: the reader
    allocated 128 GiB), a negative nz (OverflowError), names with a tab, a newline and byte 0xff (csv.Error at
    the checkpoint, UnicodeEncodeError in the half sets and rejected.tsv), '#' and a quote (a particles.star
    backproject could not read). Each gets one row; the session goes on; a restart does not die."""
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    _lying_stack(stacks[0], watch / "huge.mrcs", {0: 65536, 4: 65536, 8: 8}, 1024 + 65536**2 * 32)
    _lying_stack(stacks[0], watch / "negative.mrcs", {8: -5})
    odd = [b"tab\there.mrcs", b"new\nline.mrcs", b"byte\xff.mrcs", b"hash#1.mrcs", b"it's.mrcs"]
    for name in odd:
        shutil.copy(stacks[1], watch / os.fsdecode(name))
    daemon = daemons(watch, out)
    with Subscriber(daemon.zmq) as subscriber:
        status = wait_for_status(subscriber, lambda s: s["files_rejected"] >= 7, timeout=60)
        place(stacks[2], watch)
        place(stacks[3], watch)
        wait_for_map(subscriber, 2 * PER_STACK)
        status = wait_for_status(subscriber, lambda s: s["particles_in_map"] >= 2 * PER_STACK)
        assert status["files_rejected"] == 7
    code, stderr = daemon.stop(signal.SIGINT)
    assert code == 0, stderr
    rows = (out / "rejected.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == 7 and all(len(row.split("\t")) == 3 for row in rows)
    text = "\n".join(rows)
    for expected in ("huge.mrcs: not a readable MRC file (header claims 65536 x 65536 px images; at most 4096",
                     "negative.mrcs: not a readable MRC file (header dimensions 48 x 48 x -5 are not all positive",
                     "tab\\there.mrcs: its name has a control or line-break character (\\t)",
                     "new\\nline.mrcs: its name has", "byte\\xff.mrcs: its name has a byte that is not UTF-8",
                     "hash#1.mrcs: its name has '#', which RELION reads as image-name syntax",
                     "it's.mrcs: its name has a quote (')"):
        assert expected in text, text
    particles = starfile.read(out / "particles.star")["particles"]  # readable: what backproject reads
    assert len(particles) == 2 * PER_STACK
    restarted = daemons(watch, out)  # the same directory, the same bad files
    with Subscriber(restarted.zmq) as subscriber:
        status = wait_for_status(subscriber, lambda s: s["files_rejected"] >= 14, timeout=60)
        assert status["particles_in_map"] == 2 * PER_STACK
    code, stderr = restarted.stop(signal.SIGINT)
    assert code == 0, stderr
    backprojected = subprocess.run([str(SCRIPT), "backproject", str(out / "particles.star"), "-o",
                                    str(tmp_path / "map.mrc")], capture_output=True, text=True, env=ENV, timeout=300)
    assert backprojected.returncode == 0, backprojected.stderr


@pytest.mark.slow
def test_poison_repeats_and_files_outside_the_tree_never_reach_the_map(stacks, tmp_path, daemons):
    """Issue 20, part 2, from outside: a stack scaled by 1e20 was taken (and ruined the map), a STAR naming one
    particle ten times inserted it ten times, a STAR naming /etc/passwd had it opened, and a stack that is a
    symlink out of the watched tree was taken. Now: every particle once, nothing outside opened, one row each."""
    watch, out, outside = tmp_path / "session", tmp_path / "out", tmp_path / "outside"
    watch.mkdir()
    outside.mkdir()
    shutil.copy(stacks[0], outside / "secret.mrcs")
    (watch / "link.mrcs").symlink_to(outside / "secret.mrcs")
    write_particles(watch / "etc.star", pd.DataFrame({"rlnImageName": ["000001@/etc/passwd"], "rlnOpticsGroup": 1}),
                    pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [3.0]}))
    with mrcfile.open(stacks[1]) as mrc:
        scaled, apix = torch.from_numpy(mrc.data * np.float32(1e20)), float(mrc.voxel_size.x)
    with pytest.warns(RuntimeWarning):  # mrcfile's header statistics overflow float32
        write_stack(tmp_path / "scaled.mrcs", scaled, apix)
    place(tmp_path / "scaled.mrcs", watch)
    (watch / ".raw").mkdir()  # hidden: the watcher does not take it bare, only through the STAR
    shutil.copy(stacks[3], watch / ".raw" / "s3.mrcs")
    names = ["000001@.raw/s3.mrcs"] * 10 + [f"{i:06d}@.raw/s3.mrcs" for i in range(2, PER_STACK + 1)]
    write_particles(watch / "tenfold.star", pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1}),
                    pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [apix]}))
    daemon = daemons(watch, out)
    with Subscriber(daemon.zmq) as subscriber:
        place(stacks[2], watch)
        wait_for_map(subscriber, 2 * PER_STACK)
        status = wait_for_status(subscriber, lambda s: s["particles_in_map"] >= 2 * PER_STACK and
                                 s["files_rejected"] >= 2)
        assert status["particles_in_map"] == 2 * PER_STACK  # s3 once (not 49 times), stacks[2]; nothing scaled
        assert status["resolution_angstrom"] is None or np.isfinite(status["resolution_angstrom"])
    code, stderr = daemon.stop(signal.SIGINT)
    assert code == 0, stderr
    text = (out / "rejected.tsv").read_text(encoding="utf-8")
    for expected in ("link.mrcs: a symlink to", "etc.star: names stack /etc/passwd outside the watched directory",
                     f"{PER_STACK} image(s) contain pixels beyond ±1e+06 and were skipped",
                     "tenfold.star: 9 image(s) repeat an earlier row's image (same stack and index)"):
        assert expected in text, text
    particles = starfile.read(out / "particles.star")["particles"]
    assert len(particles) == 2 * PER_STACK and particles["rlnImageName"].is_unique
    volume, _ = read_volume(out / "volume.mrc")
    assert bool(torch.isfinite(volume).all()) and float(volume.abs().max()) < 1e6


@pytest.mark.slow
def test_sigkill_then_restart_loses_and_duplicates_nothing(stacks, tmp_path, daemons):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    daemon = daemons(watch, out)
    with Subscriber(daemon.zmq) as subscriber:
        for stack in stacks[:2]:
            place(stack, watch)
        wait_for_map(subscriber, PER_STACK)
        for stack in stacks[2:4]:
            place(stack, watch)
        time.sleep(1.5)  # mid-flight: some of these are posed or queued, some checkpointed
    daemon.process.kill()
    daemon.process.wait(timeout=30)
    for stack in stacks[4:]:
        place(stack, watch)  # the session goes on while the daemon is down
    restarted = daemons(watch, out)
    with Subscriber(restarted.zmq) as subscriber:
        wait_for_map(subscriber, N_STACKS * PER_STACK)
    code, stderr = restarted.stop()
    assert code == 0, stderr
    particles = starfile.read(out / "particles.star")["particles"]
    assert len(particles) == N_STACKS * PER_STACK
    assert particles["rlnImageName"].is_unique
    assert "240 particles in the map" in "".join(restarted.lines)


@pytest.mark.slow
def test_demo_runs_a_simulated_session_to_a_map(tmp_path):
    with socket.socket() as taken:  # the dashboard's port is in use: the demo takes a free one and says so
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = subprocess.run([str(SCRIPT), "demo", "--out", str(tmp_path), "--n", "240", "--box", "48", "--apix",
                                 "3.0", "--rate", "400", "--no-live", "--zmq", "tcp://127.0.0.1:0", "--metrics-port",
                                 "0", "--dashboard-port", str(busy), "--no-classify"],
                                capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "240 particles in the map" in result.stdout and "median pose error" in result.stdout
    assert "against the true map" in result.stdout
    assert f"cannot serve the dashboard on 127.0.0.1:{busy}" in result.stdout and "using a free port" in result.stdout
    port = re.search(r"live dashboard: http://127\.0\.0\.1:(\d+)/", result.stdout)
    assert port and int(port.group(1)) != busy
    volume, apix = read_volume(tmp_path / "cryofastar" / "volume.mrc")
    assert volume.shape == (48, 48, 48) and apix == pytest.approx(3.0)
    assert not (tmp_path / "cryofastar" / "rejected.tsv").exists()  # the true map beside the stacks is skipped
    assert not (tmp_path / "cryofastar" / "classes").exists()  # --no-classify: the map only


def test_watch_help_explains_every_option_and_bad_options_fail_cleanly(tmp_path):
    help_text = subprocess.run([str(SCRIPT), "watch", "--help"], capture_output=True, text=True, env=ENV,
                               timeout=120, check=False).stdout
    for option in ("--out", "--zmq", "--metrics-port", "--device", "--batch", "--apix", "--poll", "--settle",
                   "--flush", "--interpolation", "--weights", "--poses-from", "--refine", "--refine-after",
                   "--repose-per-pass", "--refine-box"):
        assert option in help_text
    assert "Å" in help_text and "seconds" in help_text.lower()
    for args, message in ((["--watch", str(tmp_path / "missing")], "not an existing directory"),
                          (["--watch", str(tmp_path), "--batch", "2"], "--batch must be at least 3"),
                          (["--watch", str(tmp_path), "--poll", "0"], "--poll must be positive"),
                          (["--watch", str(tmp_path), "--poses-from", "oracle"],
                           "--poses-from must be network, map-only or"),
                          (["--watch", str(tmp_path), "--poses-from", "map-only", "--no-refine"], "needs refinement")):
        result = subprocess.run([str(SCRIPT), *args, "--metrics-port", "-1", "--zmq", "tcp://127.0.0.1:0"],
                                capture_output=True, text=True, env=ENV, timeout=120, check=False)
        assert result.returncode == 2 and result.stderr.strip().startswith("error:") and message in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("poses_from", ["network", "map-only", "classes"])
def test_refinement_reposes_particles_and_the_map_matches_their_final_poses(stacks, tmp_path, poses_from, daemons):
    """Refinement starts after --refine-after particles; re-posed particles leave the running map equal to a
    fresh back-projection of particles.star (old contributions really removed, new ones really added).
    With classes: once the 2D lane's classes settle, the map's particles move to their class poses, a probe
    judges them, and the session goes on refining them (informative) or by map-only ab initio."""
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    extra = ["--classes", "8", "--classes-every", "1", "--keep-junk"] if poses_from == "classes" else []
    daemon = daemons(watch, out, "--refine-after", "80", "--repose-per-pass", "60", "--refine-box", "32",
                     "--poses-from", poses_from, *extra)
    with Subscriber(daemon.zmq) as subscriber:
        for stack in stacks[:2]:
            place(stack, watch)
        wait_for_map(subscriber, 2 * PER_STACK)
        for stack in stacks[2:]:
            place(stack, watch)
        wait_for_map(subscriber, N_STACKS * PER_STACK)
        if poses_from == "classes":
            body = wait_for_status(subscriber, lambda s: s["refinement"]["phase"] != "classes", timeout=180)
            record = body["refinement"]["class_poses"]
            assert record["class_set"] >= 1 and record["classes_posed"] >= 2
            if record["agree"]:  # two decoder starts agree: particles moved, then probed
                assert record["particles"] >= 80 and 0 <= record["won_fraction"] <= 1
                assert body["refinement"]["phase"] == ("local" if record["used"] else "ab-initio")
                # informative ones are used only if one random ab initio start agrees with them (policy)
                assert record["used"] == (record["informative"] and record["confirmation"]["agree"])
            else:  # not trusted: nothing moved, map-only ab initio
                assert body["refinement"]["phase"] == "ab-initio" and "NOT trusted" in record["error"]
        # refined poses (their precision) and particles of the map re-posed (classes: after the class poses), as
        # many re-posings as particles: those that came in unrefined while the ab initio started beside the
        # stream (or behind it, with first poses only) are re-posed first
        body = wait_for_status(subscriber, lambda s: s["refinement"]["pose_precision"] is not None
                               and s["particles_reposed"] >= N_STACKS * PER_STACK, timeout=180)
        assert body["pose_source"] == poses_from and body["refinement"]["active"]
        phase = body["refinement"]["phase"]  # where the map's poses come from now (issue 20: not "network")
        assert body["poses_from"] == {"probe": "network", "ab-initio": "map-only ab initio", "local": "refined"}[phase]
        precision = body["refinement"]["pose_precision"]  # estimated from the refined particles' spreads
        assert precision["particles"] > 0 and precision["estimated_median_error_degrees"] >= 0
        metrics = daemon.scrape()
    if poses_from == "classes":  # every particle was in before the classes settled: posed by classes, re-posed
        assert metrics['cryofastar_stage_latency_seconds_count{stage="class_poses"}'] == 1
    elif poses_from == "network":  # the probe pass at least was refined on arrival
        assert metrics["cryofastar_particles_refined_total"] > 0
    # map-only: the rest of the session came in while the ab initio started beside the stream, unrefined;
    # re-posing (below) posed them
    assert metrics["cryofastar_pose_precision_degrees"] >= 0
    assert metrics["cryofastar_particles_reposed_total"] > 0
    assert 'cryofastar_stage_latency_seconds_count{stage="repose"}' in metrics
    code, stderr = daemon.stop()
    assert code == 0, stderr
    particles = starfile.read(out / "particles.star")["particles"]
    assert len(particles) == N_STACKS * PER_STACK and particles["rlnImageName"].is_unique
    refined = particles["rlnCryofastarRefineScore"].notna()
    assert refined.sum() > N_STACKS * PER_STACK / 2 and particles["rlnCryofastarAngularSpread"][refined].ge(0).all()
    rebuilt = tmp_path / "rebuilt.mrc"
    result = subprocess.run([str(SCRIPT), "backproject", str(out / "particles.star"), "-o", str(rebuilt),
                             "--interpolation", "nearest"], capture_output=True, text=True, env=ENV, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    live, _ = read_volume(out / "volume.mrc")
    fresh, _ = read_volume(rebuilt)
    # the same particles at the same poses (Euler angles rounded through the STAR file): the same map
    assert float((live - fresh).abs().max()) < 0.02 * float(fresh.abs().max())

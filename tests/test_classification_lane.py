"""The daemon's 2D lane (daemon/classification_lane.py) in a real daemon on a real directory: class sets over a
real ZeroMQ SUB socket, the files in OUT/classes, /metrics over real HTTP, a queue too small to hold what the
reader reads, a stack of another box, restarts (also from a 2D checkpoint older than the map's), a lane that
fails while the 3D lane goes on, the same map with the lane off, and junk taken out of the map (SIGKILL too)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cryofastar.daemon.classification_lane import CLASSES_DIR, ClassificationLane, _from_tensors
from cryofastar.daemon.metrics import DaemonMetrics
from cryofastar.daemon.pipeline import Daemon, DaemonSettings
from cryofastar.daemon.state import SessionState
from cryofastar.engine.classification import ClassifySettings, classifier_settings
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import ClassesMessage
from cryofastar.recon.classify2d import StreamingClassifier, class_set
from cryofastar.recon.io import ParticleSource, write_stack
from cryofastar.recon.io.columns import SIMULATED_JUNK_COLUMN
from cryofastar.recon.io.star import write_particles
from session_helpers import ENV, SCRIPT, ScriptProcess, place

BOX = 32
APIX = 3.0
PER_STACK = 100
N_STACKS = 12
CLASSES = 8


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A simulated session with CTF (1,200 particles in 12 stacks of 100, box 32, 3 Å/px, SNR 1)."""
    out = tmp_path_factory.mktemp("simulated")
    result = subprocess.run([str(SCRIPT), "simulate", "--out", str(out), "--n", str(N_STACKS * PER_STACK), "--box",
                             str(BOX), "--apix", str(APIX), "--snr", "1", "--ctf", "--per-stack", str(PER_STACK),
                             "--seed", "5"], capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return out


def stacks_of(session: Path) -> list[Path]:
    return sorted(session.glob("particles_*.mrcs"))


def place_with_star(session: Path, watch: Path, numbers: range) -> None:
    """Stacks ``numbers`` (0-based) and a STAR file of their rows (with CTF), the STAR file older so that the
    daemon's first scan takes it first (files present at start are taken by modification time)."""
    stacks = stacks_of(session)
    table = starfile.read(session / "particles.star")
    names = {stacks[k].name for k in numbers}
    rows = table["particles"][table["particles"]["rlnImageName"].str.split("@").str[1].isin(names)]
    for k in numbers:
        shutil.copy(stacks[k], watch / stacks[k].name)
    star = watch / f"particles_{numbers.start:02d}_{numbers.stop:02d}.star"
    write_particles(star, rows, table["optics"])
    old = time.time() - 100
    os.utime(star, (old, old))


def settings(watch: Path, out: Path, **kw) -> DaemonSettings:
    classification = kw.pop("classification", ClassifySettings(classes=CLASSES))
    # exclude_junk off: these sessions have no junk and the tests count the map's particles exactly; junk
    # exclusion is tested on a session with junk (test_junk_leaves_the_map_...)
    return DaemonSettings(watch=watch, out=out, zmq="tcp://127.0.0.1:0", settle_seconds=0.3, flush_seconds=0.5,
                          publish_seconds=2, checkpoint_seconds=2, status_seconds=0.5, classification=classification,
                          **{"metrics_port": None, "classes_every": 1.0, "exclude_junk": False,
                             "poses_from": "map-only", "refine_after": 100000, **kw})


def wait_until(daemon: Daemon, wanted, what: str, timeout: float = 60) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = daemon.status()
        if wanted(status):
            return status
        assert daemon.errors == [], daemon.errors
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s; status: {daemon.status()}")


def lane(status: dict) -> dict:
    return status["classification"]


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def image_names(path: Path) -> list[str]:
    return list(starfile.read(path)["particles"]["rlnImageName"])


@pytest.mark.slow
def test_classes_stream_beside_the_map_and_a_full_queue_or_a_bad_stack_blocks_nothing(session, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place_with_star(session, watch, range(0, 10))  # 1,000 particles with CTF, present at start
    # a queue of one chunk of 50: the reader reads far faster than the lane classifies, so particles reach the
    # lane by location only and are read again by it
    daemon = Daemon(settings(watch, out, metrics_port=0, classify_queue=1, read_chunk=50))
    daemon.start()
    try:
        with Subscriber(daemon.address, topics=("classes",)) as subscriber:
            t_read = first = None
            deadline = time.monotonic() + 60
            while first is None and time.monotonic() < deadline:
                status = daemon.status()
                if t_read is None and status["particles_ingested"] >= 1000:
                    t_read = time.monotonic()
                message = subscriber.receive(timeout_s=0.1)
                if isinstance(message, ClassesMessage):
                    first = message
            t_first = time.monotonic()
            assert first is not None and t_read is not None, daemon.status()
            print(f"first class averages {t_first - t_read:.1f} s after the 1,000th particle was read "
                  f"(box {BOX}, {CLASSES} classes, 2 CPU cores shared with the 3D lane)")
            assert t_first - t_read < 30
            assert first.version == 1 and first.averages.shape == (CLASSES, BOX, BOX) and first.apix == APIX
            assert np.isfinite(first.averages).all() and first.particles >= 1000
            # a stack of another box: a rejected.tsv row, the lanes go on
            write_stack(watch / "wrong_box.mrcs", torch.randn(20, 48, 48), APIX)
            for stack in stacks_of(session)[10:]:
                place(stack, watch)  # bare stacks, no CTF
            read = wait_until(daemon, lambda s: s["particles_ingested"] == 1200, "every particle read")
            assert lane(read)["waiting"] > 50  # more than its queue holds: the reader did not wait for the lane
            status = wait_until(daemon, lambda s: s["particles_in_map"] == 1200 and lane(s)["particles"] == 1200
                                and lane(s)["waiting"] == 0, "every particle in the map and classified")
            last = first
            while last.particles < 1200:
                message = subscriber.receive(timeout_s=10)
                assert message is not None, "no class set of 1,200 particles"
                last = message
        assert last.version > first.version and abs(last.counts.sum() - 1200) < 1e-6 * 1200
        assert lane(status)["state"] == "running" and lane(status)["read_by_lane"] > 0
        assert lane(status)["diameter_angstrom"] > 0 and lane(status)["error"] is None
        assert "wrong_box.mrcs" in (out / "rejected.tsv").read_text()
        metrics = scrape(daemon.metrics_url)
        assert metrics["cryofastar_classify_particles"] == 1200 and metrics["cryofastar_classify_waiting"] == 0
        assert metrics["cryofastar_classify_alignments_total"] >= 1200 and metrics["cryofastar_classify_enabled"] == 1
        assert metrics["cryofastar_classes_version"] >= 2 and metrics["cryofastar_classify_failures_total"] == 0
        assert metrics["cryofastar_classes_updated_timestamp_seconds"] > time.time() - 120
        assert metrics["cryofastar_classify_alignments_per_second"] > 0 and "cryofastar_classes_junk" in metrics
    finally:
        daemon.stop()
    assert daemon.errors == [] and daemon.particles_in_map == 1200
    folder = out / CLASSES_DIR
    with mrcfile.open(folder / "class_averages.mrcs", permissive=False) as averages:
        assert averages.data.shape == (CLASSES, BOX, BOX) and float(averages.voxel_size.x) == pytest.approx(APIX)
    classes = starfile.read(folder / "classes.star")
    assert len(classes) == CLASSES and classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-4)
    particles = starfile.read(folder / "particles.star")["particles"]
    assert len(particles) == 1200 and particles["rlnImageName"].is_unique
    assert set(particles["rlnImageName"]) == set(image_names(out / "particles.star"))  # named as the map's
    assert particles["rlnClassNumber"].between(1, CLASSES).all()
    assert particles["rlnAnglePsi"].between(0, 360).all() and particles["rlnRandomSubset"].isin([1, 2]).all()


@pytest.mark.slow
def test_a_restart_resumes_and_classifies_again_what_an_older_2d_checkpoint_lacks(session, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place_with_star(session, watch, range(0, 4))
    fixed = ClassifySettings(classes=CLASSES, diameter=70.0)  # no waiting for 1,000 particles to measure it
    daemon = Daemon(settings(watch, out, classification=fixed))
    daemon.start()
    try:
        wait_until(daemon, lambda s: s["particles_in_map"] == 400 and lane(s)["particles"] == 400, "400 classified")
    finally:
        daemon.stop()
    checkpoint = out / CLASSES_DIR / "checkpoint.pt"
    older = tmp_path / "older_checkpoint.pt"
    shutil.copy(checkpoint, older)
    # the checkpoint resumes exactly: its classes are those written at stop
    state = torch.load(checkpoint, weights_only=True)
    classifier = StreamingClassifier(classifier_settings(fixed, BOX, APIX, state["diameter"]), BOX, APIX)
    classifier.load_state_dict(_from_tensors(state["classifier"]))
    with mrcfile.open(out / CLASSES_DIR / "class_averages.mrcs") as written:
        assert np.allclose(class_set(classifier).averages.numpy(), written.data, atol=1e-5 * np.abs(written.data).max())
    first_version = state["published"]

    daemon = Daemon(settings(watch, out, classification=fixed))  # a restart, then four more stacks
    daemon.start()
    try:
        resumed = wait_until(daemon, lambda s: lane(s)["state"] == "running", "the lane resumed")
        assert lane(resumed)["particles"] == 400 and lane(resumed)["alignments"] == state["alignments"]
        for stack in stacks_of(session)[4:8]:
            place(stack, watch)
        wait_until(daemon, lambda s: s["particles_in_map"] == 800 and lane(s)["particles"] == 800
                   and lane(s)["version"] > first_version, "800 classified, the version going on")
    finally:
        daemon.stop()

    # a 2D checkpoint older than the map's (a kill between the two): the map's particles it lacks are read again
    shutil.copy(older, checkpoint)
    daemon = Daemon(settings(watch, out, classification=fixed))
    daemon.start()
    try:
        status = wait_until(daemon, lambda s: lane(s)["particles"] == 800 and lane(s)["waiting"] == 0,
                            "the 400 particles the 2D checkpoint lacked classified again")
        assert status["particles_in_map"] == 800 and lane(status)["read_by_lane"] == 400
        assert status["particles_ingested"] == 0  # the reader read nothing again: the map already had them all
    finally:
        daemon.stop()
    names = image_names(out / CLASSES_DIR / "particles.star")
    assert len(names) == 800 and len(set(names)) == 800 and set(names) == set(image_names(out / "particles.star"))

    # a lane that fails (a 2D checkpoint of 8 classes, asked for 6) is disabled; the 3D lane goes on, and a
    # session waiting for class poses turns to map-only ab initio (its bootstrap starts while idle, in the
    # background; the new stacks come with their STAR file, so that every particle of the map has a CTF: the
    # bootstrap cannot read a set of particles with and without one)
    before = checkpoint.read_bytes()
    place_with_star(session, watch, range(8, 10))  # before the start: its first scan takes the STAR file first
    daemon = Daemon(settings(watch, out, metrics_port=0, classification=ClassifySettings(classes=6, diameter=70.0),
                             poses_from="classes", refine_after=900, repose_per_pass=0))
    daemon.start()
    try:
        failed = wait_until(daemon, lambda s: lane(s)["state"] == "failed", "the lane disabled")
        assert "--classes" in lane(failed)["error"]
        wait_until(daemon, lambda s: s["particles_in_map"] == 1000, "the map going on without the 2D lane")
        gave_up = wait_until(daemon, lambda s: s["refinement"]["phase"] == "ab-initio", "map-only ab initio")
        assert "the 2D lane failed" in gave_up["refinement"]["class_poses"]["error"]
        metrics = scrape(daemon.metrics_url)
        assert metrics["cryofastar_classify_failures_total"] == 1 and metrics["cryofastar_classify_enabled"] == 0
    finally:
        daemon.stop()
    assert daemon.errors == [] and daemon.particles_in_map == 1000
    assert checkpoint.read_bytes() == before  # left as it was


def test_the_map_takes_the_same_particles_with_the_lane_off(session, tmp_path):
    counts = {}
    for classify in (True, False):
        watch, out = tmp_path / f"session_{classify}", tmp_path / f"out_{classify}"
        watch.mkdir()
        place_with_star(session, watch, range(0, 3))
        daemon = Daemon(settings(watch, out, classify=classify,
                                 classification=ClassifySettings(classes=CLASSES, diameter=70.0)))
        daemon.start()
        try:
            status = wait_until(daemon, lambda s: s["particles_in_map"] == 300, "300 particles in the map")
            assert daemon.wait_idle(10)
        finally:
            daemon.stop()
        counts[classify] = sorted(f"{n.split('@')[0]}@{Path(n.split('@')[1]).name}"
                                  for n in image_names(out / "particles.star"))
        if classify:
            assert (out / CLASSES_DIR / "particles.star").is_file()
        else:
            assert lane(status) == {"state": "off"} and not (out / CLASSES_DIR).exists()
    assert counts[True] == counts[False] and len(counts[True]) == 300


@pytest.mark.slow
def test_the_real_command_killed_with_sigkill_resumes_and_classifies_every_particle_once(session, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    args = ["--watch", str(watch), "--out", str(out), "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "-1",
            "--poses-from", "map-only", "--refine-after", "100000", "--settle", "0.3", "--flush", "0.5",
            "--checkpoint-every", "1", "--classes-every", "0.5", "--classes", str(CLASSES), "--diameter", "70",
            "--keep-junk"]  # every particle in the map too (junk exclusion: tests/test_junk_exclusion_daemon.py)
    daemon = ScriptProcess(*args)
    try:
        daemon.wait_for(r"ZeroMQ")
        for stack in stacks_of(session)[:6]:
            place(stack, watch)
        checkpoint = out / CLASSES_DIR / "checkpoint.pt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (checkpoint.exists() and (out / "checkpoint.pt").exists()):
            time.sleep(0.1)
        for stack in stacks_of(session)[6:9]:
            place(stack, watch)
        time.sleep(1.0)  # in the middle of classifying them
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=30)
    finally:
        daemon.close()
    for stack in stacks_of(session)[9:]:
        place(stack, watch)
    restarted = ScriptProcess("-v", *args, merge_stderr=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the lane writes its particles.star every 0.5 s while it changes
            star = out / CLASSES_DIR / "particles.star"
            if star.exists() and len(image_names(star)) == N_STACKS * PER_STACK:
                break
            time.sleep(0.5)
        code, _ = restarted.stop(signal.SIGTERM)
        assert code == 0, "".join(restarted.lines)
    finally:
        restarted.close()
    print("".join(line for line in restarted.lines if "2D lane" in line or "resuming" in line))
    names = image_names(out / CLASSES_DIR / "particles.star")
    assert len(names) == N_STACKS * PER_STACK and len(set(names)) == len(names)  # every particle, once
    assert set(names) == set(image_names(out / "particles.star"))
    state = torch.load(out / CLASSES_DIR / "checkpoint.pt", weights_only=True)
    assert state["locations"]["index"].shape[0] == N_STACKS * PER_STACK


def test_a_session_smaller_than_the_random_start_gets_its_classes_once_it_pauses(session, tmp_path):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place_with_star(session, watch, range(0, 1))  # 100 particles: fewer than the 20 x 8 of the random start
    daemon = Daemon(settings(watch, out, classes_every=0.5,
                             classification=ClassifySettings(classes=CLASSES, diameter=70.0)))
    daemon.start()
    try:
        with Subscriber(daemon.address, topics=("classes",)) as subscriber:
            waited = time.monotonic()
            message = subscriber.receive(timeout_s=30)
            waited = time.monotonic() - waited
        assert isinstance(message, ClassesMessage) and message.particles == PER_STACK and message.version == 1
        assert waited >= 6 * 0.5 - 1  # not before the session paused for 6 periods
    finally:
        daemon.stop()
    assert len(image_names(out / CLASSES_DIR / "particles.star")) == PER_STACK


@pytest.fixture(scope="module")
def junk_session(tmp_path_factory) -> Path:
    """A simulated session with 25 % junk (1,500 particles in 15 stacks of 100, box 32, 3 Å/px, SNR 1, CTF)."""
    out = tmp_path_factory.mktemp("simulated_junk")
    result = subprocess.run([str(SCRIPT), "simulate", "--out", str(out), "--n", "1500", "--box", str(BOX), "--apix",
                             str(APIX), "--snr", "1", "--ctf", "--per-stack", str(PER_STACK), "--junk", "0.25",
                             "--seed", "5"], capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return out


def _consistent(out: Path) -> SessionState:
    """The checkpoint's map holds exactly the rows of its pose table not excluded; particles.star lists those."""
    state = SessionState.load(out / "checkpoint.pt")
    in_map = state.poses.in_map()
    assert state.n_particles == int(in_map.sum()), (state.n_particles, int(in_map.sum()))
    assert len(state.journal) == len(state.poses)  # excluded particles stay accounted for: never read again
    return state


@pytest.mark.slow
def test_junk_leaves_the_map_and_a_sigkill_restart_resumes_exactly_that(junk_session, tmp_path):
    """The real command: the 2D lane's junk is taken out of the 3D map; killed with SIGKILL, the checkpoint's
    map and pose table agree and the restart goes on from them; the particles taken out are the simulated junk."""
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    args = ["--watch", str(watch), "--out", str(out), "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "0",
            "--poses-from", "map-only", "--refine-after", "100000", "--settle", "0.3", "--flush", "0.5",
            "--checkpoint-every", "1", "--classes-every", "0.5", "--classes", str(CLASSES), "--diameter", "70"]
    daemon = ScriptProcess(*args)
    try:
        daemon.wait_for(r"ZeroMQ")
        for stack in stacks_of(junk_session):
            place(stack, watch)
        deadline = time.monotonic() + 120
        excluded = 0
        while time.monotonic() < deadline and excluded == 0:
            time.sleep(0.5)
            if (out / "checkpoint.pt").exists():
                excluded = int((~SessionState.load(out / "checkpoint.pt").poses.in_map()).sum())
        assert excluded > 0, "no particle taken out of the map within 120 s"
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=30)
    finally:
        daemon.close()
    killed = _consistent(out)
    restarted = ScriptProcess("-v", *args, merge_stderr=True)
    try:
        metrics = restarted.wait_for(r"metrics (http://\S+)").group(1)
        scraped = scrape(metrics)
        assert scraped["cryofastar_particles_excluded"] == int((~killed.poses.in_map()).sum())
        assert scraped["cryofastar_particles_in_map"] == killed.n_particles
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every particle read and classified
            star = out / CLASSES_DIR / "particles.star"
            if star.exists() and len(image_names(star)) == 1500 and (out / "particles.star").exists():
                break
            time.sleep(0.5)
        time.sleep(2.0)  # a few more class sets and exclusion steps
        code, _ = restarted.stop(signal.SIGTERM)
        assert code == 0, "".join(restarted.lines)
    finally:
        restarted.close()
    final = _consistent(out)
    assert len(final.poses) == 1500
    names = [f"{n.split('@')[0]}@{Path(n.split('@')[1]).name}" for n in image_names(out / "particles.star")]
    assert len(names) == final.n_particles and len(set(names)) == len(names)
    truth = starfile.read(junk_session / "particles.star")["particles"]
    simulated_junk = {f"{n.split('@')[0]}@{Path(n.split('@')[1]).name}": bool(j)
                      for n, j in zip(truth["rlnImageName"], truth[SIMULATED_JUNK_COLUMN], strict=True)}
    taken_out = set(simulated_junk) - set(names)
    precision = sum(simulated_junk[k] for k in taken_out) / len(taken_out)
    assert len(taken_out) == 1500 - final.n_particles and precision >= 0.9, (len(taken_out), precision)


def test_idle_realignment_waits_while_the_map_is_busy(session, tmp_path):
    """New particles are classified at once; re-aligning old ones while idle waits until the 3D lane is not busy."""
    busy = threading.Event()
    busy.set()
    lane = ClassificationLane(ClassifySettings(classes=CLASSES, diameter=70.0), tmp_path / "out", DaemonMetrics(),
                              classes_every=0.5, checkpoint_seconds=100.0, geometry=(BOX, APIX))
    lane.start(lambda classes, version: None, map_busy=busy.is_set)
    try:
        source = ParticleSource.from_star(session / "particles.star")
        for chunk in itertools.islice(source.chunks(100), 3):
            lane.offer(chunk, BOX, APIX)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lane.classifier is not None and lane.classifier.n_particles
                                                   == 300 and lane.waiting == 0):
            time.sleep(0.1)
        assert lane.classifier is not None and lane.classifier.n_particles == 300
        time.sleep(0.5)  # the step in progress
        before = lane.alignments
        time.sleep(2.0)
        assert lane.alignments == before < 4 * 300  # none while busy
        busy.clear()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and lane.alignments < 4 * 300:
            time.sleep(0.1)
        assert lane.alignments >= 4 * 300  # --passes 4 once the map is idle
    finally:
        lane.stop()
    assert lane.state == "stopped"

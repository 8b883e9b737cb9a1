"""End to end through the real console script: ``watch --nproc 2`` (a real 2-rank gloo group started by torch's
launcher, both ranks watching a real directory while particles arrive) against one process's back-projection of the
particles it wrote, and a rank killed mid-session, then the session resumed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cryofastar.daemon.classification_lane import _from_tensors
from cryofastar.daemon.state import CHECKPOINT_NAME, SessionState
from cryofastar.engine.classification import ClassifySettings, classifier_settings
from cryofastar.recon.classify2d import StreamingClassifier
from cryofastar.recon.classify2d.class_sums import ClassSums
from cryofastar.recon.classify2d.fourier_sampling import padded_spectra
from cryofastar.recon.io.star import write_particles
from session_helpers import ENV, SCRIPT, launched_workers, place, simulate_stacks
from session_helpers import run_cli as run

N_STACKS, PER_STACK = 12, 100
N = N_STACKS * PER_STACK
CLASSES_2D = 6


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> list[Path]:
    return simulate_stacks(tmp_path_factory.mktemp("simulated"), N, box=32, per_stack=PER_STACK, seed=1000000011)


@pytest.fixture(scope="module")
def ctf_session(tmp_path_factory) -> Path:
    """A simulated session with a CTF: stacks and the RELION STAR file of their particles (defocus per particle)."""
    out = tmp_path_factory.mktemp("simulated_ctf")
    run("simulate", "--out", str(out), "--n", str(N), "--box", "32", "--apix", "3", "--snr", "1", "--ctf",
        "--per-stack", str(PER_STACK), "--seed", "1000000012")
    return out


def _feed_stars(session: Path, watch: Path, every: float) -> threading.Thread:
    """As acquisition software with CTF estimation: every stack first copied into ``watch/.stacks`` (hidden: never
    taken bare), then one STAR file per stack naming it appears every ``every`` seconds, in a thread."""
    hidden = watch / ".stacks"
    hidden.mkdir()
    stacks = sorted(session.glob("particles_*.mrcs"))
    for stack in stacks:
        place(stack, hidden)
    table = starfile.read(session / "particles.star")
    particles = table["particles"]
    by_stack = particles["rlnImageName"].str.split("@").str[1]

    def feed() -> None:
        for stack in stacks:
            rows = particles[by_stack == stack.name].copy()
            rows["rlnImageName"] = rows["rlnImageName"].str.replace("@", "@.stacks/", regex=False)
            write_particles(watch / f"{stack.stem}.star", rows, table["optics"])
            time.sleep(every)
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _watch(watch: Path, *extra: str) -> subprocess.Popen[str]:
    """``watch --nproc 2`` with refinement on (from 300 particles), trilinear insertion (the map is then a
    continuous function of the poses, which particles.star rounds), its own session (no terminal signals)."""
    return subprocess.Popen([str(SCRIPT), "-v", "watch", str(watch), "--nproc", "2", "--zmq", "tcp://127.0.0.1:0",
                             "--metrics-port", "-1", "--no-classify", "--refine-after", "300", "--publish-every", "2",
                             "--interpolation", "trilinear", "--settle", "0.3", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)


@contextlib.contextmanager
def _reaped(process: subprocess.Popen[str]):  # noqa: ANN202 - a context manager
    """``process`` killed (its pipes drained) if it still runs when the block ends (a failed assertion, a timeout)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _feed(stacks: list[Path], watch: Path, every: float) -> threading.Thread:
    """Place ``stacks`` in ``watch`` one every ``every`` seconds, in a thread."""
    def feed() -> None:
        for stack in stacks:
            place(stack, watch)
            time.sleep(every)
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _map_error(out: Path, rebuilt: Path) -> float:
    """Largest difference between the session's map and ``backproject particles.star``'s, in units of its std."""
    run("backproject", str(out / "particles.star"), "-o", str(rebuilt))
    live = mrcfile.read(out / "volume.mrc").astype(np.float64)
    fresh = mrcfile.read(rebuilt).astype(np.float64)
    return float(np.abs(live - fresh).max() / fresh.std())


def _names(out: Path) -> list[str]:
    return starfile.read(out / "particles.star")["particles"]["rlnImageName"].tolist()


@pytest.mark.slow
def test_two_ranks_share_a_live_session_and_write_the_map_of_its_particles(ctf_session: Path,
                                                                             tmp_path: Path) -> None:
    watch = tmp_path / "session"
    watch.mkdir()
    with _reaped(_watch(watch, "--idle-exit", "5")) as process:
        _feed_stars(ctf_session, watch, every=0.4)
        stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr
    assert f"stopped: {N} particles in the map" in stdout and "Traceback" not in stderr
    out = watch / "cryofastar"
    names = _names(out)
    assert len(names) == N and len(set(names)) == N  # every particle once, whichever rank took it
    particles = starfile.read(out / "particles.star")["particles"]
    assert particles["rlnCryofastarRefineScore"].notna().sum() > 0  # rank 0 refined the map of both shares
    assert particles["rlnDefocusU"].notna().all()  # every particle kept its CTF, whichever rank read it
    shares = [line for line in stderr.splitlines() if "ranks: the other 1 posed and inserted" in line]
    assert len(shares) == 1 and int(shares[0].split("inserted ")[1].split()[0]) >= N // 4, stderr[-3000:]
    # the map is one process's (CTF-corrected) back-projection of the same particles at the same poses
    assert _map_error(out, tmp_path / "rebuilt.mrc") <= 1e-4


@pytest.mark.slow
def test_a_killed_rank_stops_the_session_cleanly_and_a_restart_resumes_exactly(stacks: list[Path],
                                                                              tmp_path: Path) -> None:
    watch = tmp_path / "session"
    watch.mkdir()
    started = time.monotonic()
    with _reaped(_watch(watch)) as process:
        feeder = _feed(stacks[:8], watch, every=0.5)
        stderr_lines: list[str] = []
        assert process.stderr is not None
        for line in process.stderr:  # the map holds particles of both ranks: a sync has happened
            stderr_lines.append(line)
            if "INFO cryofastar.daemon.pipeline: map: " in line and int(line.split("map: ")[1].split()[0]) > 200:
                break
        workers = launched_workers(process.pid)
        assert len(workers) == 2, "the launcher did not start two ranks"
        os.kill(workers[1], signal.SIGKILL)  # rank 1: the launcher starts local rank 0 first
        feeder.join()
        stdout, rest = process.communicate(timeout=120)
    stderr = "".join(stderr_lines) + rest
    assert time.monotonic() - started < 200  # no hang: rank 0 saw its peer go at the next sync
    assert process.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2 failed (exit code -9)") and "SIGKILL" in last, last
    assert "restart with the same --out to resume" in last
    out = watch / "cryofastar"
    # rank 0 wrote what is consistent: the grids, the journal and the pose table hold the same particles
    state = SessionState.load(out / CHECKPOINT_NAME, torch.device("cpu"))
    kept = state.n_particles
    assert 0 < kept < N and len(state.journal) == kept == len(state.poses) == len(_names(out))
    # the restart reads what the checkpoint lacks, and only that
    for stack in stacks[8:]:
        place(stack, watch)
    process = _watch(watch, "--idle-exit", "5")
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]
    assert f"stopped: {N} particles in the map" in stdout
    names = _names(out)
    assert len(names) == N and len(set(names)) == N
    assert _map_error(out, tmp_path / "rebuilt.mrc") <= 1e-4


def _sums_of_the_table(classes: Path) -> tuple[float, int]:
    """The 2D checkpoint's class sums against what its table says every particle adds (read again from its stack):
    the largest difference relative to the largest sum, and the number of particles."""
    state = torch.load(classes / "checkpoint.pt", weights_only=True)
    settings = classifier_settings(ClassifySettings(classes=CLASSES_2D), state["box"], state["apix"],
                                   state["diameter"])
    clf = StreamingClassifier(settings, state["box"], state["apix"])
    clf.load_state_dict(_from_tensors(state["classifier"]))
    where = state["locations"]
    names, ids, indices = where["stack_names"], where["stack_id"].numpy(), where["index"].numpy()
    read = [mrcfile.read(name) for name in names]
    images = torch.from_numpy(np.stack([read[i][k - 1] for i, k in zip(ids, indices, strict=True)])).float()
    fresh, t = ClassSums(CLASSES_2D, clf.box, clf.apix), clf.table
    spectra = padded_spectra(images)
    for slot in range(t.keep):
        present = t.classes[: t.n, slot] >= 0
        terms = fresh.contributions(spectra, torch.from_numpy(present), None, torch.from_numpy(t.psi[: t.n, slot]),
                                    torch.from_numpy(t.shifts[: t.n, slot]))
        fresh.add(torch.from_numpy(t.classes[: t.n, slot][present]), torch.from_numpy(t.halves[: t.n][present]),
                  torch.from_numpy(t.weights[: t.n, slot][present]), terms)
    return float((clf.sums.num - fresh.num).abs().max() / fresh.num.abs().max()), t.n


@pytest.mark.slow
def test_two_ranks_classify_in_2d_together_and_the_class_sums_are_those_of_every_particle(stacks: list[Path],
                                                                                          tmp_path: Path) -> None:
    """The 2D lane on 2 ranks: rank 1 aligns its particles against rank 0's classes and hands over class sums; rank 0
    re-aligns and centres. Every particle is classified once and the sums are exactly what the table says."""
    watch = tmp_path / "session"
    watch.mkdir()
    process = subprocess.Popen(
        [str(SCRIPT), "-v", "watch", str(watch), "--nproc", "2", "--zmq", "tcp://127.0.0.1:0", "--metrics-port",
         "-1", "--refine-after", "100000", "--settle", "0.3", "--classes", str(CLASSES_2D), "--diameter", "70",
         "--classes-every", "0.5", "--checkpoint-every", "1", "--keep-junk"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    out = watch / "cryofastar"
    with _reaped(process):
        _feed(stacks, watch, every=0.25).join()
        star, deadline = out / "classes" / "particles.star", time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if star.exists() and len(starfile.read(star)["particles"]) == N:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    names = starfile.read(out / "classes" / "particles.star")["particles"]["rlnImageName"].tolist()
    assert len(names) == N and set(names) == set(_names(out))  # every particle of the map, once
    shares = [line for line in stderr.splitlines() if "2D lane: " in line and "the other ranks aligned" in line]
    assert len(shares) == 1 and int(shares[0].split("aligned ")[1].split()[0]) >= N // 8, stderr[-3000:]
    difference, n = _sums_of_the_table(out / "classes")
    print(shares[0], f"class sums vs table: {difference:.2e}")
    assert n == N and difference < 1e-6

"""StackWatcher on real directories with real watchdog observers (native inotify and polling)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryofastar.daemon.watcher import StackWatcher, is_particle_name

SETTLE = 0.25
POLL = 0.1
DEADLINE = 5.0

OBSERVERS = [pytest.param(None, id="native"), pytest.param(POLL, id="polling")]


class Recorder:
    """on_ready callback that records ``(path, size at delivery, thread)``; optionally blocks or raises."""

    def __init__(self, *, block_seconds: float = 0.0, fail_on: Callable[[Path], bool] | None = None) -> None:
        self.block_seconds = block_seconds
        self.fail_on = fail_on
        self.calls: list[tuple[Path, int, int]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            size = path.stat().st_size
            if self.block_seconds:
                time.sleep(self.block_seconds)
            with self._lock:
                self.calls.append((path, size, threading.get_ident()))
            if self.fail_on is not None and self.fail_on(path):
                raise RuntimeError(f"refusing {path.name}")
        finally:
            with self._lock:
                self.active -= 1

    def names(self) -> list[str]:
        with self._lock:
            return [p.name for p, _, _ in self.calls]

    def wait_for(self, name: str, count: int = 1, timeout: float = DEADLINE) -> None:
        """Wait until `name` has been delivered `count` times."""
        wait_until(lambda: self.names().count(name) >= count, timeout, lambda: f"{name} x{count}; got {self.names()}")


def wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what()}")
        time.sleep(0.02)


def write(path: Path, data: bytes = b"\0" * 1024) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_then_rename(path: Path, data: bytes = b"\0" * 1024) -> Path:
    tmp = write(path.with_name(f".{path.name}.part"), data)
    os.replace(tmp, path)
    return path


@pytest.fixture
def start_watcher(tmp_path: Path) -> Iterator[Callable[..., tuple[StackWatcher, Recorder]]]:
    """Start a watcher on ``tmp_path / "session"``; every watcher started here is stopped afterwards."""
    started: list[StackWatcher] = []

    def start(poll_seconds: float | None, recorder: Recorder | None = None, **kwargs) -> tuple[StackWatcher, Recorder]:
        recorder = recorder or Recorder()
        kwargs.setdefault("settle_seconds", SETTLE)
        watcher = StackWatcher(tmp_path / "session", recorder, poll_seconds=poll_seconds, **kwargs)
        watcher.start()
        started.append(watcher)
        return watcher, recorder

    (tmp_path / "session").mkdir()
    yield start
    for watcher in started:
        watcher.stop()


def test_particle_names() -> None:
    assert all(is_particle_name(n) for n in ["a.mrcs", "a.MRC", "run_data.star", "b.Mrcs"])
    assert not any(
        is_particle_name(n) for n in [".a.mrcs", "a.mrcs~", "a.mrcs.tmp", "a.mrc.part", "a.star.partial", "a.txt"]
    )


@pytest.mark.parametrize("poll", OBSERVERS)
def test_file_present_before_start_is_delivered(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    old = [write(session / name) for name in ["c.mrcs", "a.mrcs", "b.star"]]
    for age, path in zip([30, 20, 10], old, strict=True):  # mtime order c, a, b: not the name order
        os.utime(path, ns=(time.time_ns() - age * 10**9,) * 2)
    write(session / "sub" / "fresh.mrc")  # mtime is now: waits settle_seconds

    watcher, rec = start_watcher(poll)
    rec.wait_for("fresh.mrc")
    assert rec.names() == ["c.mrcs", "a.mrcs", "b.star", "fresh.mrc"]
    assert all(p.is_absolute() for p, _, _ in rec.calls)
    assert watcher.pending == 0


@pytest.mark.parametrize("poll", OBSERVERS)
def test_rename_into_place_is_delivered_once(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    watcher, rec = start_watcher(poll)
    write_then_rename(session / "stack_001.mrcs")
    write(session / "stack_002.mrcs.tmp")
    os.replace(session / "stack_002.mrcs.tmp", session / "stack_002.mrcs")
    rec.wait_for("stack_001.mrcs")
    rec.wait_for("stack_002.mrcs")
    write(session / "zz_marker.mrcs")  # settles after anything written before it, so is delivered after it
    rec.wait_for("zz_marker.mrcs")
    assert sorted(rec.names()) == ["stack_001.mrcs", "stack_002.mrcs", "zz_marker.mrcs"]


def test_rename_into_place_is_ready_without_settling(tmp_path: Path, start_watcher) -> None:
    """With native events a rename is complete at once: long settle time, prompt delivery."""
    watcher, rec = start_watcher(None, settle_seconds=30.0)
    write_then_rename(tmp_path / "session" / "a.mrcs")
    rec.wait_for("a.mrcs")
    assert watcher.pending == 0


@pytest.mark.parametrize("poll", OBSERVERS)
def test_slow_in_place_writer_is_delivered_once_when_complete(
    poll: float | None, tmp_path: Path, start_watcher
) -> None:
    settle = 0.5
    watcher, rec = start_watcher(poll, settle_seconds=settle)
    path = tmp_path / "session" / "growing.mrcs"
    with open(path, "wb") as f:
        f.write(b"\1" * 4096)
        f.flush()
        wait_until(lambda: watcher.pending == 1, DEADLINE, lambda: "the partial file to be seen")
        time.sleep(settle / 4)
        f.write(b"\2" * 4096)
        f.flush()
        time.sleep(settle / 4)
        f.write(b"\3" * 4096)
    rec.wait_for("growing.mrcs")
    write(path.with_name("zz_marker.mrcs"))
    rec.wait_for("zz_marker.mrcs")
    assert rec.names().count("growing.mrcs") == 1
    assert rec.calls[0][1] == 3 * 4096 == path.stat().st_size


@pytest.mark.parametrize("poll", OBSERVERS)
def test_new_nested_directories_are_watched(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    watcher, rec = start_watcher(poll)
    write(session / "grid1" / "ext" / "job007" / "a.mrcs")  # directories and file created at once
    rec.wait_for("a.mrcs")
    write_then_rename(session / "grid1" / "ext" / "job007" / "b.star")  # into a directory created after start
    rec.wait_for("b.star")
    assert rec.calls[0][0] == session.resolve() / "grid1" / "ext" / "job007" / "a.mrcs"


@pytest.mark.parametrize("poll", OBSERVERS)
def test_directory_renamed_into_place_is_taken(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    watcher, rec = start_watcher(poll, settle_seconds=30.0)  # a rename inside the tree needs no settling
    write(session / ".incoming" / "job012" / "a.mrcs")
    write(session / ".incoming" / "job012" / "sub" / "b.star")
    time.sleep(2 * POLL)  # let the poller see the hidden directory, so the rename is seen as a move
    os.replace(session / ".incoming" / "job012", session / "job012")
    rec.wait_for("a.mrcs")
    rec.wait_for("b.star")
    assert sorted(p.relative_to(session.resolve()).as_posix() for p, _, _ in rec.calls) == [
        "job012/a.mrcs",
        "job012/sub/b.star",
    ]


@pytest.mark.parametrize("poll", OBSERVERS)
def test_other_files_and_ignored_directories_are_skipped(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    out = session / "cryofastar_out"
    write(out / "before.mrc")
    watcher, rec = start_watcher(poll, ignore=[out])
    write(out / "map_0001.mrc")
    write(out / "sub" / "half1.mrc")
    write_then_rename(out / "moved.mrcs")
    write(session / "notes.txt")
    write(session / "meta.json")
    write(session / ".hidden" / "x.mrcs")
    write(session / "backup.mrcs~")
    write(session / "download.star.partial")
    empty = write(session / "empty.mrcs", b"")
    write(session / "zz_marker.mrcs")  # settles after everything above would have
    rec.wait_for("zz_marker.mrcs")
    assert rec.names() == ["zz_marker.mrcs"]
    wait_until(lambda: watcher.pending == 0, DEADLINE, lambda: "the empty file to be given up")

    write(empty)  # the empty file gets content: now it counts
    rec.wait_for("empty.mrcs")
    assert rec.names() == ["zz_marker.mrcs", "empty.mrcs"]


@pytest.mark.parametrize("poll", OBSERVERS)
def test_changed_file_is_delivered_again_unchanged_file_is_not(
    poll: float | None, tmp_path: Path, start_watcher
) -> None:
    session = tmp_path / "session"
    watcher, rec = start_watcher(poll)
    star = write(session / "particles.star", b"data_\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    rec.wait_for("particles.star")

    star.read_bytes()  # reads and chmod change neither size nor mtime
    star.chmod(0o640)
    write(session / "zz_marker1.mrcs")
    rec.wait_for("zz_marker1.mrcs")
    assert rec.names().count("particles.star") == 1

    with open(star, "ab") as f:  # the STAR file grows by one row
        f.write(b"2@a.mrcs\n")
    rec.wait_for("particles.star", count=2)
    write(session / "zz_marker2.mrcs")
    rec.wait_for("zz_marker2.mrcs")
    assert rec.names() == ["particles.star", "zz_marker1.mrcs", "particles.star", "zz_marker2.mrcs"]
    assert rec.calls[2][1] == star.stat().st_size > rec.calls[0][1]
    assert watcher.delivered == 4


def test_file_deleted_before_settling_is_dropped(tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    watcher, rec = start_watcher(None, settle_seconds=0.5)
    doomed = write(session / "doomed.mrcs")
    wait_until(lambda: watcher.pending == 1, DEADLINE, lambda: "doomed.mrcs to be pending")
    doomed.unlink()
    wait_until(lambda: watcher.pending == 0, DEADLINE, lambda: "doomed.mrcs to be dropped")
    write_then_rename(session / "zz_marker.mrcs")
    rec.wait_for("zz_marker.mrcs")
    assert rec.names() == ["zz_marker.mrcs"]


@pytest.mark.parametrize("poll", OBSERVERS)
def test_on_ready_raising_does_not_stop_deliveries(
    poll: float | None, tmp_path: Path, start_watcher, caplog: pytest.LogCaptureFixture
) -> None:
    session = tmp_path / "session"
    rec = Recorder(fail_on=lambda p: p.name == "bad.mrcs")
    watcher, _ = start_watcher(poll, rec)
    write_then_rename(session / "bad.mrcs")
    rec.wait_for("bad.mrcs")
    write_then_rename(session / "good.mrcs")
    rec.wait_for("good.mrcs")
    wait_until(lambda: watcher.delivered == 2, DEADLINE, lambda: f"delivered == 2, is {watcher.delivered}")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "cryofastar.daemon.watcher"]
    assert len(errors) == 1
    assert "bad.mrcs" in errors[0].getMessage()
    assert "refusing bad.mrcs" in errors[0].exc_text


@pytest.mark.parametrize("poll", OBSERVERS)
def test_slow_on_ready_loses_nothing(poll: float | None, tmp_path: Path, start_watcher) -> None:
    session = tmp_path / "session"
    rec = Recorder(block_seconds=0.5)
    watcher, _ = start_watcher(poll, rec)
    names = [f"stack_{i:03d}.mrcs" for i in range(5)]
    for name in names:
        write_then_rename(session / name)
    wait_until(lambda: watcher.queued >= 2, DEADLINE, lambda: f"a backlog; queued={watcher.queued}")
    wait_until(lambda: len(rec.names()) == 5, 10.0, lambda: f"5 deliveries, got {rec.names()}")
    wait_until(lambda: watcher.queued == 0, DEADLINE, lambda: f"queued == 0, is {watcher.queued}")
    assert watcher.pending == 0
    assert sorted(rec.names()) == names
    if poll is None:  # native renames are ready in the order they happened
        assert rec.names() == names
    assert rec.max_active == 1
    assert len({tid for _, _, tid in rec.calls}) == 1
    assert rec.calls[0][2] != threading.get_ident()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"settle_seconds": 0}, "settle_seconds"),
        ({"settle_seconds": -1.0}, "settle_seconds"),
        ({"settle_seconds": float("nan")}, "settle_seconds"),
        ({"poll_seconds": 0}, "poll_seconds"),
        ({"poll_seconds": -0.5}, "poll_seconds"),
    ],
)
def test_bad_timings_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StackWatcher(tmp_path, print, **kwargs)


def test_bad_root_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing directory"):
        StackWatcher(tmp_path / "missing", print)
    with pytest.raises(ValueError, match="not an existing directory"):
        StackWatcher(write(tmp_path / "file.mrcs"), print)
    with pytest.raises(TypeError, match="callable"):
        StackWatcher(tmp_path, "print")  # type: ignore[arg-type]


@pytest.mark.parametrize("poll", OBSERVERS)
def test_lifecycle(poll: float | None, tmp_path: Path) -> None:
    before = set(threading.enumerate())
    watcher = StackWatcher(tmp_path, print, poll_seconds=poll, settle_seconds=SETTLE)
    assert "state=new" in repr(watcher)
    watcher.stop()  # stopping a watcher that never started does nothing
    with watcher:
        assert watcher.running
        assert "state=running" in repr(watcher) and str(tmp_path.resolve()) in repr(watcher)
        ours = [t for t in set(threading.enumerate()) - before if t.name.startswith("stackwatcher-")]
        assert len(ours) == 3  # observer, checker, dispatcher
        with pytest.raises(RuntimeError, match="started only once"):
            watcher.start()
    assert not watcher.running
    assert not any(t.is_alive() for t in ours)
    watcher.stop()  # idempotent
    with pytest.raises(RuntimeError, match="started only once"):
        watcher.start()
    assert "state=stopped" in repr(watcher)


def test_stop_does_not_wait_for_the_backlog(tmp_path: Path, start_watcher, caplog: pytest.LogCaptureFixture) -> None:
    """stop() returns within its timeout while on_ready blocks; files not yet handed over are dropped and logged."""
    release = threading.Event()
    calls: list[Path] = []

    def blocking(path: Path) -> None:
        calls.append(path)
        release.wait(DEADLINE)

    watcher = StackWatcher(tmp_path / "session", blocking, settle_seconds=SETTLE)
    watcher.start()
    for i in range(3):
        write_then_rename(tmp_path / "session" / f"s{i}.mrcs")
    wait_until(lambda: watcher.queued == 3 and len(calls) == 1, DEADLINE, lambda: f"queued={watcher.queued}")
    t0 = time.monotonic()
    watcher.stop(timeout=0.3)
    assert time.monotonic() - t0 < 2.0
    assert "2 complete file(s) never handed to on_ready" in caplog.text
    assert watcher.queued == 1  # the call still in progress
    dispatcher = next(t for t in threading.enumerate() if t.name.startswith("stackwatcher-dispatch"))
    release.set()
    dispatcher.join(DEADLINE)
    assert not dispatcher.is_alive()
    assert len(calls) == 1 and watcher.queued == 0 and watcher.delivered == 1

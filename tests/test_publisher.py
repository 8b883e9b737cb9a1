"""Publisher and subscriber over real ZeroMQ PUB/SUB sockets on 127.0.0.1 (random free ports).

PUB/SUB drops what is published before a subscription has reached the publisher
("slow joiner"), so tests publish pings until the subscriber hears one, with a
deadline, never a fixed sleep.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from cryofastar.daemon.publisher import AddressInUseError, Publisher, PublisherError
from cryofastar.monitoring.subscriber import Subscriber, run_subscriber
from cryofastar.protocol import Message, PosesMessage, StatusMessage, VolumeMessage, encode
from cryofastar.recon.io import read_volume
from typer.testing import CliRunner

from cryofastar.cli import app

ANY_PORT = "tcp://127.0.0.1:0"
DEADLINE_S = 10.0


def volume_message(particles: int = 1234, box: int = 16, apix: float = 1.75, seed: int = 0) -> VolumeMessage:
    rng = np.random.default_rng(seed)
    shells = np.arange(box // 2 + 1)
    with np.errstate(divide="ignore"):
        resolution = box * apix / shells
    return VolumeMessage(
        volume=rng.normal(size=(box, box, box)).astype(np.float32),
        apix=apix,
        particles=particles,
        resolution_angstrom=6.5,
        fsc_resolution_angstrom=resolution,
        fsc=np.linspace(1.0, -0.05, box // 2 + 1),
    )


def poses_message(batch: int = 0, n: int = 4) -> PosesMessage:
    poses = np.zeros((n, 6), np.float32)
    poses[:, 0] = np.arange(n) * 10.0
    poses[:, 5] = 0.5
    return PosesMessage(poses=poses, particle_ids=[f"{i + 1}@a.mrcs" for i in range(n)], batch=batch,
                        half_sets=[1, 2] * (n // 2))


def receive_matching(subscriber: Subscriber, accept: Callable[[Message], bool],
                     timeout_s: float = DEADLINE_S) -> Message:
    """The first message ``accept`` takes, skipping others; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        message = subscriber.receive(left)
        if message is not None and accept(message):
            return message
    pytest.fail(f"no matching message within {timeout_s} s")


def is_ping(message: Message) -> bool:
    return isinstance(message, StatusMessage) and "ping" in message.status


def wait_connected(publisher: Publisher, subscriber: Subscriber) -> None:
    """Publish status pings until the subscriber hears one (the subscription has reached the publisher)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        publisher.publish(StatusMessage(status={"ping": True}))
        if subscriber.receive(0.05) is not None:
            return
    pytest.fail("subscriber never connected")


def test_subscriber_receives_poses_status_and_volume_in_order():
    with Publisher(ANY_PORT, session="test-session", republish_seconds=None) as publisher, \
            Subscriber(publisher.address) as subscriber:
        assert publisher.address.startswith("tcp://127.0.0.1:") and not publisher.address.endswith(":0")
        wait_connected(publisher, subscriber)
        sent_poses = poses_message(batch=5)
        sent_volume = volume_message()
        status = {"particles_ingested": 100, "particles_per_second": 12.5, "queues": {"reader": 2}}
        seqs = [publisher.publish(sent_poses), publisher.publish(StatusMessage(status=status)),
                publisher.publish(sent_volume)]
        assert seqs == sorted(seqs)

        poses = receive_matching(subscriber, lambda m: not is_ping(m))
        assert isinstance(poses, PosesMessage)
        np.testing.assert_array_equal(poses.poses, sent_poses.poses)
        assert poses.particle_ids == sent_poses.particle_ids and poses.batch == 5 and poses.half_sets == [1, 2, 1, 2]
        got_status = receive_matching(subscriber, lambda m: not is_ping(m))
        assert isinstance(got_status, StatusMessage) and got_status.status == status
        volume = receive_matching(subscriber, lambda m: not is_ping(m))
        assert isinstance(volume, VolumeMessage)
        np.testing.assert_array_equal(volume.volume, sent_volume.volume)
        assert volume.apix == 1.75 and volume.particles == 1234 and volume.resolution_angstrom == 6.5
        assert [poses.seq, got_status.seq, volume.seq] == seqs
        assert {poses.session, got_status.session, volume.session} == {"test-session"}
        deadline = time.monotonic() + DEADLINE_S  # the socket thread counts a message just after sending it
        while publisher.sent["volume"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent = publisher.sent
        assert sent["poses"] == 1 and sent["volume"] == 1 and sent["status"] >= 2
        assert publisher.dropped == {"volume": 0, "poses": 0, "status": 0, "classes": 0}


def test_subscriber_filters_topics():
    with Publisher(ANY_PORT, republish_seconds=None) as publisher, \
            Subscriber(publisher.address, topics=("poses",)) as subscriber:
        deadline = time.monotonic() + DEADLINE_S
        message = None
        while message is None and time.monotonic() < deadline:  # slow joiner: poses until one arrives
            publisher.publish(StatusMessage(status={"files_seen": 1}))
            publisher.publish(poses_message(batch=1))
            message = subscriber.receive(0.05)
        assert isinstance(message, PosesMessage)
        while (message := subscriber.receive(0.2)) is not None:
            assert isinstance(message, PosesMessage)
    with pytest.raises(ValueError, match="topics must be among"):
        Subscriber("tcp://127.0.0.1:5555", topics=("map",))


def test_late_subscriber_gets_the_latest_volume_within_one_republish_period():
    period = 0.3
    with Publisher(ANY_PORT, republish_seconds=period) as publisher:
        publisher.publish(volume_message(particles=100, seed=1))
        latest = volume_message(particles=200, seed=2)
        publisher.publish(latest)
        time.sleep(2 * period)  # both sent, and re-sent, to nobody
        assert publisher.republished >= 1
        with Subscriber(publisher.address, topics=("volume",)) as subscriber:
            start = time.monotonic()
            message = receive_matching(subscriber, lambda m: True)
            waited = time.monotonic() - start
        assert isinstance(message, VolumeMessage) and message.particles == 200
        np.testing.assert_array_equal(message.volume, latest.volume)
        assert waited < period + 1.0  # one period plus connection set-up (generous for a loaded machine)
        assert publisher.sent["volume"] >= 3


def test_run_subscriber_saves_each_new_volume_as_mrc_with_fsc_table(tmp_path: Path):
    published = volume_message(particles=4321, box=16, apix=1.75)
    lines: list[str] = []
    with Publisher(ANY_PORT, republish_seconds=0.3) as publisher:
        publisher.publish(published)
        # the map is re-sent every 0.3 s: the first copy is saved, the second is recognised as a repeat
        received = run_subscriber(publisher.address, tmp_path, max_messages=2, timeout_s=DEADLINE_S,
                                  echo=lines.append)
    assert received == 2
    numbered = tmp_path / "volume_00004321.mrc"
    assert "4321 particles" in lines[0] and "resolution 6.50 Å" in lines[0] and str(numbered) in lines[0]
    assert "re-sent" in lines[1]
    for path in (numbered, tmp_path / "volume.mrc"):
        data, apix = read_volume(path)
        np.testing.assert_array_equal(data.numpy(), published.volume)
        assert apix == pytest.approx(1.75)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.mrc", "volume_00004321.mrc", "volume_fsc.tsv"]
    table = (tmp_path / "volume_fsc.tsv").read_text().splitlines()
    assert table[0] == "shell\tresolution_angstrom\tfsc_half_maps"  # the form of every FSC table written
    rows = np.array([[float(v) for v in row.split("\t")] for row in table[1:]])
    assert rows.shape == (9, 3) and np.isinf(rows[0, 1])
    np.testing.assert_array_equal(rows[:, 0], np.arange(9))
    np.testing.assert_allclose(rows[1:, 1], published.fsc_resolution_angstrom[1:], rtol=1e-5)
    np.testing.assert_allclose(rows[:, 2], published.fsc, rtol=1e-5, atol=1e-6)


def test_run_subscriber_prints_status_and_poses_lines():
    lines: list[str] = []
    stop = threading.Event()
    with Publisher(ANY_PORT, republish_seconds=None) as publisher:
        def feed() -> None:
            while not stop.is_set():
                publisher.publish(StatusMessage(status={"particles_ingested": 10, "particles_per_second": 2.5}))
                publisher.publish(poses_message(batch=9))
                stop.wait(0.05)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            received = run_subscriber(publisher.address, None, max_messages=4, timeout_s=DEADLINE_S,
                                      echo=lines.append)
        finally:
            stop.set()
            feeder.join()
    assert received == 4
    status = next(line for line in lines if " status " in line)
    assert "particles_ingested=10" in status and "particles_per_second=2.5" in status
    poses = next(line for line in lines if " poses " in line)
    assert "batch 9" in poses and "4 particles" in poses and "mean confidence 0.500" in poses


def test_run_subscriber_skips_malformed_messages_with_a_warning():
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def feed() -> None:  # the socket is used by this thread only until joined (the test thread binds and closes it)
        good = encode(StatusMessage(status={"files_seen": 3}))
        while not stop.is_set():
            socket.send_multipart([b"volume", b"{not json", b""])
            socket.send_multipart(good)
            stop.wait(0.05)

    feeder = threading.Thread(target=feed)
    feeder.start()
    lines: list[str] = []
    try:
        received = run_subscriber(f"tcp://127.0.0.1:{port}", None, max_messages=2, timeout_s=DEADLINE_S,
                                  echo=lines.append)
    finally:
        stop.set()
        feeder.join()
        socket.close(linger=0)
        context.term()
    assert received == 2
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings and "volume header is not valid UTF-8 JSON" in warnings[0]
    assert sum("files_seen=3" in line for line in lines) == 2


def test_run_subscriber_times_out_and_checks_its_arguments():
    start = time.monotonic()
    assert run_subscriber("tcp://127.0.0.1:1", None, max_messages=None, timeout_s=0.2, echo=print) == 0
    assert time.monotonic() - start < 2.0
    with pytest.raises(ValueError, match="--count"):
        run_subscriber("tcp://127.0.0.1:1", None, max_messages=0, timeout_s=1.0, echo=print)
    with pytest.raises(ValueError, match="--timeout"):
        run_subscriber("tcp://127.0.0.1:1", None, max_messages=1, timeout_s=0.0, echo=print)
    with pytest.raises(ValueError, match="cannot connect"):
        Subscriber("tcp://127.0.0.1")


def test_run_subscriber_timeout_counts_from_the_last_message():
    lines: list[str] = []
    with Publisher(ANY_PORT, republish_seconds=0.1) as publisher:
        publisher.publish(volume_message())
        start = time.monotonic()
        # re-sent every 0.1 s: never 0.5 s without a message, so all 8 arrive (~0.8 s > 0.5 s)
        received = run_subscriber(publisher.address, None, max_messages=8, timeout_s=0.5, echo=lines.append)
        elapsed = time.monotonic() - start
    assert received == 8 and elapsed > 0.5
    assert sum("re-sent" in line for line in lines) == 7


def test_subscribe_command_prints_the_volume_and_saves_it(tmp_path: Path):
    with Publisher(ANY_PORT, republish_seconds=0.2) as publisher:
        publisher.publish(volume_message(particles=7))
        result = CliRunner().invoke(app, ["subscribe", publisher.address, "--save", str(tmp_path / "maps"),
                                          "--count", "1", "--timeout", str(DEADLINE_S)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert len(out.splitlines()) == 1 and "7 particles" in out and "volume_00000007.mrc" in out
    assert (tmp_path / "maps" / "volume.mrc").is_file()


def test_address_in_use_is_a_clear_error():
    with Publisher(ANY_PORT) as first:
        with pytest.raises(AddressInUseError, match="already in use") as info:
            Publisher(first.address)
        assert first.address in str(info.value) and isinstance(info.value, OSError)
    with pytest.raises(PublisherError, match="cannot publish on 'nonsense'"):
        Publisher("nonsense")
    with pytest.raises(ValueError, match="republish_seconds"):
        Publisher(ANY_PORT, republish_seconds=0)


def test_close_is_idempotent_and_publish_after_close_is_an_error():
    publisher = Publisher(ANY_PORT)
    address = publisher.address
    publisher.close()
    publisher.close()
    assert publisher.closed
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(StatusMessage(status={}))
    with Publisher(address) as again:  # the port is free again once closed
        assert again.address == address
    subscriber = Subscriber(address)
    subscriber.close()
    subscriber.close()


def test_full_queue_drops_the_oldest_status_first_and_never_a_volume():
    publisher = Publisher(ANY_PORT, queue_size=3, republish_seconds=None)
    try:
        # Holding the queue's (re-entrant) lock keeps the socket thread from taking anything,
        # so the queue fills deterministically while this thread still publishes.
        with publisher._cond:
            publisher.publish(StatusMessage(status={"n": 0}))
            publisher.publish(poses_message())
            publisher.publish(StatusMessage(status={"n": 1}))
            publisher.publish(volume_message())  # full: drops status n=0
            assert publisher.dropped == {"volume": 0, "poses": 0, "status": 1, "classes": 0}
            publisher.publish(volume_message())  # full: drops status n=1
            publisher.publish(volume_message())  # full: drops the poses
            assert publisher.dropped == {"volume": 0, "poses": 1, "status": 2, "classes": 0}
            publisher.publish(volume_message())  # only volumes wait: queued past the bound
            publisher.publish(StatusMessage(status={"n": 2}))  # nothing to make room: this status is dropped
            assert publisher.dropped == {"volume": 0, "poses": 1, "status": 3, "classes": 0}
            assert publisher.pending == 4
    finally:
        publisher.close()  # sends what is queued
    assert publisher.sent == {"volume": 4, "poses": 0, "status": 0, "classes": 0}
    assert publisher.pending == 0


def test_the_example_subscriber_in_docs_protocol_md_runs_against_a_publisher(tmp_path: Path):
    """docs/protocol.md's pyzmq + numpy example, run as written (address and loop bound substituted)."""
    import re
    import subprocess
    import sys

    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    example = re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1)
    assert "while True:" in example and "tcp://127.0.0.1:5555" in example
    with Publisher(ANY_PORT, republish_seconds=None) as publisher:
        script = tmp_path / "example.py"
        script.write_text(example.replace("tcp://127.0.0.1:5555", publisher.address)
                          .replace("while True:", "for _ in range(3):"))
        process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:  # slow joiner: publish until it has 3
            publisher.publish(volume_message(box=8))
            publisher.publish(StatusMessage(status={"files_seen": 1}))
            time.sleep(0.05)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[0] in ("volume", "status") for line in lines)
    # volume and status alternate, so 3 consecutive messages hold a volume
    assert any(line.startswith("volume") and line.endswith("(8, 8, 8)") for line in lines), lines


_GREEDY_SUBSCRIBER = """
import sys, time, zmq
context = zmq.Context()
greedy = context.socket(zmq.XSUB)
greedy.connect(sys.argv[1])
greedy.send(b"\\x01" + bytes(1 << 20))
time.sleep(1)
"""


def _closed_within(sock, seconds: float) -> float | None:  # noqa: ANN001 - a raw socket
    """Seconds until the peer closed ``sock`` (reading and discarding), or None if it stayed open."""
    t0 = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


def test_a_connection_that_never_finishes_the_handshake_is_dropped_and_a_huge_subscriber_frame_harms_nothing():
    import socket as sockets

    from cryofastar.daemon.publisher import HANDSHAKE_MS

    with Publisher(ANY_PORT, republish_seconds=None) as publisher:
        host, port = publisher.address.removeprefix("tcp://").rsplit(":", 1)
        silent = sockets.create_connection((host, int(port)))  # a raw TCP peer that never speaks ZMTP
        closed = _closed_within(silent, HANDSHAKE_MS / 1000 + 5)
        silent.close()
        assert closed is not None and closed < HANDSHAKE_MS / 1000 + 3, closed
        # a subscriber sending a 1 MiB "subscription", from another process: libzmq's XSUB side itself may
        # crash on it (it does, with pyzmq 27), which must not touch the publisher
        greedy = subprocess.run([sys.executable, "-c", _GREEDY_SUBSCRIBER, publisher.address], timeout=60,
                                capture_output=True)
        ok = zmq.Context.instance().socket(zmq.SUB)
        ok.setsockopt(zmq.SUBSCRIBE, b"")
        ok.connect(publisher.address)
        time.sleep(0.5)
        publisher.publish(StatusMessage(status={"n": 1}))
        assert ok.poll(5000), f"a well-behaved subscriber still receives (the greedy one exited {greedy.returncode})"
        ok.close(linger=0)

"""The reference subscriber and the ``classes`` message over real ZeroMQ sockets: received, described in one
line, saved as a real MRC stack and STAR table; a subscriber of version-1 topics never sees it.

PUB/SUB drops what is published before a subscription has reached the publisher, so a
feeder thread publishes until the subscriber has what it needs, with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import zmq
from cryofastar.daemon.publisher import Publisher
from cryofastar.monitoring.subscriber import Subscriber, describe, run_subscriber, save_classes
from cryofastar.protocol import TOPICS, ClassesMessage, StatusMessage, VolumeMessage, encode
from cryofastar.recon.io import read_images
from cryofastar.recon.io.class_files import CLASS_STAR_COLUMNS, UNDEFINED_STAR_VALUE
from typer.testing import CliRunner

from cryofastar.cli import app

DEADLINE_S = 10.0


def classes_message(version: int = 3, k: int = 4, box: int = 12, seq: int = 0) -> ClassesMessage:
    averages = np.random.default_rng(version).normal(size=(k, box, box)).astype(np.float32)
    return ClassesMessage.from_arrays(
        averages, counts=[120.5, 30.0, 300.25, 0.0][:k], apix=2.5, particles=451, version=version,
        resolution_angstrom=[14.0, np.nan, 9.5, np.nan][:k], accuracy_degrees=[3.5, 20.0, 2.0, np.nan][:k],
        junk=[False, True, False, True][:k], junk_score=[0.1, 0.85, 0.05, 0.99][:k], seq=seq, session="sess",
        time=1700000000.0)


@contextmanager
def raw_feed(frames: list[bytes]) -> Iterator[str]:
    """A raw ZeroMQ PUB socket sending the same ``frames`` every 50 ms from a thread; yields its address."""
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def feed() -> None:  # the socket is used by this thread only until joined
        while not stop.is_set():
            socket.send_multipart(frames)
            stop.wait(0.05)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop.set()
        feeder.join()
        socket.close(linger=0)
        context.term()


def test_the_default_subscriber_receives_classes_and_a_version_1_subscriber_never_does():
    assert "classes" in TOPICS
    sent = classes_message()
    with Publisher("tcp://127.0.0.1:0", session="live", republish_seconds=None) as publisher, \
            Subscriber(publisher.address) as every, \
            Subscriber(publisher.address, topics=("volume", "poses", "status")) as version_1:
        assert every.topics == TOPICS
        deadline = time.monotonic() + DEADLINE_S
        got, kinds_v1 = None, set()
        while (got is None or "status" not in kinds_v1) and time.monotonic() < deadline:  # both connected
            publisher.publish(sent)
            publisher.publish(StatusMessage(status={"ping": True}))
            while (message := every.receive(0.05)) is not None:
                got = message if isinstance(message, ClassesMessage) else got
            while (message := version_1.receive(0)) is not None:
                kinds_v1.add(message.kind)
        assert isinstance(got, ClassesMessage), "the classes message never arrived"
        np.testing.assert_array_equal(got.averages, sent.averages)
        assert got.classes == sent.classes and got.session == "live" and got.version == 3
        # the same publisher's maps and status still reach the version-1 subscriber; classes never do
        publisher.publish(sent)
        publisher.publish(VolumeMessage(np.ones((4, 4, 4)), 1.0, 5, None, [np.inf, 4, 2], [1, 0.5, 0.1]))
        deadline = time.monotonic() + DEADLINE_S
        while "volume" not in kinds_v1 and time.monotonic() < deadline:
            if (message := version_1.receive(0.1)) is not None:
                kinds_v1.add(message.kind)
        assert kinds_v1 == {"status", "volume"}


def test_save_classes_writes_a_stack_with_its_pixel_size_and_a_relion_class_table(tmp_path: Path):
    message = classes_message(version=12)
    numbered = save_classes(message, tmp_path / "out")
    assert numbered == tmp_path / "out" / "class_averages_000012.mrcs"
    assert sorted(p.name for p in numbered.parent.iterdir()) == [
        "class_averages.mrcs", "class_averages_000012.mrcs", "classes.star", "classes_000012.star"]
    for stack in ("class_averages_000012.mrcs", "class_averages.mrcs"):
        path = numbered.parent / stack
        np.testing.assert_array_equal(read_images(path).numpy(), message.averages)
        with mrcfile.open(path) as mrc:
            assert mrc.is_image_stack() and mrc.voxel_size.x == pytest.approx(2.5)
    for table, stack in (("classes_000012.star", "class_averages_000012.mrcs"),
                         ("classes.star", "class_averages.mrcs")):
        rows = starfile.read(numbered.parent / table)
        assert list(rows.columns) == list(CLASS_STAR_COLUMNS)
        assert list(rows["rlnReferenceImage"]) == [f"{i:06d}@{stack}" for i in (1, 2, 3, 4)]
        assert list(rows["rlnClassNumber"]) == [1, 2, 3, 4] and list(rows["rlnCryofastarJunk"]) == [0, 1, 0, 1]
        np.testing.assert_allclose(rows["rlnCryofastarParticleCount"], [120.5, 30.0, 300.25, 0.0])
        np.testing.assert_allclose(rows["rlnClassDistribution"], np.array([120.5, 30.0, 300.25, 0.0]) / 450.75,
                                   atol=1e-6)
        np.testing.assert_allclose(rows["rlnEstimatedResolution"], [14.0, UNDEFINED_STAR_VALUE, 9.5, 999.0])
        np.testing.assert_allclose(rows["rlnAccuracyRotations"], [3.5, 20.0, 2.0, 999.0])
        np.testing.assert_allclose(rows["rlnCryofastarJunkScore"], [0.1, 0.85, 0.05, 0.99])
    later = ClassesMessage.from_arrays(classes_message(version=13).averages, [1, 2, 3, 4], 2.5, 10, 13,
                                       numbers=[5, 9, 2, 14])  # numbers other than 1..K are kept
    save_classes(later, tmp_path / "out")  # the latest replaces class_averages.mrcs; version 12 stays
    np.testing.assert_array_equal(read_images(numbered.parent / "class_averages.mrcs").numpy(), later.averages)
    np.testing.assert_array_equal(read_images(numbered).numpy(), message.averages)
    assert list(starfile.read(numbered.parent / "classes_000013.star")["rlnClassNumber"]) == [5, 9, 2, 14]
    assert list(starfile.read(numbered.parent / "classes.star")["rlnClassNumber"]) == [5, 9, 2, 14]


def test_describe_says_the_class_set_in_one_line():
    line = describe(classes_message(), saved=Path("/x/class_averages_000003.mrcs"))
    assert "\n" not in line and " classes seq 0  version 3  4 classes (2 junk)  451 particles" in line
    assert "largest: class 3, 300 particles, 9.5 Å" in line and "box 12 at 2.5 Å/px" in line
    assert line.endswith("-> /x/class_averages_000003.mrcs")
    assert describe(classes_message(), repeat=True).endswith("(re-sent)")


def test_run_subscriber_saves_each_new_class_set_once(tmp_path: Path):
    message = classes_message(version=7, seq=41)
    lines: list[str] = []
    with raw_feed(encode(message)) as address:  # byte-identical copies, as a publisher's re-sending would be
        received = run_subscriber(address, tmp_path, max_messages=2, timeout_s=DEADLINE_S, echo=lines.append)
    assert received == 2
    assert "version 7" in lines[0] and lines[0].endswith(str(tmp_path / "class_averages_000007.mrcs"))
    assert lines[1].endswith("(re-sent)")
    np.testing.assert_array_equal(read_images(tmp_path / "class_averages_000007.mrcs").numpy(), message.averages)
    assert len(starfile.read(tmp_path / "classes_000007.star")) == 4


def test_subscribe_command_prints_and_saves_the_class_averages(tmp_path: Path):
    with raw_feed(encode(classes_message(version=2, seq=5))) as address:
        result = CliRunner().invoke(app, ["subscribe", address, "--save", str(tmp_path / "live"), "--count", "1",
                                          "--timeout", str(DEADLINE_S)])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and "4 classes (2 junk)" in result.stdout
    assert "class_averages_000002.mrcs" in result.stdout
    assert (tmp_path / "live" / "classes.star").is_file() and (tmp_path / "live" / "class_averages.mrcs").is_file()

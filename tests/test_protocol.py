"""The wire protocol: every kind survives encode -> decode; every malformed message is a ProtocolError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cryofastar.protocol import (
    DTYPE,
    FSC_THRESHOLD,
    KIND_VERSIONS,
    POSE_COLUMNS,
    PROTOCOL_VERSION,
    TOPICS,
    ClassesMessage,
    ClassSummary,
    PosesMessage,
    ProtocolError,
    StatusMessage,
    VolumeMessage,
    decode,
    encode,
)


def volume_message(box: int = 8, particles: int = 1234) -> VolumeMessage:
    rng = np.random.default_rng(0)
    shells = np.arange(box // 2 + 1)
    with np.errstate(divide="ignore"):
        resolution = box * 1.5 / shells  # inf for DC
    return VolumeMessage(
        volume=rng.normal(size=(box, box, box)).astype(np.float32),
        apix=1.5,
        particles=particles,
        resolution_angstrom=4.2,
        fsc_resolution_angstrom=resolution,
        fsc=np.linspace(1.0, 0.0, box // 2 + 1),
        seq=7,
        time=1700000000.25,
        session="abc123",
    )


def poses_message(n: int = 5, half_sets: bool = True) -> PosesMessage:
    rng = np.random.default_rng(1)
    return PosesMessage(
        poses=rng.uniform(-180, 180, size=(n, 6)).astype(np.float32),
        particle_ids=[f"{i + 1:06d}@Movies/stack_0001.mrcs" for i in range(n)],
        batch=3,
        half_sets=[1 + i % 2 for i in range(n)] if half_sets else None,
        seq=8,
        session="abc123",
    )


def classes_message(k: int = 3, box: int = 6) -> ClassesMessage:
    averages = np.random.default_rng(2).normal(size=(k, box, box)).astype(np.float32)
    return ClassesMessage.from_arrays(
        averages, counts=np.arange(k, 0, -1) * 10.5, apix=2.25, particles=77, version=5,
        resolution_angstrom=np.r_[12.5, [np.nan] * (k - 1)], accuracy_degrees=np.r_[[4.0] * (k - 1), np.nan],
        junk=np.arange(k) == 1, junk_score=np.linspace(0.1, 0.9, k), seq=9, time=1700000002.5, session="abc123")


def header(frames: list[bytes]) -> dict:
    return json.loads(frames[1])


def test_constants():
    assert PROTOCOL_VERSION == 2
    assert TOPICS == ("volume", "poses", "status", "classes")
    assert KIND_VERSIONS == {"volume": 1, "poses": 1, "status": 1, "classes": 2}  # the lowest version that reads each
    assert DTYPE == "<f4" and FSC_THRESHOLD == 0.143
    assert POSE_COLUMNS == ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                            "confidence")
    assert issubclass(ProtocolError, ValueError)


def test_volume_round_trip_and_wire_layout():
    message = volume_message()
    frames = encode(message)
    assert len(frames) == 3 and frames[0] == b"volume"
    head = header(frames)
    assert head["protocol"] == 1 and head["kind"] == "volume" and head["seq"] == 7
    assert head["time"] == 1700000000.25 and head["session"] == "abc123"
    assert head["dtype"] == "<f4" and head["shape"] == [8, 8, 8] and head["box"] == 8
    assert head["apix"] == 1.5 and head["particles"] == 1234 and head["resolution_angstrom"] == 4.2
    assert head["fsc_threshold"] == 0.143
    assert head["fsc"]["resolution_angstrom"][0] is None  # DC shell: inf is not JSON
    assert head["fsc"]["resolution_angstrom"][1] == pytest.approx(12.0)
    assert len(head["fsc"]["fsc"]) == 5
    # payload: little-endian float32, C order, [z, y, x]
    assert frames[2] == message.volume.astype("<f4").tobytes(order="C")
    assert np.frombuffer(frames[2], "<f4")[1] == message.volume[0, 0, 1]

    back = decode(frames)
    assert isinstance(back, VolumeMessage)
    np.testing.assert_array_equal(back.volume, message.volume)
    assert back.volume.dtype == np.float32 and back.volume.flags.writeable
    assert back.box == 8 and back.apix == 1.5 and back.particles == 1234
    assert back.resolution_angstrom == 4.2 and back.fsc_threshold == 0.143
    assert math.isinf(back.fsc_resolution_angstrom[0])
    np.testing.assert_allclose(back.fsc_resolution_angstrom[1:], message.fsc_resolution_angstrom[1:])
    np.testing.assert_allclose(back.fsc, message.fsc)
    assert (back.seq, back.time, back.session) == (7, 1700000000.25, "abc123")


def test_volume_undefined_resolution_and_nan_fsc_are_null():
    message = volume_message()
    message.resolution_angstrom = None
    message.fsc[-1] = np.nan
    frames = encode(message)
    assert header(frames)["resolution_angstrom"] is None
    assert header(frames)["fsc"]["fsc"][-1] is None
    back = decode(frames)
    assert back.resolution_angstrom is None and math.isnan(back.fsc[-1])


def test_volume_history_round_trip_and_is_optional():
    message = volume_message()
    assert "history" not in header(encode(message)) and decode(encode(message)).history is None
    message.history = np.array([[1700000000.5, 256, np.nan], [1700000005.0, 512, 9.5]])
    head = header(encode(message))
    assert head["history"] == {"time": [1700000000.5, 1700000005.0], "particles": [256, 512],
                               "resolution_angstrom": [None, 9.5]}
    back = decode(encode(message))
    np.testing.assert_array_equal(back.history, message.history)
    frames = encode(message)
    broken = json.loads(frames[1])
    broken["history"] = [1, 2]
    with pytest.raises(ProtocolError, match="history must be an object"):
        decode([frames[0], json.dumps(broken).encode(), frames[2]])
    del broken["history"]
    broken["history"] = {"time": [1.0], "particles": [2]}
    with pytest.raises(ProtocolError, match="resolution_angstrom"):
        decode([frames[0], json.dumps(broken).encode(), frames[2]])


@pytest.mark.parametrize("half_sets", [True, False])
def test_poses_round_trip(half_sets):
    message = poses_message(half_sets=half_sets)
    frames = encode(message)
    head = header(frames)
    assert frames[0] == b"poses" and head["shape"] == [5, 6] and head["columns"] == list(POSE_COLUMNS)
    assert head["particle_ids"][0] == "000001@Movies/stack_0001.mrcs" and head["batch"] == 3
    assert ("half_sets" in head) == half_sets
    back = decode(frames)
    assert isinstance(back, PosesMessage)
    np.testing.assert_array_equal(back.poses, message.poses)
    assert back.particle_ids == message.particle_ids and back.batch == 3
    assert back.half_sets == message.half_sets
    np.testing.assert_array_equal(back.confidence, message.poses[:, 5])


def test_empty_poses_batch_round_trips():
    message = PosesMessage(poses=np.zeros((0, 6), np.float32), particle_ids=[], batch=0)
    back = decode(encode(message))
    assert back.poses.shape == (0, 6) and back.particle_ids == []


def test_status_round_trip_with_numpy_values_and_nan():
    status = {
        "particles_ingested": np.int64(1200),
        "particles_posed": 1100,
        "particles_per_second": float("nan"),
        "queues": {"reader": 3, "model": np.int32(1)},
        "files_seen": 12,
        "files_rejected": 0,
    }
    frames = encode(StatusMessage(status=status, seq=2, session="s"))
    assert frames[0] == b"status" and frames[2] == b""
    assert "dtype" not in header(frames)
    back = decode(frames)
    assert isinstance(back, StatusMessage)
    assert back.status == {
        "particles_ingested": 1200,
        "particles_posed": 1100,
        "particles_per_second": None,
        "queues": {"reader": 3, "model": 1},
        "files_seen": 12,
        "files_rejected": 0,
    }


def test_decode_accepts_bytes_like_frames_and_ignores_unknown_fields():
    frames = encode(poses_message())
    head = header(frames)
    head["added_in_a_later_minor_change"] = [1, 2]
    frames = [bytearray(frames[0]), memoryview(json.dumps(head).encode()), memoryview(frames[2])]
    assert decode(frames).batch == 3


def test_encode_copies_the_payload():
    message = volume_message()
    frames = encode(message)
    message.volume[:] = 0
    assert np.abs(decode(frames).volume).sum() > 0


def test_messages_check_their_shapes():
    with pytest.raises(ValueError, match="cube"):
        VolumeMessage(np.zeros((4, 4, 5)), 1.0, 0, None, [], [])
    with pytest.raises(ValueError, match="apix"):
        VolumeMessage(np.zeros((4, 4, 4)), 0.0, 0, None, [], [])
    with pytest.raises(ValueError, match="shells"):
        VolumeMessage(np.zeros((4, 4, 4)), 1.0, 0, None, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        PosesMessage(np.zeros((3, 5)), ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match="particle_ids"):
        PosesMessage(np.zeros((3, 6)), ["a"], 0)
    with pytest.raises(ValueError, match="1 or 2"):
        PosesMessage(np.zeros((2, 6)), ["a", "b"], 0, half_sets=[1, 3])
    with pytest.raises(ValueError, match="dict"):
        StatusMessage(status=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot encode"):
        encode("volume")  # type: ignore[arg-type]


def _with_header(frames: list[bytes], **changes) -> list[bytes]:
    head = header(frames)
    for key, value in changes.items():
        if value is _DELETE:
            del head[key]
        else:
            head[key] = value
    return [frames[0], json.dumps(head).encode(), frames[2]]


def _with_class(frames: list[bytes], index: int, **changes) -> list[bytes]:
    """``frames`` of a classes message with entry ``index`` of its class list changed (``_DELETE``: removed)."""
    head = header(frames)
    for key, value in changes.items():
        if value is _DELETE:
            del head["classes"][index][key]
        else:
            head["classes"][index][key] = value
    return [frames[0], json.dumps(head).encode(), frames[2]]


_DELETE = object()
_CLASSES = encode(classes_message())
_VOLUME = encode(volume_message())
_POSES = encode(poses_message())
_STATUS = encode(StatusMessage(status={"files_seen": 1}))

MALFORMED = {
    "two frames": (_STATUS[:2], "expected 3 frames .* got 2"),
    "four frames": ([*_STATUS, b""], "expected 3 frames .* got 4"),
    "one bytes object": (b"status", "expected 3 frames .* got a single"),
    "unknown topic": ([b"map", *_STATUS[1:]], "unknown topic 'map'"),
    "non-ASCII topic": ([b"\xffvolume", *_VOLUME[1:]], "not ASCII"),
    "bad JSON": ([b"status", b"{not json", b""], "status header is not valid UTF-8 JSON"),
    "bad UTF-8": ([b"status", b"\xff\xfe", b""], "not valid UTF-8 JSON"),
    "header not an object": ([b"status", b"[1, 2]", b""], "must be a JSON object, got list"),
    "newer protocol": (_with_header(_STATUS, protocol=3), "protocol 3, newer than this subscriber's 2"),
    "protocol not an int": (_with_header(_STATUS, protocol="1"), "protocol must be an int"),
    "no protocol": (_with_header(_STATUS, protocol=_DELETE), "lacks field 'protocol'"),
    "kind differs from topic": (_with_header(_STATUS, kind="poses"), "kind 'poses' does not match topic 'status'"),
    "missing seq": (_with_header(_STATUS, seq=_DELETE), "lacks field 'seq'"),
    "status with payload": ([*_STATUS[:2], b"\0\0\0\0"], "status payload must be empty, got 4 bytes"),
    "status not a dict": (_with_header(_STATUS, status=3), "status must be a dict"),
    "short volume payload": ([*_VOLUME[:2], _VOLUME[2][:-4]], r"payload is 2044 bytes but shape \[8, 8, 8\]"),
    "long poses payload": ([*_POSES[:2], _POSES[2] + b"\0" * 4], "payload is 124 bytes .* needs 120"),
    "float64 payload": (_with_header(_VOLUME, dtype="<f8"), "dtype '<f8' is not supported"),
    "shape not ints": (_with_header(_VOLUME, shape=[8, 8, "8"]), "shape must be a list of non-negative ints"),
    "shape and box disagree": (_with_header(_VOLUME, box=4), r"shape \[8, 8, 8\] does not match box 4"),
    "non-cubic volume": (_with_header(_VOLUME, shape=[4, 8, 16], box=4), "non-empty cube"),
    "volume without apix": (_with_header(_VOLUME, apix=_DELETE), "volume header lacks field 'apix'"),
    "fsc not an object": (_with_header(_VOLUME, fsc=[1.0]), "fsc must be an object"),
    "fsc lengths differ": (_with_header(_VOLUME, fsc={"resolution_angstrom": [1.0], "fsc": [1.0, 0.5]}), "shells"),
    "poses with wrong columns": (_with_header(_POSES, columns=["a"] * 6), "poses columns"),
    "poses ids count": (_with_header(_POSES, particle_ids=["1@a.mrcs"]), "1 particle_ids for 5 poses"),
    "poses ids not a list": (_with_header(_POSES, particle_ids="1@a.mrcs"), "particle_ids must be a list"),
    "poses bad half set": (_with_header(_POSES, half_sets=[1, 2, 3, 1, 2]), "1 or 2"),
    "seq not a number": (_with_header(_POSES, seq="x"), "malformed poses message"),
    "classes payload too short": ([*_CLASSES[:2], _CLASSES[2][:-4]], r"payload is 428 bytes but shape \[3, 6, 6\]"),
    "classes shape and box disagree": (_with_header(_CLASSES, box=4),
                                       r"shape \[3, 6, 6\] does not match \[K, box, box\] with box 4"),
    "classes not square": (_with_header(_CLASSES, shape=[3, 4, 9], box=4), r"does not match \[K, box, box\]"),
    "fewer entries than averages": (_with_header(_CLASSES, classes=header(_CLASSES)["classes"][:2]),
                                    "lists 2 classes but the payload holds 3 averages"),
    "class list not a list": (_with_header(_CLASSES, classes={"number": 1}), "classes must be a list, got dict"),
    "class entry not an object": (_with_header(_CLASSES, classes=[1, 2, 3]), "entry 1 of 3 must be an object"),
    "negative count": (_with_class(_CLASSES, 1, count=-1), "class 2: count must be a finite number >= 0, got -1"),
    "count null": (_with_class(_CLASSES, 0, count=None), "entry 1 of 3: count must be a number, got None"),
    "entry lacks fields": (_with_class(_CLASSES, 2, junk_score=_DELETE, number=_DELETE),
                           "entry 3 of 3 lacks field\\(s\\) 'number', 'junk_score'"),
    "junk not a bool": (_with_class(_CLASSES, 0, junk=1), "junk must be true or false, got 1"),
    "junk score out of range": (_with_class(_CLASSES, 0, junk_score=1.5), "class 1: junk_score must be in \\[0, 1\\]"),
    "fraction out of range": (_with_class(_CLASSES, 0, fraction=2), "class 1: fraction must be in \\[0, 1\\]"),
    "class number 0": (_with_class(_CLASSES, 0, number=0), "class number must be >= 1"),
    "class number not an int": (_with_class(_CLASSES, 0, number=1.5), "class number must be an integer"),
    "repeated class numbers": (_with_class(_CLASSES, 1, number=1), "class numbers must be distinct"),
    "negative resolution": (_with_class(_CLASSES, 0, resolution_angstrom=-3), "resolution_angstrom must be > 0"),
    "classes without version": (_with_header(_CLASSES, version=_DELETE), "classes header lacks field 'version'"),
    "classes without apix": (_with_header(_CLASSES, apix=0), "apix must be a positive number"),
    "classes said to be protocol 1": (_with_header(_CLASSES, protocol=1), "classes messages exist since protocol 2"),
    "NaN in an average": ([*_CLASSES[:2], np.r_[np.zeros(36), [np.nan] + [0] * 35, np.zeros(36)]
                          .astype("<f4").tobytes()], r"averages of class\(es\) 2 contain NaN or Inf"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_messages_raise_protocol_error_with_one_line(name):
    frames, pattern = MALFORMED[name]
    with pytest.raises(ProtocolError, match=pattern) as info:
        decode(frames)
    assert "\n" not in str(info.value)


def test_classes_round_trip_and_wire_layout():
    message = classes_message()
    frames = encode(message)
    head = header(frames)
    assert frames[0] == b"classes" and head["protocol"] == 2 and head["kind"] == "classes"
    assert head["dtype"] == "<f4" and head["shape"] == [3, 6, 6] and head["box"] == 6 and head["apix"] == 2.25
    assert head["version"] == 5 and head["particles"] == 77
    assert head["classes"][0] == {"number": 1, "count": 31.5, "fraction": 0.5, "resolution_angstrom": 12.5,
                                  "accuracy_degrees": 4.0, "junk": False, "junk_score": 0.1}
    assert head["classes"][1]["resolution_angstrom"] is None and head["classes"][2]["accuracy_degrees"] is None  # NaN
    assert head["classes"][1]["junk"] is True
    # payload: little-endian float32, C order, [class, y, x]
    assert frames[2] == message.averages.astype("<f4").tobytes(order="C")
    assert np.frombuffer(frames[2], "<f4")[36 + 6 + 1] == message.averages[1, 1, 1]

    back = decode(frames)
    assert isinstance(back, ClassesMessage)
    np.testing.assert_array_equal(back.averages, message.averages)
    assert back.averages.dtype == np.float32 and back.averages.flags.writeable and back.box == 6
    assert back.classes == message.classes and back.classes[1] == ClassSummary(
        number=2, count=21.0, fraction=21.0 / 63.0, resolution_angstrom=None, accuracy_degrees=4.0,
        junk=True, junk_score=0.5)
    assert (back.apix, back.particles, back.version) == (2.25, 77, 5)
    assert (back.seq, back.time, back.session) == (9, 1700000002.5, "abc123")
    np.testing.assert_allclose(back.counts, [31.5, 21.0, 10.5])
    # NaN -> null -> NaN in the classifier's array form
    resolution = np.array([np.nan if c.resolution_angstrom is None else c.resolution_angstrom for c in back.classes])
    np.testing.assert_array_equal(np.isnan(resolution), [False, True, True])


def test_classes_from_arrays_fills_fractions_numbers_and_defaults():
    empty = ClassesMessage.from_arrays(np.zeros((2, 4, 4)), [0, 0], 1.0, 0, 0)
    assert [c.fraction for c in empty.classes] == [0.0, 0.0] and [c.number for c in empty.classes] == [1, 2]
    assert all(c.resolution_angstrom is None and not c.junk and c.junk_score == 0 for c in empty.classes)
    numbered = ClassesMessage.from_arrays(np.zeros((2, 4, 4)), [1, 3], 1.0, 4, 1, numbers=np.array([7, 9]),
                                          junk=np.array([True, False]))
    assert [(c.number, c.fraction, c.junk) for c in numbered.classes] == [(7, 0.25, True), (9, 0.75, False)]
    assert isinstance(numbered.classes[0].junk, bool) and isinstance(numbered.classes[0].number, int)
    with pytest.raises(ValueError, match="junk_score has 3 values for 2 classes"):
        ClassesMessage.from_arrays(np.zeros((2, 4, 4)), [1, 1], 1.0, 2, 1, junk_score=[0, 0, 0])
    with pytest.raises(ValueError, match="3 class entries for 2 averages"):
        ClassesMessage(np.zeros((2, 4, 4)), [ClassSummary(i, 1, 0.3) for i in (1, 2, 3)], 1.0, 3, 1)
    with pytest.raises(ValueError, match=r"\(K, B, B\)"):
        ClassesMessage(np.zeros((2, 4, 5)), [ClassSummary(i, 1, 0.5) for i in (1, 2)], 1.0, 2, 1)
    with pytest.raises(ValueError, match=r"\(K, B, B\)"):
        ClassesMessage(np.zeros((0, 4, 4)), [], 1.0, 0, 1)
    with pytest.raises(ValueError, match="version must be >= 0"):
        ClassesMessage(np.zeros((1, 4, 4)), [ClassSummary(1, 1, 1)], 1.0, 1, -1)
    with pytest.raises(ValueError, match="particles must be an integer"):
        ClassesMessage(np.zeros((1, 4, 4)), [ClassSummary(1, 1, 1)], 1.0, 1.5, 1)
    assert ClassSummary(1, 2, 1, resolution_angstrom=float("inf")).resolution_angstrom is None


def _version_1_reader(frames: list[bytes]) -> tuple[str, dict, np.ndarray | None]:
    """The minimal subscriber of docs/protocol.md as written for version 1 (json + numpy, refuses protocol > 1)."""
    topic, head, payload = frames
    head = json.loads(head)
    if head["protocol"] > 1:
        raise ValueError(f"protocol {head['protocol']} is newer than this script")
    return topic.decode(), head, np.frombuffer(payload, "<f4").reshape(head["shape"]) if payload else None


def test_a_version_1_subscriber_still_reads_volume_poses_and_status(monkeypatch):
    volume, poses, status = volume_message(), poses_message(), StatusMessage(status={"files_seen": 4})
    topic, head, data = _version_1_reader(encode(volume))
    assert topic == "volume" and head["protocol"] == 1 and head["particles"] == 1234
    np.testing.assert_array_equal(data, volume.volume)
    topic, head, data = _version_1_reader(encode(poses))
    assert topic == "poses" and head["protocol"] == 1 and head["particle_ids"] == poses.particle_ids
    np.testing.assert_array_equal(data, poses.poses)
    topic, head, data = _version_1_reader(encode(status))
    assert topic == "status" and head == {**head, "protocol": 1, "status": {"files_seen": 4}} and data is None
    with pytest.raises(ValueError, match="protocol 2 is newer"):  # only a script that takes every topic sees it
        _version_1_reader(encode(classes_message()))

    # this package's decoder speaking version 1 (version and topics as they were) reads the new encoder's
    # volume, poses and status unchanged, and refuses classes with its usual one line
    from cryofastar.protocol import messages

    monkeypatch.setattr(messages, "PROTOCOL_VERSION", 1)
    monkeypatch.setattr(messages, "TOPICS", ("volume", "poses", "status"))
    np.testing.assert_array_equal(decode(encode(volume)).volume, volume.volume)
    assert decode(encode(poses)).particle_ids == poses.particle_ids
    assert decode(encode(status)).status == {"files_seen": 4}
    with pytest.raises(ProtocolError, match="unknown topic 'classes'"):
        decode(encode(classes_message()))
    monkeypatch.setattr(messages, "TOPICS", TOPICS)
    with pytest.raises(ProtocolError, match="protocol 2, newer than this subscriber's 1"):
        decode(encode(classes_message()))

"""The wire protocol: every kind survives encode -> decode; every malformed message is a ProtocolError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cryofastar.protocol import (
    DTYPE,
    FSC_THRESHOLD,
    POSE_COLUMNS,
    PROTOCOL_VERSION,
    TOPICS,
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


def header(frames: list[bytes]) -> dict:
    return json.loads(frames[1])


def test_constants():
    assert PROTOCOL_VERSION == 1
    assert TOPICS == ("volume", "poses", "status")
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


_DELETE = object()
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
    "newer protocol": (_with_header(_STATUS, protocol=2), "protocol 2, newer than this subscriber's 1"),
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
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_messages_raise_protocol_error_with_one_line(name):
    frames, pattern = MALFORMED[name]
    with pytest.raises(ProtocolError, match=pattern) as info:
        decode(frames)
    assert "\n" not in str(info.value)

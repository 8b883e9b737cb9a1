"""The wire protocol of the published stream: three ZeroMQ frames per message.

Every message is ``[topic, header, payload]``:

1. topic: ASCII bytes, one of :data:`TOPICS` (``volume``, ``poses``, ``status``,
   ``classes``); subscribers filter on it.
2. header: a UTF-8 JSON object with at least ``protocol`` (int: the lowest protocol
   version that can read this kind, :data:`KIND_VERSIONS`), ``kind`` (the topic), ``seq``
   (int, increasing per publisher), ``time`` (unix seconds) and ``session`` (the daemon
   session's id); payload-carrying kinds add ``dtype`` (``"<f4"``) and ``shape`` (list of ints).
3. payload: raw little-endian float32 in C order (``b""`` for ``status``).

Versions: this module speaks :data:`PROTOCOL_VERSION` (2). Each message's header says the
lowest version that can read it, so ``volume``, ``poses`` and ``status`` (unchanged since
version 1) still say 1 and a version-1 subscriber that filters its topics keeps working;
``classes`` (new in version 2) says 2. :func:`decode` refuses a header newer than it speaks.

This package is the contract between the daemon's publisher and every subscriber in
:mod:`cryofastar.monitoring`: both import it, it imports neither (nor anything of the
package but numpy). The documented form is ``docs/protocol.md``.
"""

from __future__ import annotations

import json
import math
import operator
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "DTYPE",
    "FSC_THRESHOLD",
    "KIND_VERSIONS",
    "POSE_COLUMNS",
    "PROTOCOL_VERSION",
    "TOPICS",
    "ClassSummary",
    "ClassesMessage",
    "Message",
    "PosesMessage",
    "ProtocolError",
    "StatusMessage",
    "VolumeMessage",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 2
"""The protocol version this module speaks: it decodes every header whose ``protocol`` is at most this."""

TOPICS: tuple[str, ...] = ("volume", "poses", "status", "classes")
"""Every topic (= header ``kind``)."""

KIND_VERSIONS: dict[str, int] = {"volume": 1, "poses": 1, "status": 1, "classes": 2}
"""Topic -> the ``protocol`` its header carries: the lowest version that can read that kind
(the version that introduced it, or last changed its form). A subscriber refuses messages
with a higher one, so an older subscriber is refused only the kinds it cannot read."""

DTYPE = "<f4"
"""Payload element type: little-endian float32 (numpy's dtype string)."""

FSC_THRESHOLD = 0.143
"""Half-map FSC threshold that defines a volume message's ``resolution_angstrom``."""

POSE_COLUMNS: tuple[str, ...] = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "confidence",
)
"""Columns of a poses payload: three ZYZ Euler angles (degrees), two origins (Å), confidence."""


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text is one line saying why)."""


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars / arrays made plain and NaN / Inf made ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def _float_array(values: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
    return array


@dataclass
class VolumeMessage:
    """The current map and its half-map FSC (topic ``volume``).

    Attributes
    ----------
    volume: np.ndarray
        `(B, B, B)` float32 map, [z, y, x] (mrcfile's order, x fastest in the payload).
    apix: float
        Pixel size in Å.
    particles: int
        Particles inserted into the map so far.
    resolution_angstrom: float | None
        Resolution (Å) where the half-map FSC drops below ``fsc_threshold``; ``None``
        when undefined (too few particles, or no half-set split yet).
    fsc_resolution_angstrom: np.ndarray
        `(S,)` float64 resolution in Å of each FSC shell (``inf`` for the DC shell).
    fsc: np.ndarray
        `(S,)` float64 half-map FSC per shell (``nan`` where undefined).
    fsc_threshold: float
        Threshold used for ``resolution_angstrom`` (0.143).
    history: np.ndarray | None
        Optional `(m, 3)` float64 rows ``(unix time, particles, resolution Å)`` of the
        session's published maps, oldest first (``nan`` resolution where undefined), so
        a subscriber that connects late still sees how the resolution came down.
    seq, time, session:
        Header fields; :class:`~cryofastar.daemon.publisher.Publisher` stamps ``seq``
        and ``session``; ``time`` (unix seconds) defaults to creation time.
    """

    kind: ClassVar[str] = "volume"
    volume: np.ndarray
    apix: float
    particles: int
    resolution_angstrom: float | None
    fsc_resolution_angstrom: np.ndarray
    fsc: np.ndarray
    fsc_threshold: float = FSC_THRESHOLD
    history: np.ndarray | None = None
    seq: int = 0
    time: float = field(default_factory=_time.time)
    session: str = ""

    def __post_init__(self) -> None:
        if self.history is not None:
            self.history = np.asarray(self.history, dtype=np.float64).reshape(-1, 3)
        self.volume = _float_array(self.volume, "volume", 3)
        if len(set(self.volume.shape)) != 1 or self.volume.shape[0] < 1:
            raise ValueError(f"volume must be a non-empty cube, got shape {tuple(self.volume.shape)}")
        self.apix = float(self.apix)
        if not (math.isfinite(self.apix) and self.apix > 0):
            raise ValueError(f"apix must be a positive number of Å, got {self.apix}")
        self.particles = int(self.particles)
        if self.particles < 0:
            raise ValueError(f"particles must be >= 0, got {self.particles}")
        if self.resolution_angstrom is not None:
            self.resolution_angstrom = _finite_or_none(self.resolution_angstrom)
        self.fsc_resolution_angstrom = np.asarray(self.fsc_resolution_angstrom, dtype=np.float64).reshape(-1)
        self.fsc = np.asarray(self.fsc, dtype=np.float64).reshape(-1)
        if self.fsc.shape != self.fsc_resolution_angstrom.shape:
            raise ValueError(
                f"fsc has {self.fsc.size} shells but fsc resolution_angstrom has {self.fsc_resolution_angstrom.size}"
            )
        self.fsc_threshold = float(self.fsc_threshold)

    @property
    def box(self) -> int:
        """Box size B in pixels."""
        return int(self.volume.shape[0])


@dataclass
class PosesMessage:
    """Poses of one batch of particles (topic ``poses``).

    Attributes
    ----------
    poses: np.ndarray
        `(n, 6)` float32, columns :data:`POSE_COLUMNS`: rlnAngleRot, rlnAngleTilt,
        rlnAnglePsi (degrees, RELION ZYZ), rlnOriginXAngst, rlnOriginYAngst (Å), confidence.
    particle_ids: list[str]
        `n` RELION image names, ``index@stack`` (e.g. ``000012@Movies/a.mrcs``).
    batch: int
        Batch number within the session.
    half_sets: list[int] | None
        `n` half-set labels (1 or 2, rlnRandomSubset), or ``None``.
    seq, time, session:
        Header fields, as for :class:`VolumeMessage`.
    """

    kind: ClassVar[str] = "poses"
    poses: np.ndarray
    particle_ids: list[str]
    batch: int
    half_sets: list[int] | None = None
    seq: int = 0
    time: float = field(default_factory=_time.time)
    session: str = ""

    def __post_init__(self) -> None:
        self.poses = _float_array(self.poses, "poses", 2)
        if self.poses.shape[1] != len(POSE_COLUMNS):
            raise ValueError(f"poses must be (n, {len(POSE_COLUMNS)}), got shape {tuple(self.poses.shape)}")
        self.particle_ids = [str(p) for p in self.particle_ids]
        n = self.poses.shape[0]
        if len(self.particle_ids) != n:
            raise ValueError(f"{len(self.particle_ids)} particle_ids for {n} poses")
        self.batch = int(self.batch)
        if self.half_sets is not None:
            self.half_sets = [int(h) for h in self.half_sets]
            if len(self.half_sets) != n:
                raise ValueError(f"{len(self.half_sets)} half_sets for {n} poses")
            if any(h not in (1, 2) for h in self.half_sets):
                raise ValueError("half_sets must each be 1 or 2")

    @property
    def confidence(self) -> np.ndarray:
        """`(n,)` float32 confidence column."""
        return self.poses[:, 5]


@dataclass
class StatusMessage:
    """Counters of the running daemon (topic ``status``; no payload).

    Attributes
    ----------
    status: dict[str, Any]
        Free JSON object, e.g. ``particles_ingested``, ``particles_posed``,
        ``particles_per_second``, ``files_seen``, ``files_rejected``, ``queues``
        (name -> depth). NaN / Inf values are sent as ``null``.
    seq, time, session:
        Header fields, as for :class:`VolumeMessage`.
    """

    kind: ClassVar[str] = "status"
    status: dict[str, Any]
    seq: int = 0
    time: float = field(default_factory=_time.time)
    session: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.status, dict):
            raise ValueError(f"status must be a dict, got {type(self.status).__name__}")


def _count(value: Any, name: str) -> int:
    """``value`` as an int (numpy ints too; floats, strings and bools refused)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _optional_positive(value: float | None, name: str, allow_zero: bool) -> float | None:
    """``None`` for ``None`` / NaN / Inf, else a float that must be > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return None
    value = _finite_or_none(value)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} or null, got {value}")
    return value


@dataclass
class ClassSummary:
    """What a ``classes`` message says of one 2D class (one entry of its ``classes`` list).

    Attributes
    ----------
    number: int
        RELION's ``rlnClassNumber``, 1-based.
    count: float
        Particles in the class: the sum of the particles' membership weights (soft
        assignment, so not necessarily whole), >= 0.
    fraction: float
        ``count`` / the sum of every class's count, in [0, 1] (``rlnClassDistribution``).
    resolution_angstrom: float | None
        Estimated resolution of the class average in Å (``rlnEstimatedResolution``);
        ``None`` when undefined (NaN / Inf are taken as ``None``).
    accuracy_degrees: float | None
        Estimated accuracy of the in-plane rotations of its particles, degrees
        (``rlnAccuracyRotations``); ``None`` when undefined.
    junk: bool
        Whether class selection flags the class as junk (noise, ice, edges, aggregates).
    junk_score: float
        In [0, 1], higher = more likely junk (``junk`` is this score past the selector's threshold).

    Raises
    ------
    ValueError
        A value out of its range (the text names the class and the field).
    """

    number: int
    count: float
    fraction: float
    resolution_angstrom: float | None = None
    accuracy_degrees: float | None = None
    junk: bool = False
    junk_score: float = 0.0

    def __post_init__(self) -> None:
        self.number = _count(self.number, "class number")
        if self.number < 1:
            raise ValueError(f"class number must be >= 1 (RELION's rlnClassNumber), got {self.number}")
        where = f"class {self.number}"
        self.count = float(self.count)
        if not (math.isfinite(self.count) and self.count >= 0):
            raise ValueError(f"{where}: count must be a finite number >= 0, got {self.count}")
        self.fraction = float(self.fraction)
        if not 0.0 <= self.fraction <= 1.0:  # NaN fails too
            raise ValueError(f"{where}: fraction must be in [0, 1], got {self.fraction}")
        self.resolution_angstrom = _optional_positive(self.resolution_angstrom, f"{where}: resolution_angstrom",
                                                      allow_zero=False)
        self.accuracy_degrees = _optional_positive(self.accuracy_degrees, f"{where}: accuracy_degrees",
                                                   allow_zero=True)
        if not isinstance(self.junk, (bool, np.bool_)):
            raise ValueError(f"{where}: junk must be true or false, got {self.junk!r}")
        self.junk = bool(self.junk)
        self.junk_score = float(self.junk_score)
        if not 0.0 <= self.junk_score <= 1.0:
            raise ValueError(f"{where}: junk_score must be in [0, 1], got {self.junk_score}")

    def to_json(self) -> dict[str, Any]:
        """The entry as it goes in the header (``None`` for undefined values)."""
        return {"number": self.number, "count": self.count, "fraction": self.fraction,
                "resolution_angstrom": self.resolution_angstrom, "accuracy_degrees": self.accuracy_degrees,
                "junk": self.junk, "junk_score": self.junk_score}


@dataclass
class ClassesMessage:
    """The current 2D class averages and what is known of each class (topic ``classes``).

    Attributes
    ----------
    averages: np.ndarray
        `(K, B, B)` float32 class averages, [class, y, x], real space, centre at index
        ``B // 2``; finite values only. Row ``k`` is the average of ``classes[k]``.
    classes: list[ClassSummary]
        `K` entries in class order, one per average.
    apix: float
        Pixel size of the averages, Å/px.
    particles: int
        Particles classified so far.
    version: int
        Number of the class set, increasing by one per class set published in a session.
    seq, time, session:
        Header fields, as for :class:`VolumeMessage`.

    Raises
    ------
    ValueError
        Averages not `(K, B, B)` with K, B >= 1 or not finite, a class list of another
        length than K, repeated class numbers, a bad pixel size or count.
    """

    kind: ClassVar[str] = "classes"
    averages: np.ndarray
    classes: list[ClassSummary]
    apix: float
    particles: int
    version: int
    seq: int = 0
    time: float = field(default_factory=_time.time)
    session: str = ""

    def __post_init__(self) -> None:
        self.averages = _float_array(self.averages, "averages", 3)
        k, height, width = self.averages.shape
        if k < 1 or height < 1 or height != width:
            raise ValueError(f"averages must be (K, B, B) with K, B >= 1, got shape {tuple(self.averages.shape)}")
        self.classes = [c if isinstance(c, ClassSummary) else ClassSummary(**c) for c in self.classes]
        if len(self.classes) != k:
            raise ValueError(f"{len(self.classes)} class entries for {k} averages")
        numbers = [c.number for c in self.classes]
        if len(set(numbers)) != k:
            raise ValueError(f"class numbers must be distinct, got {numbers}")
        finite = np.isfinite(self.averages).all(axis=(1, 2))
        if not finite.all():
            bad = ", ".join(str(numbers[i]) for i in np.flatnonzero(~finite))
            raise ValueError(f"the averages of class(es) {bad} contain NaN or Inf")
        self.apix = float(self.apix)
        if not (math.isfinite(self.apix) and self.apix > 0):
            raise ValueError(f"apix must be a positive number of Å, got {self.apix}")
        self.particles = _count(self.particles, "particles")
        if self.particles < 0:
            raise ValueError(f"particles must be >= 0, got {self.particles}")
        self.version = _count(self.version, "version")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")

    @property
    def box(self) -> int:
        """Side B of each average, pixels."""
        return int(self.averages.shape[1])

    @classmethod
    def from_arrays(cls, averages: np.ndarray, counts: np.ndarray, apix: float, particles: int, version: int, *,
                    resolution_angstrom: np.ndarray | None = None, accuracy_degrees: np.ndarray | None = None,
                    junk: np.ndarray | None = None, junk_score: np.ndarray | None = None,
                    numbers: np.ndarray | None = None, **header: Any) -> ClassesMessage:
        """A message from per-class arrays (the classifier's form); ``fraction`` is computed.

        Parameters
        ----------
        averages: np.ndarray
            `(K, B, B)` class averages [class, y, x].
        counts: np.ndarray
            `(K,)` summed membership weights per class.
        apix, particles, version:
            As the attributes.
        resolution_angstrom, accuracy_degrees: np.ndarray | None
            `(K,)` each, NaN where undefined; ``None``: undefined for every class.
        junk: np.ndarray | None
            `(K,)` bool; ``None``: no class flagged.
        junk_score: np.ndarray | None
            `(K,)` in [0, 1]; ``None``: 0 for every class.
        numbers: np.ndarray | None
            `(K,)` class numbers; ``None``: 1 .. K.
        **header:
            ``seq``, ``time``, ``session``.

        Returns
        -------
        ClassesMessage
            ``fraction`` = ``counts`` / ``counts.sum()`` (0 for every class while the sum is 0).
        """
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        k = counts.size
        total = float(counts.sum())
        fraction = counts / total if total > 0 else np.zeros(k)
        nan = np.full(k, np.nan)

        def column(values: np.ndarray | None, default: np.ndarray, name: str) -> list:
            values = default if values is None else np.asarray(values).reshape(-1)
            if values.size != k:
                raise ValueError(f"{name} has {values.size} values for {k} classes")
            return values.tolist()

        rows = zip(column(numbers, np.arange(1, k + 1), "numbers"), counts.tolist(), fraction.tolist(),
                   column(resolution_angstrom, nan, "resolution_angstrom"),
                   column(accuracy_degrees, nan, "accuracy_degrees"),
                   column(junk, np.zeros(k, bool), "junk"), column(junk_score, np.zeros(k), "junk_score"),
                   strict=True)
        classes = [ClassSummary(*row) for row in rows]
        return cls(averages=averages, classes=classes, apix=apix, particles=particles, version=version, **header)

    @property
    def counts(self) -> np.ndarray:
        """`(K,)` float64 ``count`` of each class, in class order."""
        return np.array([c.count for c in self.classes], dtype=np.float64)


Message = VolumeMessage | PosesMessage | StatusMessage | ClassesMessage
"""Any decoded message."""


def _payload(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=DTYPE).tobytes(order="C")


def encode(message: Message) -> list[bytes]:
    """The three frames of ``message``: ``[topic, header JSON, payload]``.

    The payload is copied, so the caller may change its arrays afterwards.

    Parameters
    ----------
    message: Message
        A :class:`VolumeMessage`, :class:`PosesMessage`, :class:`StatusMessage` or
        :class:`ClassesMessage`.

    Returns
    -------
    frames: list[bytes]
        Topic (ASCII), header (UTF-8 JSON; ``protocol`` is the kind's
        :data:`KIND_VERSIONS`), payload (little-endian float32, C order; ``b""`` for status).
    """
    if not isinstance(message, (VolumeMessage, PosesMessage, StatusMessage, ClassesMessage)):
        raise TypeError(f"cannot encode {type(message).__name__}; expected a Volume/Poses/Status/ClassesMessage")
    header: dict[str, Any] = {
        "protocol": KIND_VERSIONS[message.kind],
        "kind": message.kind,
        "seq": int(message.seq),
        "time": float(message.time),
        "session": str(message.session),
    }
    if isinstance(message, VolumeMessage):
        payload = _payload(message.volume)
        header.update(
            dtype=DTYPE,
            shape=list(message.volume.shape),
            box=message.box,
            apix=message.apix,
            particles=message.particles,
            resolution_angstrom=message.resolution_angstrom,
            fsc={
                "resolution_angstrom": message.fsc_resolution_angstrom,
                "fsc": message.fsc,
            },
            fsc_threshold=message.fsc_threshold,
        )
        if message.history is not None:
            header["history"] = {"time": message.history[:, 0], "particles": message.history[:, 1].astype(np.int64),
                                 "resolution_angstrom": message.history[:, 2]}
    elif isinstance(message, PosesMessage):
        payload = _payload(message.poses)
        header.update(
            dtype=DTYPE,
            shape=list(message.poses.shape),
            columns=list(POSE_COLUMNS),
            particle_ids=message.particle_ids,
            batch=message.batch,
        )
        if message.half_sets is not None:
            header["half_sets"] = message.half_sets
    elif isinstance(message, ClassesMessage):
        payload = _payload(message.averages)
        header.update(
            dtype=DTYPE,
            shape=list(message.averages.shape),
            version=message.version,
            particles=message.particles,
            box=message.box,
            apix=message.apix,
            classes=[c.to_json() for c in message.classes],
        )
    else:
        payload = b""
        header["status"] = message.status
    text = json.dumps(_jsonable(header), allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return [message.kind.encode("ascii"), text.encode("utf-8"), payload]


def _field(header: dict[str, Any], name: str, kind: str) -> Any:
    if name not in header:
        raise ProtocolError(f"{kind} header lacks field {name!r}")
    return header[name]


def _array(header: dict[str, Any], payload: bytes, kind: str) -> np.ndarray:
    dtype = _field(header, "dtype", kind)
    if dtype != DTYPE:
        raise ProtocolError(f"{kind} payload dtype {dtype!r} is not supported (expected {DTYPE!r})")
    shape = _field(header, "shape", kind)
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ProtocolError(f"{kind} header shape must be a list of non-negative ints, got {shape!r}")
    expected = math.prod(shape) * np.dtype(DTYPE).itemsize
    if len(payload) != expected:
        raise ProtocolError(f"{kind} payload is {len(payload)} bytes but shape {shape} of {DTYPE} needs {expected}")
    return np.frombuffer(payload, dtype=DTYPE).astype(np.float32).reshape(shape)


def _as_float(value: Any, default: float) -> float:
    return default if value is None else float(value)


def decode(frames: Sequence[bytes]) -> Message:
    """Parse the three frames of one message.

    Parameters
    ----------
    frames: Sequence[bytes]
        ``[topic, header, payload]`` as received (bytes-like; ``zmq.Frame`` works too).

    Returns
    -------
    message: Message
        A :class:`VolumeMessage`, :class:`PosesMessage`, :class:`StatusMessage` or
        :class:`ClassesMessage`, with freshly allocated native float32 arrays. Header
        fields this version does not know are ignored.

    Raises
    ------
    ProtocolError
        Wrong frame count, unknown topic, header not a JSON object, missing or wrong
        fields, a protocol version newer than :data:`PROTOCOL_VERSION` (or older than
        the kind's :data:`KIND_VERSIONS`), or a payload whose size does not match
        ``shape`` and ``dtype``.
    """
    topic, header, payload = _header(frames)
    try:
        common = {
            "seq": int(_field(header, "seq", topic)),
            "time": float(_field(header, "time", topic)),
            "session": str(_field(header, "session", topic)),
        }
        if topic == "status":
            if payload:
                raise ProtocolError(f"status payload must be empty, got {len(payload)} bytes")
            return StatusMessage(status=_field(header, "status", topic), **common)
        array = _array(header, payload, topic)
        return {"volume": _volume, "poses": _poses, "classes": _classes}[topic](header, array, common)
    except ProtocolError:
        raise
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed {topic} message: {exc}") from None


def _header(frames: Sequence[bytes]) -> tuple[str, dict[str, Any], bytes]:
    """``(topic, header, payload)`` of three frames, the topic, the header's form and its version checked."""
    if isinstance(frames, (bytes, bytearray, str)) or len(frames) != 3:
        count = "a single" if isinstance(frames, (bytes, bytearray, str)) else len(frames)
        raise ProtocolError(f"expected 3 frames (topic, header, payload), got {count}")
    topic_frame, header_frame, payload = (bytes(getattr(f, "bytes", f)) for f in frames)
    try:
        topic = topic_frame.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"topic {topic_frame[:40]!r} is not ASCII") from None
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic!r} (known: {', '.join(TOPICS)})")
    try:
        header = json.loads(header_frame.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{topic} header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{topic} header must be a JSON object, got {type(header).__name__}")
    version = _field(header, "protocol", topic)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(f"{topic} header protocol must be an int, got {version!r}")
    if version > PROTOCOL_VERSION:
        raise ProtocolError(
            f"message uses protocol {version}, newer than this subscriber's {PROTOCOL_VERSION}; "
            "upgrade cryofastar-stream"
        )
    if version < KIND_VERSIONS[topic]:
        raise ProtocolError(
            f"{topic} header says protocol {version}, but {topic} messages exist since protocol {KIND_VERSIONS[topic]}"
        )
    kind = _field(header, "kind", topic)
    if kind != topic:
        raise ProtocolError(f"header kind {kind!r} does not match topic {topic!r}")
    return topic, header, payload


def _volume(header: dict[str, Any], array: np.ndarray, common: dict[str, Any]) -> VolumeMessage:
    """A volume message from its checked header and payload array."""
    kind = "volume"
    curve = _field(header, "fsc", kind)
    if not isinstance(curve, dict):
        raise ProtocolError(f"volume header fsc must be an object, got {type(curve).__name__}")
    shells = [_as_float(v, math.inf) for v in _field(curve, "resolution_angstrom", "volume fsc")]
    values = [_as_float(v, math.nan) for v in _field(curve, "fsc", "volume fsc")]
    resolution = _field(header, "resolution_angstrom", kind)
    box = int(_field(header, "box", kind))
    history = header.get("history")
    if history is not None:
        if not isinstance(history, dict):
            raise ProtocolError(f"volume header history must be an object, got {type(history).__name__}")
        history = np.stack([np.asarray([_as_float(v, math.nan) for v in _field(history, name, "history")],
                                       dtype=np.float64)
                            for name in ("time", "particles", "resolution_angstrom")], -1)
    if array.ndim != 3 or array.shape[0] != box:
        raise ProtocolError(f"volume shape {list(array.shape)} does not match box {box}")
    return VolumeMessage(
        volume=array,
        apix=float(_field(header, "apix", kind)),
        particles=int(_field(header, "particles", kind)),
        resolution_angstrom=None if resolution is None else float(resolution),
        fsc_resolution_angstrom=np.asarray(shells, dtype=np.float64),
        fsc=np.asarray(values, dtype=np.float64),
        fsc_threshold=float(header.get("fsc_threshold", FSC_THRESHOLD)),
        history=history,
        **common,
    )


def _poses(header: dict[str, Any], array: np.ndarray, common: dict[str, Any]) -> PosesMessage:
    """A poses message from its checked header and payload array."""
    columns = _field(header, "columns", "poses")
    if list(columns) != list(POSE_COLUMNS):
        raise ProtocolError(f"poses columns {columns!r} are not {list(POSE_COLUMNS)}")
    particle_ids = _field(header, "particle_ids", "poses")
    if not isinstance(particle_ids, list):
        raise ProtocolError(f"poses particle_ids must be a list, got {type(particle_ids).__name__}")
    return PosesMessage(
        poses=array,
        particle_ids=particle_ids,
        batch=int(_field(header, "batch", "poses")),
        half_sets=header.get("half_sets"),
        **common,
    )


_CLASS_FIELDS = ("number", "count", "fraction", "resolution_angstrom", "accuracy_degrees", "junk", "junk_score")
"""The fields of each entry of a classes header's ``classes`` list (all required; ``null`` where undefined)."""


def _classes(header: dict[str, Any], array: np.ndarray, common: dict[str, Any]) -> ClassesMessage:
    """A classes message from its checked header and payload array."""
    kind = "classes"
    box = _field(header, "box", kind)
    if array.ndim != 3 or list(array.shape[1:]) != [box, box]:
        raise ProtocolError(f"classes shape {list(array.shape)} does not match [K, box, box] with box {box}")
    entries = _field(header, "classes", kind)
    if not isinstance(entries, list):
        raise ProtocolError(f"classes header classes must be a list, got {type(entries).__name__}")
    if len(entries) != array.shape[0]:
        raise ProtocolError(f"classes header lists {len(entries)} classes but the payload holds {array.shape[0]} "
                            "averages")
    classes = []
    for index, entry in enumerate(entries):
        where = f"classes header entry {index + 1} of {len(entries)}"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where} must be an object, got {type(entry).__name__}")
        missing = [name for name in _CLASS_FIELDS if name not in entry]
        if missing:
            raise ProtocolError(f"{where} lacks field(s) {', '.join(map(repr, missing))}")
        if not isinstance(entry["junk"], bool):
            raise ProtocolError(f"{where}: junk must be true or false, got {entry['junk']!r}")
        numbers = {name: entry[name] for name in ("count", "fraction", "junk_score")}
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ProtocolError(f"{where}: {name} must be a number, got {value!r}")
        classes.append(ClassSummary(
            number=entry["number"], count=entry["count"], fraction=entry["fraction"],
            resolution_angstrom=_optional_float(entry["resolution_angstrom"]),
            accuracy_degrees=_optional_float(entry["accuracy_degrees"]), junk=entry["junk"],
            junk_score=entry["junk_score"]))
    return ClassesMessage(
        averages=array,
        classes=classes,
        apix=float(_field(header, "apix", kind)),
        particles=_field(header, "particles", kind),
        version=_field(header, "version", kind),
        **common,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)

"""Settings of a streaming session: everything ``cryofastar-stream --watch`` can set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryofastar.engine.policy import check_pose_source

from .publisher import DEFAULT_ADDRESS

__all__ = ["DaemonSettings"]


@dataclass
class DaemonSettings:
    """Everything ``cryofastar-stream --watch`` can set (units in the names or below).

    Attributes
    ----------
    watch, out: Path
        The watched directory (recursive) and the output directory (may sit inside it;
        it is never watched).
    zmq: str
        ZeroMQ PUB endpoint (local only by default).
    metrics_port: int | None
        Port of the Prometheus ``/metrics`` server on ``metrics_host``; ``None``: no server.
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    batch: int
        Views per forward pass, reference and anchors included (>= 3).
    anchors: int
        Anchor particles in every pass (fix the hand across passes).
    apix: float | None
        Pixel size (Å) overriding the files'.
    poll_seconds: float | None
        Poll the directory every this many seconds (network file systems) instead of inotify.
    settle_seconds: float
        A file written in place is complete once unchanged for this long.
    flush_seconds: float
        A partial pass is run this long after its first particle arrived.
    publish_seconds, publish_particles: float, int
        The map is written and published when either this much time has passed or this
        many particles were added since the last map.
    republish_seconds: float
        The latest map is re-sent this often (late subscribers).
    checkpoint_seconds: float
        Period of checkpoints (and particles.star); also written at stop.
    status_seconds: float
        Period of status messages.
    interpolation: str
        ``nearest`` (fast, the default) or ``trilinear`` insertion.
    weights: Path | None
        Network weights (default: the shipped ones).
    queue_size: int
        Capacity of each queue between stages.
    read_chunk: int
        Images read from disk at a time.
    candidates: int
        Particles scored to choose the session reference.
    poses_from: str
        ``network`` (the CryoFastAR network; refinement finishes its poses) or
        ``map-only`` (no network: random poses until refinement starts, then global
        search against the running map, a streaming ab initio).
    refine: bool
        Refine poses against the running map (docs/refinement.md).
    refine_after: int
        Refinement starts with the first map holding at least this many particles.
    repose_per_pass: int
        Particles already in the map re-posed after each refined pass (0: none).
    refine_box: int
        Working box (px) of refinement (particles and maps Fourier-cropped to it).
    probe_every: int
        Every this many refined passes, compare the network's poses with a global search.
    """

    watch: Path
    out: Path
    zmq: str = DEFAULT_ADDRESS
    metrics_port: int | None = 9108
    metrics_host: str = "127.0.0.1"
    device: str = "auto"
    batch: int = 128
    anchors: int = 8
    apix: float | None = None
    poll_seconds: float | None = None
    settle_seconds: float = 1.0
    flush_seconds: float = 5.0
    publish_seconds: float = 10.0
    publish_particles: int = 2000
    republish_seconds: float = 5.0
    checkpoint_seconds: float = 60.0
    status_seconds: float = 1.0
    interpolation: str = "nearest"
    weights: Path | None = None
    queue_size: int = 4
    read_chunk: int = 512
    candidates: int = 64
    poses_from: str = "network"
    refine: bool = True
    refine_after: int = 1000
    repose_per_pass: int = 128
    refine_box: int = 64
    probe_every: int = 8

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) on impossible settings."""
        if not self.watch.is_dir():
            raise ValueError(f"--watch {self.watch}: not an existing directory")
        if self.batch < 3:
            raise ValueError(f"--batch must be at least 3, got {self.batch}")
        if self.anchors < 0 or self.anchors > self.batch - 2:
            raise ValueError(f"--anchors must be between 0 and batch - 2 = {self.batch - 2}, got {self.anchors}")
        if self.apix is not None and not self.apix > 0:
            raise ValueError(f"--apix must be positive, got {self.apix}")
        if self.poll_seconds is not None and not self.poll_seconds > 0:
            raise ValueError(f"--poll must be positive, got {self.poll_seconds}")
        for name in ("settle_seconds", "flush_seconds", "publish_seconds", "republish_seconds",
                     "checkpoint_seconds", "status_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.interpolation not in ("nearest", "trilinear"):
            raise ValueError(f"--interpolation must be nearest or trilinear, got {self.interpolation!r}")
        check_pose_source(self.poses_from, self.refine, self.refine_box)
        if self.refine_after < 2:
            raise ValueError(f"--refine-after must be at least 2 particles, got {self.refine_after}")
        if self.repose_per_pass < 0:
            raise ValueError(f"--repose-per-pass must be >= 0, got {self.repose_per_pass}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")

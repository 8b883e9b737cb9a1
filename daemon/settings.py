"""Settings of the daemon's commands: a streaming session (:class:`DaemonSettings`), what the
``watch`` service adds (:class:`ServiceSettings`) and the demo (:class:`DemoSettings`).

Their fields made with :func:`~cryofastar.options.option` are the commands' options. This
module imports nothing heavy, so the command line can be built without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryofastar.engine.class_posing import CLASS_WEIGHTS_HELP, check_class_weights
from cryofastar.engine.classification import ClassifySettings
from cryofastar.engine.distributed import check_processes
from cryofastar.engine.policy import check_pose_source

from cryofastar.options import argument, negative_is_none, option

from .publisher import DEFAULT_ADDRESS

__all__ = ["DaemonSettings"]


@dataclass
class DaemonSettings:
    """Everything ``cryofastar-stream --watch`` can set (units in the names or below).

    The fields made with :func:`~cryofastar.options.option` are the command's options,
    with their flag, default and help text; the others are set only from Python.

    Attributes
    ----------
    watch, out: Path
        The watched directory (recursive) and the output directory (may sit inside it;
        it is never watched; default: ``watch / "cryofastar"``).
    zmq: str
        ZeroMQ PUB endpoint (local only by default).
    metrics_port: int | None
        Port of the Prometheus ``/metrics`` server on ``metrics_host``; ``None``: no server.
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    nproc: int
        Processes sharing the session on this machine (``watch --nproc``, docs/scaling.md "Live: watch
        --nproc"): rank 0 runs the daemon, the others read, pose and insert their share; 1 under ``torchrun``.
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
        ``network`` (the CryoFastAR network; refinement finishes its poses),
        ``map-only`` (no network: random poses until refinement starts, then global
        search against the running map, a streaming ab initio) or ``classes`` (random
        poses until the 2D lane's classes have settled, then each particle through its
        class, the class averages posed by the geometric decoder; docs/refinement.md).
    class_weights: str
        The geometric decoder of ``classes``: ``shipped``, ``classical`` or a weights file.
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
    classify: bool
        Run the 2D lane: streaming 2D classification beside the map (docs/daemon.md, "The 2D lane").
    classes_every: float
        Write and publish the 2D classes at most this often (seconds), when they changed.
    exclude_junk: bool
        Take the particles the 2D lane judges junk out of the 3D map once its classes have settled, and
        put them back if the verdict changes (:mod:`~cryofastar.engine.junk_exclusion`).
    classification: ClassifySettings
        The 2D lane's options (``--classes``, ``--diameter``, ``--max-shift``, ``--passes``,
        ``--classify-seed``: the ``classify`` command's, declared there; ``watch`` adds them).
    classify_queue: int
        Chunks that may wait for the 2D lane; past that only their locations are kept (the lane
        reads their images itself later), so the reader never waits for the 2D lane.
    """

    watch: Path = argument(metavar="DIRECTORY", help="Directory the session writes particle stacks (.mrcs/.mrc) "
                           "and RELION particle STAR files into; watched recursively.")
    out: Path = option(None, cli_type=Path | None, help="Output directory (maps, particles.star, checkpoint, "
                       "rejected.tsv); default DIRECTORY/cryofastar. Restarting with the same --out resumes.")
    zmq: str = option(DEFAULT_ADDRESS, help="ZeroMQ PUB endpoint for maps, poses and status (docs/protocol.md); "
                      "local only by default, tcp://*:5555 for all interfaces.")
    metrics_port: int | None = option(9108, cli_type=int, parse=negative_is_none, help="Port of the Prometheus "
                                      "/metrics endpoint (0: any free port; -1: none).")
    metrics_host: str = option("127.0.0.1", help="Address the /metrics endpoint binds to.")
    device: str = option("auto", help="auto, cpu or cuda.")
    nproc: int = option(1, help="Processes sharing the session on this machine (torch.distributed: gloo on CPUs, "
                        "NCCL with one GPU each): rank 0 keeps the map and its outputs, the others pose and insert "
                        "their share of the particles (docs/scaling.md). Under torchrun leave it at 1.")
    batch: int = option(128, help="Views per forward pass, the session reference and anchors included.")
    anchors: int = 8
    apix: float | None = option(None, help="Pixel size in Å, overriding the files' (for stacks whose header "
                                "has none).")
    poll_seconds: float | None = option(None, flags=("--poll",), help="Poll the directory every SECONDS instead "
                                        "of inotify (NFS, SMB, GPFS).")
    settle_seconds: float = option(1.0, flags=("--settle",), help="A file written in place is taken once "
                                   "unchanged for this many seconds.")
    flush_seconds: float = option(5.0, flags=("--flush",), help="Seconds after which a partial pass is run "
                                  "anyway (slow sessions still update).")
    publish_seconds: float = option(10.0, flags=("--publish-every",),
                                    help="Write and publish the map at least this often, in seconds...")
    publish_particles: int = option(2000, help="...or whenever this many particles were added.")
    republish_seconds: float = 5.0
    checkpoint_seconds: float = option(60.0, flags=("--checkpoint-every",),
                                       help="Seconds between checkpoints (also written at exit).")
    status_seconds: float = 1.0
    interpolation: str = option("nearest", help="Fourier insertion: nearest (fast) or trilinear.")
    weights: Path | None = option(None, help="Network weights (safetensors); default: the shipped weights.")
    queue_size: int = 4
    read_chunk: int = 512
    candidates: int = 64
    poses_from: str = option("network", help="network: the CryoFastAR network gives poses, refinement finishes "
                             "them; map-only: no network, a streaming ab initio by global search against the "
                             "running map; classes: once the 2D lane's classes have settled, the class averages "
                             "posed by common lines pose their particles, map-only ab initio if they prove "
                             "uninformative (docs/refinement.md).")
    class_weights: str = option("shipped", help=CLASS_WEIGHTS_HELP)
    refine: bool = option(True, flags=("--refine/--no-refine",), help="Refine poses against the running map once "
                          "it holds --refine-after particles, and re-pose older particles as it improves.")
    refine_after: int = option(1000, help="Particles the map must hold before refinement starts.")
    repose_per_pass: int = option(128, help="Particles already in the map re-posed after each refined pass "
                                  "(bounded work; 0: none).")
    refine_box: int = option(64, help="Working box in px for refinement (particles and maps Fourier-cropped to it).")
    probe_every: int = 8
    classify: bool = option(True, flags=("--classify/--no-classify",), help="Run the 2D lane: streaming 2D "
                            "classification beside the map, written in OUT/classes and published (docs/daemon.md).")
    classes_every: float = option(5.0, help="Write and publish the 2D classes at most this often, in seconds "
                                  "(when they changed).")
    exclude_junk: bool = option(True, flags=("--exclude-junk/--keep-junk",), help="Take the particles the 2D lane "
                                "judges junk out of the 3D map, and put them back if the classes change their "
                                "verdict (docs/daemon.md).")
    classification: ClassifySettings = field(default_factory=ClassifySettings)
    classify_queue: int = 8

    def __post_init__(self) -> None:
        if self.out is None:  # the default of --out
            self.out = self.watch / "cryofastar"

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) on impossible settings."""
        if not self.watch.is_dir():
            raise ValueError(f"--watch {self.watch}: not an existing directory")
        check_processes(self.nproc, self.device)
        if self.batch < 3:
            raise ValueError(f"--batch must be at least 3, got {self.batch}")
        if self.anchors < 0 or self.anchors > self.batch - 2:
            raise ValueError(f"--anchors must be between 0 and batch - 2 = {self.batch - 2}, got {self.anchors}")
        if self.apix is not None and not self.apix > 0:
            raise ValueError(f"--apix must be positive, got {self.apix}")
        if self.poll_seconds is not None and not self.poll_seconds > 0:
            raise ValueError(f"--poll must be positive, got {self.poll_seconds}")
        for name in ("settle_seconds", "flush_seconds", "publish_seconds", "republish_seconds",
                     "checkpoint_seconds", "status_seconds", "classes_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.interpolation not in ("nearest", "trilinear"):
            raise ValueError(f"--interpolation must be nearest or trilinear, got {self.interpolation!r}")
        check_pose_source(self.poses_from, self.refine, self.refine_box)
        if self.poses_from == "classes":
            if not self.classify:
                raise ValueError("--poses-from classes needs the 2D lane (its class averages are the views): drop "
                                 "--no-classify")
            if not self.refine:
                raise ValueError("--poses-from classes needs refinement (class poses come once the 2D classes "
                                 "have settled, and replace random poses): drop --no-refine")
            check_class_weights(self.class_weights)
        if self.refine_after < 2:
            raise ValueError(f"--refine-after must be at least 2 particles, got {self.refine_after}")
        if self.repose_per_pass < 0:
            raise ValueError(f"--repose-per-pass must be >= 0, got {self.repose_per_pass}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.classify_queue < 1:
            raise ValueError(f"classify_queue must be at least 1, got {self.classify_queue}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")

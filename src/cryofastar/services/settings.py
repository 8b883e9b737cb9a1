"""What the long-running commands can set beyond the daemon's own settings (each default and help once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryofastar.daemon.publisher import DEFAULT_ADDRESS
from cryofastar.monitoring.request_guard import RequestGuard
from cryofastar.options import negative_is_none, option

__all__ = ["DemoSettings", "ServiceSettings"]


@dataclass
class ServiceSettings:
    """What the service adds to the daemon's settings.

    Attributes
    ----------
    idle_exit: float | None
        Stop (cleanly) after this many seconds without new particles; ``None``: run until
        SIGINT/SIGTERM.
    dashboard_port: int | None
        Also serve the live web dashboard on this port (0: any free port); ``None``: none.
    dashboard_host: str
        Address the dashboard is served on.
    dashboard_allow_hosts, dashboard_allow_origins: tuple[str, ...]
        Host names the dashboard also answers to, and origins whose WebSockets it also
        accepts (``dashboard --allow-host`` / ``--allow-origin``; docs/monitoring.md).

    Raises
    ------
    ValueError
        ``idle_exit`` not positive, ``dashboard_port`` out of range, or an allowed host or
        origin malformed.
    """

    idle_exit: float | None = option(None, help="Exit (cleanly) after this many seconds without new particles; "
                                     "default: run until SIGINT/SIGTERM.")
    dashboard_port: int | None = option(None, help="Also serve the live web dashboard on this port (0: any free "
                                        "port); default: none.")
    dashboard_host: str = option("127.0.0.1", help="Address the dashboard is served on.")
    dashboard_allow_hosts: tuple[str, ...] = option((), flags=("--dashboard-allow-host",), cli_type=list[str],
                                                    parse=tuple, metavar="NAME",
                                                    help="The dashboard also answers to this host name (repeat "
                                                    "for more; * for any); others get 421 (DNS rebinding).")
    dashboard_allow_origins: tuple[str, ...] = option((), flags=("--dashboard-allow-origin",), cli_type=list[str],
                                                      parse=tuple, metavar="ORIGIN",
                                                      help="The dashboard also accepts WebSockets of pages from "
                                                      "this origin, e.g. https://proxy.example (repeat; * for any).")

    def __post_init__(self) -> None:
        if self.idle_exit is not None and not self.idle_exit > 0:
            raise ValueError(f"--idle-exit must be positive, got {self.idle_exit}")
        if self.dashboard_port is not None and not 0 <= self.dashboard_port <= 65535:
            raise ValueError(f"--dashboard-port must be 0..65535, got {self.dashboard_port}")
        # malformed names fail here, in the command's own words, not later in the dashboard's child process
        try:
            RequestGuard(self.dashboard_host, self.dashboard_allow_hosts, self.dashboard_allow_origins)
        except ValueError as exc:
            raise ValueError(str(exc).replace("--allow-", "--dashboard-allow-", 1)) from None


@dataclass
class DemoSettings:
    """The simulated session, the daemon's endpoints and how the demo shows itself.

    Attributes
    ----------
    out: Path | None
        Directory for the session (``OUT/session``) and the outputs (``OUT/cryofastar``);
        ``None``: a new temporary directory (kept).
    n, box, apix, snr, rate: int, int, float, float, float
        Particles, box (px), pixel size (Å), SNR and particles per second of the microscope.
    per_stack: int
        Particles per stack the microscope writes.
    seed: int
        Seed of molecule (from the evaluation range), poses and noise.
    device, zmq, metrics_port: str, str, int | None
        The daemon's device, ZeroMQ endpoint and metrics port (``None``: none).
    live: bool
        Live terminal table (else a line every 5 s).
    polish: float
        Seconds the daemon may go on refining after the last particle.
    dashboard_port: int | None
        Port of the live web dashboard (``None``: none).
    browser: bool | None
        Open the dashboard in a browser (``None``: when the machine has a display).
    classify: bool
        Run the daemon's 2D lane beside the map.

    Raises
    ------
    ValueError
        ``n``, ``rate`` or ``per_stack`` not positive, or ``polish`` negative.
    """

    out: Path | None = option(None, help="Directory for the simulated session and the outputs; default: a new "
                              "temporary directory (kept).")
    n: int = option(4000, flags=("--n",), help="Particles the simulated microscope writes.")
    box: int = option(96, help="Particle box in pixels (the network works on a 64 px Fourier crop).")
    apix: float = option(2.0, help="Pixel size in Å.")
    snr: float = option(0.5, help="Signal-to-noise ratio of the particles.")
    rate: float = option(100.0, help="Particles per second the microscope writes.")
    per_stack: int = 200
    seed: int = option(0, help="Seed: molecule (from the evaluation range, never trained on), poses, noise.")
    device: str = option("auto", help="auto, cpu or cuda.")
    zmq: str = option(DEFAULT_ADDRESS, help="ZeroMQ PUB endpoint the daemon publishes on.")
    metrics_port: int | None = option(9108, cli_type=int, parse=negative_is_none,
                                      help="Prometheus /metrics port (0: any free port; -1: none).")
    live: bool = option(True, flags=("--live/--no-live",), help="Live terminal table (--no-live: a line every 5 s).")
    polish: float = option(180.0, help="Seconds the daemon may go on refining after the last particle, until it "
                           "has converged.")
    dashboard_port: int | None = option(8080, cli_type=int, parse=negative_is_none, help="Port of the live web "
                                        "dashboard (a free one if taken; 0: any free port; -1: no dashboard).")
    browser: bool | None = option(None, flags=("--browser/--no-browser",), help="Open the dashboard in a web "
                                  "browser (default: when the machine has a display).")
    classify: bool = option(True, flags=("--classify/--no-classify",), help="Run the daemon's 2D lane (streaming "
                            "2D classes) beside the map; --no-classify: the map only.")

    def __post_init__(self) -> None:
        if self.n < 1 or self.rate <= 0 or self.per_stack < 1:
            raise ValueError("--n, --rate and --per-stack must be positive")
        if self.polish < 0:
            raise ValueError(f"--polish must be >= 0 seconds, got {self.polish}")

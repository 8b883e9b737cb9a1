"""What a daemon checks before it loads anything: its ports are free, it may open enough files.

A second daemon started on a port already in use, or under a file-descriptor limit too low
to run, fails here in milliseconds with one line naming the port or the limit and what to
do, instead of after loading its network and checkpoint (issue 20: it used to say nothing
for ~640 s). The checks bind nothing lasting; the real binds come later, in
:meth:`~cryofastar.daemon.pipeline.Daemon.start`, and raise the same errors should
someone take a port in between.

File descriptors: :func:`raise_descriptor_limit` lifts the soft ``RLIMIT_NOFILE`` to the
hard one, as a long-running service should (many distributions start processes with a
soft limit of 1024 and a far higher hard one); :func:`check_descriptors` refuses to run
under :data:`MIN_DESCRIPTORS`; :func:`descriptor_usage` and :func:`out_of_descriptors`
serve the warning the reader logs when it runs out later (docs/daemon.md, "Stopping,
crashing, restarting").
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket

from cryofastar.recon.io.errors import out_of_descriptors

from .publisher import AddressInUseError, probe_address
from .settings import DaemonSettings

logger = logging.getLogger(__name__)

__all__ = ["MIN_DESCRIPTORS", "check_descriptors", "check_settings", "descriptor_usage", "out_of_descriptors",
           "probe_port", "raise_descriptor_limit"]

MIN_DESCRIPTORS = 64
"""File descriptors a daemon needs at the least: ~16 open while idle (ZeroMQ, inotify, /metrics, logs), one
per file being read or written, one per subscriber or /metrics connection."""



def probe_port(host: str, port: int, what: str) -> None:
    """Raise :class:`AddressInUseError` if TCP ``host:port`` cannot be bound now (port 0: nothing to check).

    Bound the way the servers bind (``SO_REUSEADDR``, the family ``host`` resolves to), then
    released at once. ``what`` names the option in the message, e.g. ``--metrics-port``.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressInUseError(f"{what} {port}: cannot bind {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(
                    f"{what} {port}: port {port} on {host} is already in use (another cryofastar-stream daemon?); "
                    f"stop it, or pass {what} with a free port (0 picks one)") from None
            raise AddressInUseError(f"{what} {port}: cannot bind {host}:{port} ({exc.strerror})") from None


def check_settings(settings: DaemonSettings) -> None:
    """Fail now if the session cannot run: too few file descriptors, the ZeroMQ or /metrics port in use.

    Raises
    ------
    OSError
        :class:`~cryofastar.daemon.publisher.AddressInUseError` naming the port and the
        option to change, or one line naming the descriptor limit.
    """
    check_descriptors()
    try:
        probe_address(settings.zmq)
    except AddressInUseError:
        port = settings.zmq.rsplit(":", 1)[-1]
        raise AddressInUseError(
            f"--zmq {settings.zmq}: port {port} is already in use (another cryofastar-stream daemon?); stop it, or "
            "pass --zmq with a free port (tcp://127.0.0.1:0 picks one)") from None
    if settings.metrics_port is not None:
        probe_port(settings.metrics_host, settings.metrics_port, "--metrics-port")


def descriptor_usage() -> tuple[int | None, int]:
    """``(open, soft limit)`` file descriptors of this process (``open`` is ``None`` where /proc is not there)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        opened: int | None = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir held
    except OSError:
        opened = None
    return opened, soft


def check_descriptors(minimum: int = MIN_DESCRIPTORS) -> None:
    """Raise OSError (one line) if this process may open fewer than ``minimum`` file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < minimum:
        raise OSError(f"this process may open only {soft} files (ulimit -n {soft}, hard limit "
                      f"{'unlimited' if hard == resource.RLIM_INFINITY else hard}); the daemon needs at least "
                      f"{minimum}: raise it (ulimit -n 4096) and start again")


def raise_descriptor_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit (what a service may do for itself); return the new soft one.

    Left as it is where the system refuses (logged).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.info("file-descriptor limit left at %d (%s)", soft, exc)
        return soft
    logger.info("file-descriptor limit raised from %d to the hard limit %s", soft, hard)
    return hard

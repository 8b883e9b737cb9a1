"""Hostile and slow clients against a running daemon and its dashboard (issue 20, item 3).

A campaign script, not a timed test (a fast subset runs in tests/test_hostile_clients.py).
It starts the real console script, ``cryofastar-stream watch DIR --dashboard-port 0
--metrics-port 0 --zmq tcp://127.0.0.1:0 --no-refine``, in a subprocess (its soft
file-descriptor limit set to ``--nofile``, 1,024 by default as on a default Linux login;
the daemon may raise its own), feeds it simulated stacks (hard links of a pool, each under
a new name, keeping ``--backlog`` particles queued) and tries, from this process:

1. **binds**: every listening socket of the daemon and of its dashboard (from
   ``/proc/PID/fd`` and ``/proc/net/tcp*``) is on 127.0.0.1;
2. **host/origin**: requests naming another host (DNS rebinding) get 421, WebSocket
   upgrades from another site's page 403, the dashboard's own names and origin 200/101;
3. **malformed HTTP** to the dashboard and to ``/metrics``: garbage bytes, a 100 kB
   request line, 100 kB and 2,000 headers, bad methods, HTTP/0.9, HTTP/2.0 spoken as
   text, no Host, two Hosts, NUL and non-UTF-8 bytes: each refused (4xx or closed, never
   a 2xx or 500), and the server still answers a normal request after each;
4. **path traversal** in static URLs (plain, ``%2e%2e%2f``, double-encoded, overlong
   UTF-8, backslashes, absolute paths, NUL, a symlink planted in the assets folder
   before the start that points at a secret file): no answer holds anything but an
   asset's exact bytes; the secret's random token, ``/etc/passwd`` and the package's
   Python source never appear;
5. **WebSocket handshakes and frames**: malformed upgrades (no key, a bad key, version
   8, no Upgrade, POST, HTTP/1.0) get no 101; frames claiming 2^63 bytes, 1 MiB frames,
   64 KiB+ fragmented messages, unmasked frames, reserved opcodes and oversized control
   frames close that socket only (RSS of the dashboard before/after);
6. **thousands of connections**: ``--connections`` idle TCP connections each to the
   dashboard, to ``/metrics`` and to the ZeroMQ port, held for a rate window: threads and
   fds of the daemon and dashboard (max over the window), a normal scrape, page and
   WebSocket still served (and how long they took), and the particle rate;
7. **never-reading clients**: ``--stalled`` WebSockets (4 KiB receive buffer, never read)
   and ``--stalled`` ZeroMQ subscribers to every topic (RCVHWM 1, never receive) for a
   rate window: the daemon's rate and RSS, the dashboard's RSS, whether the server closed
   the stalled pages, and whether a normal page still gets its updates;
8. **rate**: particles/s (``cryofastar_particles_accumulated_total``) in a baseline
   window before and after, beside the flood and stalled windows.

    python bench/hostile_clients.py --quick                         # smoke: 300 connections, 10 s windows
    nice -n 10 python bench/hostile_clients.py                      # the campaign: 2,000 connections, 60 s windows

Figures print as they come and go to ``bench/results/hostile_clients.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import resource
import secrets
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"
RESULTS = Path(__file__).parent / "results"
STATIC = Path(__file__).resolve().parents[1] / "monitoring" / "static"


# ---------------------------------------------------------------------------- results
@dataclass
class Check:
    """One thing tried: its name, whether it held, and what was measured."""

    group: str
    name: str
    passed: bool
    detail: dict = field(default_factory=dict)


class Report:
    """Checks and figures, printed as they come."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.figures: dict[str, object] = {}

    def add(self, group: str, name: str, passed: bool, **detail: object) -> Check:
        check = Check(group, name, bool(passed), detail)
        self.checks.append(check)
        shown = ", ".join(f"{k}={v}" for k, v in detail.items())
        print(f"  [{'pass' if passed else 'FAIL'}] {group}: {name}" + (f"  ({shown})" if shown else ""), flush=True)
        return check

    def figure(self, name: str, value: object) -> None:
        self.figures[name] = value
        print(f"  {name}: {value}", flush=True)

    def summary(self) -> dict:
        groups: dict[str, list[int]] = {}
        for c in self.checks:
            groups.setdefault(c.group, [0, 0])[0 if c.passed else 1] += 1
        return {"passed": sum(c.passed for c in self.checks), "failed": sum(not c.passed for c in self.checks),
                "groups": {g: {"passed": p, "failed": f} for g, (p, f) in groups.items()}}


# ---------------------------------------------------------------------------- processes
def proc_figures(pid: int) -> dict[str, int]:
    """Threads, open fds and RSS (bytes) of process ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"threads": len(os.listdir(f"/proc/{pid}/task")), "fds": len(os.listdir(f"/proc/{pid}/fd")), "rss": rss}


def nofile_limit(pid: int) -> int:
    """The soft 'Max open files' of process ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return -1


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def connections_by_port(pid: int) -> dict[int, int]:
    """Local port -> TCP connections (not listeners) process ``pid`` holds open on it."""
    inodes, counts = _socket_inodes(pid), {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" and parts[9] in inodes:
                port = int(parts[1].split(":")[1], 16)
                counts[port] = counts.get(port, 0) + 1
    return counts


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (/proc/PID/fd + /proc/net/tcp, tcp6)."""
    inodes = _socket_inodes(pid)
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = parts[1].split(":")
            raw = bytes.fromhex(address)
            if width == 4:
                text = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.append((text, int(port, 16)))
    return found


class Target:
    """The daemon (``cryofastar-stream watch``) with its dashboard, in subprocesses.

    Attributes: ``pid``, ``dashboard_pid``, ``metrics_url``, ``dashboard_url``, ``zmq``;
    ``host``, ``dashboard_port``, ``metrics_port``, ``zmq_port``.
    """

    def __init__(self, root: Path, nofile: int = 1024, extra: tuple[str, ...] = (), timeout: float = 300) -> None:
        self.watch, self.out = root / "watch", root / "out"
        self.watch.mkdir(parents=True, exist_ok=True)
        soft = min(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        command = [str(SCRIPT), "watch", str(self.watch), "--out", str(self.out), "--metrics-port", "0",
                   "--zmq", "tcp://127.0.0.1:0", "--dashboard-port", "0", "--device", "cpu", "--settle", "0.2",
                   "--flush", "1", "--no-refine", *extra]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        self.pid = self.process.pid
        self.lines: list[str] = []
        self.metrics_url = self.dashboard_url = self.zmq = ""
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not (self.metrics_url and self.dashboard_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the daemon did not start:\n" + "".join(self.lines[-30:]))
            time.sleep(0.1)
        self.host, port = re.match(r"http://([\d.]+):(\d+)", self.dashboard_url).groups()
        self.dashboard_port = int(port)
        self.metrics_port = int(re.match(r"http://[\d.]+:(\d+)", self.metrics_url).group(1))
        self.zmq_port = int(self.zmq.rsplit(":", 1)[1])
        self.dashboard_pid = self._child()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if m := re.search(r"ZeroMQ (tcp://\S+?);", line):
                self.zmq = self.zmq or m.group(1)
            if m := re.search(r"metrics (http://\S+)", line):
                self.metrics_url = self.metrics_url or m.group(1)
            if m := re.match(r"dashboard (http://\S+)", line):
                self.dashboard_url = self.dashboard_url or m.group(1)

    def _child(self) -> int:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid and b"dashboard" in Path(
                            f"/proc/{entry}/cmdline").read_bytes():
                        return int(entry)
        raise RuntimeError("the dashboard process was not found")

    def counter(self, name: str = "cryofastar_particles_accumulated_total") -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def alive(self) -> bool:
        return self.process.poll() is None and Path(f"/proc/{self.dashboard_pid}").exists()

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 120 s); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        self.process.stdout.close()
        return self.process.returncode


class Feeder:
    """Hard-links pool stacks into the watched directory under new names, keeping ``backlog`` particles queued."""

    def __init__(self, pool: list[Path], watch: Path, per_stack: int, backlog: int, target: Target) -> None:
        self.pool, self.watch, self.per_stack, self.backlog, self.target = pool, watch, per_stack, backlog, target
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                done = self.target.counter()
            except (OSError, KeyError):
                done = 0.0
            while self.written - done < self.backlog and not self._stop.is_set():
                name = f"stack_{n:06d}.mrcs"
                os.link(self.pool[n % len(self.pool)], self.watch / f".{name}.part")
                os.replace(self.watch / f".{name}.part", self.watch / name)
                n += 1
                self.written += self.per_stack
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def simulate_pool(root: Path, stacks: int, per_stack: int, box: int) -> list[Path]:
    """Simulated stacks (box ``box``, 3 Å/px, SNR 1) in ``root/pool``, outside the watched directory."""
    result = subprocess.run([str(SCRIPT), "simulate", "--out", str(root / "pool"), "--n", str(stacks * per_stack),
                             "--box", str(box), "--apix", "3.0", "--snr", "1", "--per-stack", str(per_stack)],
                            capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"simulate failed: {result.stderr}")
    return sorted((root / "pool").glob("particles_*.mrcs"))


# ---------------------------------------------------------------------------- raw clients
@dataclass
class Answer:
    """What a raw request got back."""

    status: int | None  # None: no HTTP status line (closed, or not HTTP)
    head: bytes
    body: bytes
    closed: bool  # the server closed the connection (else: timed out)
    seconds: float


def raw(host: str, port: int, payload: bytes, timeout: float = 5.0, limit: int = 8 << 20) -> Answer:
    """Send ``payload`` on a fresh connection and read the answer until the server closes (or ``timeout``)."""
    t0 = time.monotonic()
    data, closed = b"", False
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        sock.settimeout(0.2)
        deadline = t0 + timeout
        while time.monotonic() < deadline and len(data) < limit:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if _complete(data):
                    break
                continue
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return Answer(int(match.group(1)) if match else None, head, body, closed, time.monotonic() - t0)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(sep) and match is not None and len(body) >= int(match.group(1))


def get(host: str, port: int, path: str, host_header: str | None = None, extra: str = "",
        timeout: float = 10.0) -> Answer:
    """``GET path`` with ``Host: host_header`` (default ``host:port``)."""
    host_header = f"{host}:{port}" if host_header is None else host_header
    return raw(host, port, f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}Connection: close\r\n\r\n".encode(),
               timeout)


def ws_request(host_header: str, origin: str | None = None, key: str | None = None, version: str = "13",
               method: str = "GET", http: str = "HTTP/1.1", upgrade: bool = True) -> bytes:
    """A WebSocket upgrade request for ``/ws``."""
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    lines = [f"{method} /ws {http}", f"Host: {host_header}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.append(f"Sec-WebSocket-Version: {version}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_open(host: str, port: int, origin: str | None = None, rcvbuf: int | None = None,
            timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A WebSocket handshake; returns the socket and what came after the 101 head. Raises if not 101."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, port))
    sock.sendall(ws_request(f"{host}:{port}", origin))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"no WebSocket: {head[:80]!r}")
    return sock, rest


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bool = True, claimed: int | None = None) -> bytes:
    """One client frame (masked unless ``mask`` is False); ``claimed`` overrides the length field."""
    length = len(payload) if claimed is None else claimed
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", length)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read_until_close(sock: socket.socket, timeout: float) -> tuple[bool, int | None, int]:
    """Read frames until the server closes: (closed, close code if a close frame came, bytes read)."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except OSError:
            return True, _close_code(data), len(data)
        if not chunk:
            return True, _close_code(data), len(data)
        data += chunk
    return False, _close_code(data), len(data)


def _close_code(data: bytes) -> int | None:
    """The code of the first close frame in a server's byte stream (unmasked frames)."""
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        j = i + 2
        if length == 126:
            length, j = struct.unpack(">H", data[j:j + 2])[0], j + 2
        elif length == 127:
            length, j = struct.unpack(">Q", data[j:j + 8])[0], j + 8
        if opcode == 8:
            return struct.unpack(">H", data[j:j + 2])[0] if length >= 2 and len(data) >= j + 2 else None
        i = j + length
    return None


def ws_first_message(host: str, port: int, timeout: float = 10.0) -> tuple[bool, float]:
    """Open a WebSocket as a page would and wait for its first message (the snapshot): (ok, seconds)."""
    t0 = time.monotonic()
    try:
        sock, rest = ws_open(host, port, origin=f"http://{host}:{port}", timeout=timeout)
    except OSError:
        return False, time.monotonic() - t0
    with sock:
        data = rest
        while len(data) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                return False, time.monotonic() - t0
            data += chunk
        return data[0] & 0x0F == 1, time.monotonic() - t0


def open_idle(host: str, port: int, n: int, wait: float = 15.0) -> tuple[list[socket.socket], int]:
    """``n`` TCP connections that never send a byte: the sockets and how many were established."""
    socks, selector = [], selectors.DefaultSelector()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        socks.append(s)
        selector.register(s, selectors.EVENT_WRITE)
    established, pending, deadline = 0, len(socks), time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            selector.unregister(key.fileobj)
            pending -= 1
            established += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    selector.close()
    return socks, established


def scrape(url: str, timeout: float = 10.0) -> tuple[bool, float]:
    """A normal scrape: (answered 200 with cryofastar_ metrics, seconds)."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200 and b"cryofastar_particles_in_map" in response.read()
    except OSError:
        ok = False
    return ok, time.monotonic() - t0


# ---------------------------------------------------------------------------- probes
def probe_binds(report: Report, target: Target) -> None:
    """Every listening socket of the daemon and its dashboard is on loopback."""
    for name, pid in (("daemon", target.pid), ("dashboard", target.dashboard_pid)):
        sockets = listening_sockets(pid)
        report.add("binds", f"{name} listens on 127.0.0.1 only", bool(sockets) and all(
            a in ("127.0.0.1", "::1") for a, _ in sockets), sockets=sockets)


def probe_host_origin(report: Report, target: Target) -> None:
    """DNS rebinding (another Host) gets 421, a cross-site WebSocket 403; the dashboard's own names work."""
    h, p = target.host, target.dashboard_port
    for host_header, path, expected in ((f"{h}:{p}", "/", 200), (f"localhost:{p}", "/", 200),
                                        (f"[::1]:{p}", "/api/state", 200), ("evil.example", "/", 421),
                                        (f"evil.example:{p}", "/api/state", 421),
                                        (f"evil.example:{p}", "/static/plotly.min.js", 421),
                                        (f"127.0.0.1.evil.example:{p}", "/", 421),
                                        (f"localhost.:{p}", "/", 200)):
        answer = get(h, p, path, host_header)
        report.add("host/origin", f"GET {path} Host: {host_header} -> {expected}", answer.status == expected,
                   status=answer.status, body=answer.body[:60].decode("latin-1") if answer.status == 421 else "")
    for name, payload in (("no Host (HTTP/1.0)", b"GET /api/state HTTP/1.0\r\n\r\n"),
                          ("two Hosts", f"GET /api/state HTTP/1.1\r\nHost: {h}:{p}\r\nHost: evil.example\r\n"
                                        "Connection: close\r\n\r\n".encode())):
        answer = raw(h, p, payload)
        report.add("host/origin", f"{name} -> 400", answer.status == 400, status=answer.status)
    for origin, host_header, expected in ((None, f"{h}:{p}", 101), (f"http://{h}:{p}", f"{h}:{p}", 101),
                                          ("http://evil.example", f"{h}:{p}", 403),
                                          (f"http://{h}:{p + 1}", f"{h}:{p}", 403),
                                          (f"https://{h}:{p}", f"{h}:{p}", 403), ("null", f"{h}:{p}", 403),
                                          (f"http://evil.example:{p}", f"evil.example:{p}", 421)):
        answer = raw(h, p, ws_request(host_header, origin), timeout=3)
        report.add("host/origin", f"WebSocket Origin: {origin} Host: {host_header} -> {expected}",
                   answer.status == expected, status=answer.status)


def _healthy(target: Target, which: str) -> bool:
    if which == "metrics":
        return scrape(target.metrics_url)[0]
    return get(target.host, target.dashboard_port, "/api/state").status == 200


def malformed_requests(host_header: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of malformed HTTP requests."""
    return [
        ("garbage bytes", os.urandom(4096)),
        ("garbage ending in a blank line", bytes(range(256)) * 4 + b"\r\n\r\n"),
        ("NUL bytes", b"\x00" * 10000),
        ("TLS client hello", bytes.fromhex("16030100a5010000a103030000000000000000000000000000000000000000000000000"
                                           "000000000000000")),
        ("100 kB request line", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: " + host_header.encode()
         + b"\r\n\r\n"),
        ("100 kB header", b"GET / HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\nX-Big: " + b"b" * 100_000
         + b"\r\n\r\n"),
        ("2,000 headers", b"GET / HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\n"
         + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n"),
        ("bad method", b"BREW / HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\n\r\n"),
        ("DELETE", b"DELETE / HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\nConnection: close\r\n\r\n"),
        ("HTTP/0.9", b"GET /\r\n"),
        ("HTTP/0.9 then silence", b"GET /metrics\r\n\r\n"),
        ("HTTP/2.0 as text", b"GET / HTTP/2.0\r\nHost: " + host_header.encode() + b"\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("HTTP/9.9", b"GET / HTTP/9.9\r\nHost: " + host_header.encode() + b"\r\n\r\n"),
        ("NUL in request line", b"GET /\x00 HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\n\r\n"),
        ("non-UTF-8 path", b"GET /\xff\xfe HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\n\r\n"),
        ("header without colon", b"GET / HTTP/1.1\r\nHost: " + host_header.encode() + b"\r\nno colon here\r\n\r\n"),
        ("bare LF and CR", b"GET / HTTP/1.1\rHost: x\n\r\n\r"),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: " + host_header.encode()
         + b"\r\nContent-Length: -1\r\n\r\n"),
        ("huge Content-Length", b"POST / HTTP/1.1\r\nHost: " + host_header.encode()
         + b"\r\nContent-Length: 99999999999999999999\r\n\r\n"),
        ("bad chunked body", b"POST / HTTP/1.1\r\nHost: " + host_header.encode()
         + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ]


def probe_malformed(report: Report, target: Target, timeout: float = 8.0) -> None:
    """Each malformed request is refused (a 4xx, or no answer within ``timeout`` s) and the server answers a
    normal one after it."""
    for which, port in (("dashboard", target.dashboard_port), ("metrics", target.metrics_port)):
        for name, payload in malformed_requests(f"{target.host}:{port}"):
            answer = raw(target.host, port, payload, timeout=timeout)
            refused = answer.status is None or 400 <= answer.status < 500 or answer.status in (501, 505)
            healthy = _healthy(target, which)
            report.add("malformed HTTP", f"{which}: {name}", refused and healthy and target.alive(),
                       status=answer.status, closed=answer.closed, seconds=round(answer.seconds, 2),
                       healthy_after=healthy)


TRAVERSALS = [
    "/static/../dashboard_server.py", "/static/../../pyproject.toml", "/static/../../../../../../../../etc/passwd",
    "/static/%2e%2e/dashboard_server.py", "/static/%2e%2e%2fdashboard_server.py",
    "/static/%2E%2E%2F%2E%2E%2Fpyproject.toml",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/%252e%252e%252fdashboard_server.py", "/static/%252e%252e/%252e%252e/pyproject.toml",
    "/static/..%2fdashboard_server.py", "/static/.%2e/dashboard_server.py", "/static/%c0%ae%c0%ae/dashboard_server.py",
    "/static/..%5cdashboard_server.py", "/static/..\\dashboard_server.py", "/static/..\\..\\pyproject.toml",
    "/static//etc/passwd", "//etc/passwd", "/static/%2fetc%2fpasswd", "/static/%2Fetc/passwd",
    "/static/file:///etc/passwd", "/static/index.html%00.js", "/static/index.html%00", "/static/%00",
    "/../../../../etc/passwd", "/api/../../../../etc/passwd", "/ws/../../../../etc/passwd",
    "/static/./index.html", "/static/dashboard.js/../../dashboard_server.py", "/static/.", "/static/..",
    "/static/", "/static", "/%2e%2e/%2e%2e/pyproject.toml", "/.git/config", "/static/.git/config",
]


def probe_traversal(report: Report, target: Target, secret: Path, token: str, planted: list[str]) -> None:
    """No URL returns anything but an asset's exact bytes; the secret, /etc/passwd and source never leak."""
    assets = {p.read_bytes() for p in STATIC.iterdir() if p.is_file() and not p.is_symlink()}
    sources = [b'"""The live dashboard', b"from __future__ import", b"[project]", b"root:x:0:0", b"[core]"]
    urls = TRAVERSALS + [f"/static/{secret}", f"/static/{str(secret).replace('/', '%2f')}",
                         f"/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e{secret}",
                         *(f"/static/{name}" for name in planted)]
    for url in urls:
        answer = get(target.host, target.dashboard_port, url, timeout=8)
        body = answer.body
        leaked = token.encode() in body or any(marker in body for marker in sources)
        only_assets = answer.status != 200 or body in assets or len(body) > 1_000_000  # plotly.min.js
        report.add("path traversal", url, not leaked and only_assets, status=answer.status, bytes=len(body))


def probe_websocket(report: Report, target: Target, wait_ignored: float = 5.0) -> None:
    """Malformed upgrades get no 101; hostile frames close only their own socket; the server stays up."""
    h, p = target.host, target.dashboard_port
    hh = f"{h}:{p}"
    for name, payload in (("no key", ws_request(hh, key="")), ("bad key", ws_request(hh, key="short")),
                          ("version 8", ws_request(hh, version="8")), ("no Upgrade", ws_request(hh, upgrade=False)),
                          ("POST", ws_request(hh, method="POST")), ("HTTP/1.0", ws_request(hh, http="HTTP/1.0")),
                          ("version junk", ws_request(hh, version="13, 99999999999999999999"))):
        answer = raw(h, p, payload, timeout=5)
        report.add("websocket handshake", name, answer.status is not None and answer.status != 101
                   and _healthy(target, "dashboard"), status=answer.status)
    frames = {  # name: (bytes, must the server close the socket?)
        "a frame claiming 2^63-1 bytes": (ws_frame(b"x" * 1000, claimed=(1 << 63) - 1), True),
        "a frame claiming 1 GiB": (ws_frame(b"x" * 1000, claimed=1 << 30), True),
        "a 1 MiB text frame": (ws_frame(b"x" * (1 << 20)), True),
        "fragments adding to 256 KiB": (b"".join(ws_frame(b"y" * 16384, opcode=1 if i == 0 else 0, fin=False)
                                                 for i in range(16)), True),
        "a reserved opcode": (ws_frame(b"hello", opcode=3), True),
        "a 200-byte ping": (ws_frame(b"p" * 200, opcode=9), True),
        "a continuation first": (ws_frame(b"hello", opcode=0), True),
        "invalid UTF-8 text": (ws_frame(b"\xff\xfe\xfd"), True),
        "a close with a bad code": (ws_frame(struct.pack(">H", 999), opcode=8), True),
        # aiohttp does not insist on masked client frames (RFC 6455 says a server MUST close): the text is read
        # and discarded like any message of a page; held if the socket is closed or left a working page
        "an unmasked frame (closed or ignored)": (ws_frame(b"hello", mask=False), False),
    }
    rss = proc_figures(target.dashboard_pid)["rss"]
    for name, (data, must_close) in frames.items():
        try:
            sock, _ = ws_open(h, p)
        except OSError as exc:
            report.add("websocket frames", name, False, error=str(exc))
            continue
        with sock:
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                sock.sendall(data)
            closed, code, _ = ws_read_until_close(sock, 15 if must_close else wait_ignored)
        report.add("websocket frames", name, (closed or not must_close) and _healthy(target, "dashboard"),
                   closed=closed, close_code=code, seconds=round(time.monotonic() - t0, 2))
    grown = proc_figures(target.dashboard_pid)["rss"] - rss
    report.add("websocket frames", "dashboard RSS after the hostile frames < +50 MB", grown < 50e6,
               rss_growth_mb=round(grown / 1e6, 1))


# ---------------------------------------------------------------------------- load windows
class Sampler:
    """Samples threads/fds/RSS of the daemon and dashboard every 0.5 s in a thread; max and last kept."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.samples: list[dict[str, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append({"daemon": proc_figures(self.target.pid),
                                     "dashboard": proc_figures(self.target.dashboard_pid)})
            self._stop.wait(0.5)

    def stop(self) -> dict[str, dict[str, int]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return {who: {key: max(s[who][key] for s in self.samples) for key in ("threads", "fds", "rss")}
                for who in ("daemon", "dashboard")}


def rate_window(target: Target, seconds: float) -> float:
    """Particles accumulated per second over ``seconds``."""
    start, t0 = target.counter(), time.monotonic()
    time.sleep(seconds)
    return (target.counter() - start) / (time.monotonic() - t0)


def window_flood(report: Report, target: Target, connections: int, seconds: float, baseline: dict) -> float:
    """``connections`` idle connections each to the dashboard, /metrics and ZeroMQ, held for ``seconds``
    (at least 35 s: ZeroMQ drops a connection that has not finished its handshake after 30 s)."""
    seconds = max(seconds, 35.0)
    sampler = Sampler(target)
    held, established = {}, {}
    for which, port in (("dashboard", target.dashboard_port), ("metrics", target.metrics_port),
                        ("zmq", target.zmq_port)):
        held[which], established[which] = open_idle(target.host, port, connections)
    report.figure("flood: connections established (dashboard, metrics, zmq)",
                  [established["dashboard"], established["metrics"], established["zmq"]])
    time.sleep(2)
    held_early = {**connections_by_port(target.pid), **connections_by_port(target.dashboard_pid)}
    scrape_ok, scrape_s = scrape(target.metrics_url)
    page = get(target.host, target.dashboard_port, "/")
    ws_ok, ws_s = ws_first_message(target.host, target.dashboard_port)
    rate = rate_window(target, seconds)
    held_late = {**connections_by_port(target.pid), **connections_by_port(target.dashboard_pid)}
    peak = sampler.stop()
    ports = {"dashboard": target.dashboard_port, "metrics": target.metrics_port, "zmq": target.zmq_port}
    report.figure("flood: connections the servers held 2 s in / at the end",
                  {w: [held_early.get(port, 0), held_late.get(port, 0)] for w, port in ports.items()})
    report.add("connections", "/metrics holds at most 64 connections", max(
        held_early.get(target.metrics_port, 0), held_late.get(target.metrics_port, 0)) <= 64,
        early=held_early.get(target.metrics_port, 0), late=held_late.get(target.metrics_port, 0))
    report.add("connections", "the dashboard holds at most 256 connections + 1 page", max(
        held_early.get(target.dashboard_port, 0), held_late.get(target.dashboard_port, 0)) <= 257,
        early=held_early.get(target.dashboard_port, 0), late=held_late.get(target.dashboard_port, 0))
    report.add("connections", "ZeroMQ drops idle connections that never handshake (30 s)",
               held_late.get(target.zmq_port, 0) < max(1, held_early.get(target.zmq_port, 0)) / 10,
               early=held_early.get(target.zmq_port, 0), late=held_late.get(target.zmq_port, 0))
    for socks in held.values():
        for s in socks:
            s.close()
    report.figure("flood: peak threads/fds/RSS MB", {w: [v["threads"], v["fds"], round(v["rss"] / 1e6)]
                                                      for w, v in peak.items()})
    report.add("connections", f"{connections} idle connections: a scrape is answered", scrape_ok,
               seconds=round(scrape_s, 3))
    report.add("connections", f"{connections} idle connections: the page loads", page.status == 200,
               status=page.status, seconds=round(page.seconds, 3))
    report.add("connections", f"{connections} idle connections: a WebSocket gets its snapshot", ws_ok,
               seconds=round(ws_s, 3))
    daemon_threads = peak["daemon"]["threads"] - baseline["daemon"]["threads"]
    report.add("connections", "daemon threads grow by at most 4", daemon_threads <= 4,
               before=baseline["daemon"]["threads"], peak=peak["daemon"]["threads"])
    report.add("connections", "dashboard threads grow by at most 4",
               peak["dashboard"]["threads"] - baseline["dashboard"]["threads"] <= 4,
               before=baseline["dashboard"]["threads"], peak=peak["dashboard"]["threads"])
    report.add("connections", "dashboard fds bounded: peak - before <= 256 + a few",
               peak["dashboard"]["fds"] - baseline["dashboard"]["fds"] <= 256 + 8,
               before=baseline["dashboard"]["fds"], peak=peak["dashboard"]["fds"])
    return rate


def window_stalled(report: Report, target: Target, stalled: int, seconds: float) -> tuple[float, dict]:
    """``stalled`` never-reading WebSockets and ZeroMQ subscribers for ``seconds`` (at least 45 s: a page that
    takes nothing for 30 s is cut); a normal page beside them. Returns the rate and the peak figures."""
    import zmq

    seconds = max(seconds, 45.0)
    port = target.dashboard_port
    before = connections_by_port(target.dashboard_pid).get(port, 0)
    t_start = time.monotonic()
    pages = [ws_open(target.host, port, rcvbuf=4096)[0] for _ in range(stalled)]
    context = zmq.Context()
    subscribers = []
    for _ in range(stalled):
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.RCVBUF, 4096)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic, poses included
        sub.connect(target.zmq)
        subscribers.append(sub)
    watcher, _ = ws_open(target.host, target.dashboard_port)  # a normal page that reads
    received = []

    def read_normal() -> None:
        watcher.settimeout(1.0)
        end = time.monotonic() + seconds + 5
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                chunk = watcher.recv(1 << 20)
                if not chunk:
                    return
                received.append((time.monotonic(), len(chunk)))

    reader = threading.Thread(target=read_normal, daemon=True)
    reader.start()
    sampler = Sampler(target)
    rate = rate_window(target, seconds)
    peak = sampler.stop()
    reader.join(timeout=seconds + 10)
    # cut pages, seen from the server (reading them here would unblock them): its connections on the port,
    # less the reading page; the kernel's send buffer (~4 MB) fills before the 30 s without progress start
    deadline = t_start + 180
    while (left := connections_by_port(target.dashboard_pid).get(port, 0) - before - 1) > 0 and (
            time.monotonic() < deadline):
        time.sleep(1)
    cut, cut_after = stalled - max(left, 0), time.monotonic() - t_start
    for sock in pages:
        sock.close()
    for sub in subscribers:
        sub.close()
    context.term()
    watcher.close()
    gaps = [b[0] - a[0] for a, b in zip(received, received[1:], strict=False)]
    report.add("stalled clients", "a normal page kept getting updates (no gap > 3 s)", bool(gaps) and max(gaps) <= 3,
               bytes=sum(n for _, n in received), longest_gap_s=round(max(gaps, default=float("inf")), 2))
    report.add("stalled clients", "the server cut every never-reading page (within 180 s)",
               cut == stalled, cut=cut, stalled=stalled, all_cut_after_s=round(cut_after, 1))
    return rate, peak


# ---------------------------------------------------------------------------- main
def plant_symlinks(secret: Path) -> list[str]:
    """Symlinks in the assets folder to the secret and /etc/passwd (removed by :func:`remove_planted`)."""
    names = []
    for name, target in ((f".hostile-{os.getpid()}-secret.txt", secret), (f"hostile-{os.getpid()}-passwd.txt",
                                                                        Path("/etc/passwd"))):
        os.symlink(target, STATIC / name)
        names.append(name)
    return names


def remove_planted(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (STATIC / name).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="Idle connections to each server.")
    parser.add_argument("--stalled", type=int, default=8, help="Never-reading WebSockets and ZeroMQ subscribers.")
    parser.add_argument("--window", type=float, default=60.0, help="Seconds of each rate window.")
    parser.add_argument("--nofile", type=int, default=1024, help="Soft fd limit the daemon starts with.")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--per-stack", type=int, default=200)
    parser.add_argument("--pool-stacks", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=2000, help="Particles kept queued for the daemon.")
    parser.add_argument("--quick", action="store_true", help="Smoke size: 300 connections, 10 s windows.")
    parser.add_argument("--json", type=Path, default=RESULTS / "hostile_clients.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.window, args.stalled = min(args.connections, 300), min(args.window, 10.0), 4
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 3 * args.connections + 1000)), hard))
    report = Report()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        root = Path(tmp)
        print(f"simulating {args.pool_stacks} stacks of {args.per_stack} (box {args.box})...", flush=True)
        pool = simulate_pool(root, args.pool_stacks, args.per_stack, args.box)
        token = secrets.token_hex(16)
        secret = root / "secret.txt"
        secret.write_text(f"SECRET {token}\n")
        planted = plant_symlinks(secret)
        try:
            target = Target(root, nofile=args.nofile)
        except BaseException:
            remove_planted(planted)
            raise
        feeder = None
        try:
            report.figure("daemon pid / dashboard pid", [target.pid, target.dashboard_pid])
            report.figure("soft fd limit: daemon / dashboard", [nofile_limit(target.pid),
                                                                nofile_limit(target.dashboard_pid)])
            print("== binds, Host/Origin, malformed requests, traversal, WebSocket", flush=True)
            probe_binds(report, target)
            probe_host_origin(report, target)
            probe_traversal(report, target, secret, token, planted)
            remove_planted(planted)
            probe_malformed(report, target)
            probe_websocket(report, target)
            print("== load windows (particle rate)", flush=True)
            feeder = Feeder(pool, target.watch, args.per_stack, args.backlog, target)
            deadline = time.monotonic() + 300
            while target.counter() < args.backlog and time.monotonic() < deadline:
                time.sleep(1)
            rate_window(target, args.window)  # warm-up
            baseline = {"daemon": proc_figures(target.pid), "dashboard": proc_figures(target.dashboard_pid)}
            report.figure("idle threads/fds/RSS MB", {w: [v["threads"], v["fds"], round(v["rss"] / 1e6)]
                                                     for w, v in baseline.items()})
            rates: dict[str, float] = {}
            peaks: dict[str, dict] = {}

            def quiet(name: str) -> None:
                sampler = Sampler(target)
                rates[name] = rate_window(target, args.window)
                peaks[name] = sampler.stop()
                report.figure(f"rate: {name} (particles/s)", round(rates[name], 1))

            quiet("baseline 1")
            rates["flood"] = window_flood(report, target, args.connections, args.window, baseline)
            report.figure("rate: flood", round(rates["flood"], 1))
            time.sleep(2)
            quiet("baseline 2")
            rates["stalled"], peaks["stalled"] = window_stalled(report, target, args.stalled, args.window)
            report.figure("rate: stalled", round(rates["stalled"], 1))
            quiet("baseline 3")
            for window, around in (("flood", ("baseline 1", "baseline 2")), ("stalled", ("baseline 2", "baseline 3"))):
                base = statistics.mean(rates[b] for b in around)
                change = (rates[window] - base) / base if base else float("nan")
                report.add("rate", f"particle rate in the {window} window within 15 % of the baselines around it",
                           base > 0 and change > -0.15, change_percent=round(100 * change, 1),
                           rate=round(rates[window], 1), baselines=[round(rates[b], 1) for b in around])
            quiet_peak = {who: max(peaks[b][who]["rss"] for b in ("baseline 1", "baseline 2", "baseline 3"))
                          for who in ("daemon", "dashboard")}
            for who, allowed in (("daemon", 50e6), ("dashboard", 100e6)):
                growth = peaks["stalled"][who]["rss"] - quiet_peak[who]
                report.add("stalled clients", f"{who} RSS peak beside never-reading clients within "
                           f"{allowed / 1e6:.0f} MB of the baselines' peak", growth < allowed,
                           stalled_peak_mb=round(peaks["stalled"][who]["rss"] / 1e6),
                           baseline_peak_mb=round(quiet_peak[who] / 1e6))
            report.figures["rates"] = {k: round(v, 2) for k, v in rates.items()}
            report.figures["rss_peaks_mb"] = {k: {w: round(v[w]["rss"] / 1e6) for w in v} for k, v in peaks.items()}
            report.add("binds", "both processes alive at the end", target.alive())
        finally:
            remove_planted(planted)
            if feeder is not None:
                feeder.stop()
            code = target.stop()
        report.add("binds", "the daemon stopped cleanly (exit 0)", code == 0, exit_status=code)
    summary = report.summary()
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(time.time() - started, 1), "summary": summary, "figures": report.figures,
              "checks": [asdict(c) for c in report.checks]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"== {summary['passed']} passed, {summary['failed']} failed; {args.json}", flush=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

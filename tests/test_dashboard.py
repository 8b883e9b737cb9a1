"""The dashboard's pieces without a browser: map views, its state, and the real server
(aiohttp on a real port, fed by a real ZeroMQ PUB socket, read over HTTP and a WebSocket)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import zmq
from cryofastar.monitoring.class_tiles import TILE_SIZE, png_greyscale, tile_images
from cryofastar.monitoring.dashboard_server import MAX_PAGES, OUTBOX, STATIC, Dashboard, bind_socket
from cryofastar.monitoring.dashboard_state import MAX_TILES, DashboardState
from cryofastar.monitoring.map_views import block_mean, isosurface_grid, map_views
from cryofastar.monitoring.request_guard import RequestGuard, split_host
from cryofastar.protocol import ClassesMessage, StatusMessage, VolumeMessage, encode

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"


def volume_message(box: int = 32, particles: int = 100, seq: int = 1, session: str = "s1",
                   history: np.ndarray | None = None) -> VolumeMessage:
    volume = np.zeros((box, box, box), np.float32)
    c = box // 2
    volume[c, c + 5, c] = 1.0  # one bright voxel at y = +5 (z = 0, x = 0)
    shells = np.array([np.inf] + [box * 2.0 / k for k in range(1, box // 2 + 1)])
    fsc = np.linspace(1, 0, box // 2 + 1)
    return VolumeMessage(volume, 2.0, particles, 8.0, shells, fsc, seq=seq, session=session, time=1700000000.0,
                         history=history)


def status_message(session: str = "s1", **extra) -> StatusMessage:
    body = {"particles_in_map": 100, "particles_per_second": 12.5, "particles_ingested": 120, "queues": {"files": 0},
            **extra}
    return StatusMessage(body, seq=2, session=session, time=1700000001.0)


def classes_message(k: int = 5, box: int = 32, seq: int = 3, session: str = "s1") -> ClassesMessage:
    """``k`` averages, class ``n`` holding a bright pixel at y = +n (x = 0); counts out of class order."""
    averages = np.zeros((k, box, box), np.float32)
    averages[np.arange(k), box // 2 + np.arange(1, k + 1) % (box // 2), box // 2] = 1.0
    counts = np.resize([40.0, 250.5, 7.0, 120.0, 250.5], k)
    return ClassesMessage.from_arrays(averages, counts, apix=2.0, particles=668, version=4,
                                      resolution_angstrom=np.resize([np.nan, 9.5, 30.0, 12.25, 11.0], k),
                                      junk=np.resize([False, False, True, False, True], k),
                                      junk_score=np.resize([0.2, 0.1, 0.9, 0.3, 0.7], k), seq=seq, session=session,
                                      time=1700000003.0)


def read_png(data: bytes) -> np.ndarray:
    """An 8-bit greyscale PNG (filter 0 rows, as png_greyscale writes) read back, rows top first; CRCs checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:]


def test_class_tiles_are_small_scaled_per_tile_and_drawn_y_up():
    rng = np.random.default_rng(3)
    averages = rng.normal(size=(3, 128, 128)).astype(np.float32) * np.array([1, 100, 0])[:, None, None]
    tiles = tile_images(averages)
    assert tiles.shape == (3, 64, 64) and tiles.dtype == np.uint8 and TILE_SIZE == 64  # 128 px by blocks of 2
    assert tiles[0].min() == 0 and tiles[0].max() == 255 and tiles[1].max() == 255  # each to its own range
    assert (tiles[2] == 0).all()  # a flat average stays flat
    assert tile_images(np.zeros((2, 200, 200))).shape == (2, 50, 50)
    assert tile_images(np.zeros((1, 48, 48))).shape == (1, 48, 48)
    image = np.zeros((6, 4), np.uint8)
    image[1, 3] = 200  # y = 1 (second row from the bottom on screen), x = 3
    drawn = read_png(png_greyscale(image))
    assert drawn.shape == (6, 4) and drawn[6 - 1 - 1, 3] == 200 and drawn.sum() == 200


def test_state_keeps_the_latest_class_set_largest_first_and_bounded():
    state = DashboardState("tcp://x:1")
    assert state.snapshot()["classes"] is None
    changed = state.apply(classes_message())
    section = changed["classes"]
    assert [c["number"] for c in section["classes"]] == [2, 5, 4, 1, 3]  # by count, ties by number
    assert [c["junk"] for c in section["classes"]] == [False, True, False, False, True]
    assert section["classes"][0]["count"] == 250.5 and section["classes"][0]["resolution_angstrom"] == 9.5
    assert section["classes"][3]["resolution_angstrom"] is None  # NaN: null
    assert (section["count"], section["junk"], section["version"], section["particles"]) == (5, 2, 4, 668)
    assert section["box"] == 32 and section["tile_size"] == 32 and section["apix"] == 2.0
    tile = read_png(base64.b64decode(section["classes"][0]["png"]))  # class 2: its bright pixel at y = +2
    assert tile.shape == (32, 32) and np.unravel_index(tile.argmax(), tile.shape) == (32 - 1 - (16 + 2), 16)
    assert "classes" not in state.apply(classes_message())  # the same set again (same session, seq): not redrawn
    assert state.apply(classes_message(seq=4))["classes"]["seq"] == 4
    json.dumps(state.snapshot(), allow_nan=False)

    big = state.apply(classes_message(k=260, box=256, seq=5))["classes"]  # bounded: 200 tiles of at most 64 px
    assert MAX_TILES == 200 and len(big["classes"]) == 200 and big["count"] == 260 and big["tile_size"] == 64
    assert min(c["count"] for c in big["classes"]) == 40.0  # the 60 smallest left out: 52 of count 7, 8 of 40
    assert len(json.dumps(big)) < 1_000_000


def test_map_views_are_oriented_and_sized_for_display():
    views = map_views(volume_message().volume)
    assert set(views) == {"slice_xy", "slice_xz", "slice_yz", "projection_z", "projection_y", "projection_x"}
    xy = np.array(views["slice_xy"])
    assert xy.shape == (32, 32) and np.unravel_index(xy.argmax(), xy.shape) == (16 + 5, 16)  # rows y, columns x
    assert np.array(views["projection_x"]).argmax() == np.ravel_multi_index((16, 21), (32, 32))  # rows z, columns y
    assert xy.min() == 0 and xy.max() == 1
    big = map_views(np.random.default_rng(0).normal(size=(200, 200, 200)).astype(np.float32))
    assert np.array(big["slice_xz"]).shape == (66, 66)  # block-averaged by 3 to fit 96 px
    assert block_mean(np.ones((5, 5)), 2).shape == (2, 2)


def test_isosurface_grid_is_small_and_in_sigma_units():
    iso = isosurface_grid(np.random.default_rng(1).normal(size=(64, 64, 64)).astype(np.float32), apix=1.5)
    assert iso["n"] == 21 and iso["spacing_angstrom"] == 4.5 and len(iso["values"]) == 21**3  # 64 px by blocks of 3
    assert abs(np.mean(iso["values"])) < 0.01 and abs(np.std(iso["values"]) - 1) < 0.01
    assert iso["threshold_min"] < iso["threshold"] < iso["threshold_max"]


def test_state_keeps_the_latest_map_history_throughput_and_notices_restarts_and_silence():
    now = [100.0]
    state = DashboardState("tcp://x:1", stale_seconds=5, clock=lambda: now[0])
    assert state.connection()["state"] == "waiting" and state.snapshot()["map"] is None
    changed = state.apply(volume_message(history=np.array([[1.0, 50, np.nan], [2.0, 100, 8.0]])))
    assert changed["map"]["particles"] == 100 and changed["resolution_history"] == [[1.0, 50, None], [2.0, 100, 8.0]]
    assert changed["map"]["fsc"]["frequency_per_angstrom"][0] == 0.0 and changed["map"]["resolution_angstrom"] == 8.0
    assert "map" not in state.apply(volume_message())  # the 5-second re-send of the same map: not redrawn
    changed = state.apply(status_message())
    assert changed["throughput_point"] == [1700000001.0, 100, 12.5, 120] and changed["status"]["queues"] == {"files": 0}
    now[0] += 6
    assert state.connection()["state"] == "stale" and state.connection()["seconds_since_message"] == 6
    state.apply(volume_message(particles=300, seq=1, session="s2"))  # a restarted daemon: same seq, new session
    assert state.restarts == 1 and state.map["particles"] == 300 and state.connection()["state"] == "live"
    assert state.resolution_history[-1] == [1700000000.0, 300, 8.0]  # no history in its maps: built here
    assert state.note_malformed("bad")["connection"]["malformed"] == 1
    snapshot = state.snapshot()
    assert len(snapshot["throughput"]) == 1 and snapshot["connection"]["session"] == "s2"
    json.dumps(snapshot, allow_nan=False)  # strict JSON, as browsers need


class Served:
    """A Dashboard on a real port in a thread, subscribed to a raw ZeroMQ PUB socket."""

    def __init__(self, **dashboard_options) -> None:  # noqa: ANN003 - Dashboard's keyword arguments
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.dashboard = Dashboard(f"tcp://127.0.0.1:{port}", stale_seconds=30, **dashboard_options)
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = ""
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(self.dashboard.serve(self.sock, lambda url: (
                setattr(self, "url", url), ready.set())))
            try:
                self.loop.run_until_complete(self.task)
            except asyncio.CancelledError:
                pass
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def publish_until(self, frames: list[bytes], done, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # PUB/SUB drops what is sent before the subscription arrives
            self.pub.send_multipart(frames)
            time.sleep(0.1)
            if done():
                return
        raise AssertionError("the dashboard never took the message")

    def get(self, path: str) -> tuple[int, dict, bytes]:
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=30)
        self.sock.close()
        self.pub.close()
        self.context.term()


@pytest.fixture
def served():
    instance = Served()
    yield instance
    instance.close()


def test_server_serves_the_page_offline_and_live_state_over_http_and_websocket(served):
    status, headers, html = served.get("/")
    page = html.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing from the internet
    for asset in re.findall(r"""(?:src|href)=["'](/static/[^"']+)""", page):
        status, _, body = served.get(asset)
        assert status == 200 and len(body) > 500, asset
    assert len(served.get("/static/plotly.min.js")[2]) > 1_000_000  # the library itself, served locally

    served.publish_until(encode(volume_message()), lambda: served.dashboard.state.map is not None)
    served.publish_until([b"status", b"{not json", b""], lambda: served.dashboard.state.malformed > 0)
    served.publish_until(encode(classes_message()), lambda: served.dashboard.state.classes is not None)
    state = json.loads(served.get("/api/state")[2])
    assert state["map"]["particles"] == 100 and state["connection"]["state"] == "live"
    assert [c["number"] for c in state["classes"]["classes"]] == [2, 5, 4, 1, 3]
    assert "not valid UTF-8 JSON" in state["connection"]["last_error"]

    async def websocket() -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as session, session.ws_connect(served.url + "ws") as ws:
            first = json.loads((await ws.receive(timeout=10)).data)
            served.pub.send_multipart(encode(status_message(particles_in_map=150)))
            while True:
                update = json.loads((await ws.receive(timeout=10)).data)
                if "status" in update:
                    return first, update

    first, update = asyncio.run(websocket())
    assert first["snapshot"]["map"]["box"] == 32 and len(first["snapshot"]["map"]["views"]["slice_xy"]) == 32
    assert update["status"]["particles_in_map"] == 150 and update["throughput_point"][1] == 150


def test_dashboard_command_refuses_bad_input_with_one_clear_line():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), "dashboard", *args], capture_output=True, text=True, timeout=120,
                              check=False)

    with bind_socket("127.0.0.1", 0) as taken:
        result = run("--port", str(taken.getsockname()[1]))
        assert result.returncode == 2 and "cannot serve the dashboard on 127.0.0.1" in result.stderr
    for args, message in ((["--connect", "localhost:5555"], "expected a ZeroMQ address"),
                          (["--port", "70000"], "--port must be 0..65535"),
                          (["--stale-after", "0"], "--stale-after must be positive"),
                          (["--connect", "tcp://no such host:1", "--port", "0"], "--connect")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args
    assert "--connect" in run("--help").stdout


def test_watch_with_a_dashboard_port_in_use_fails_cleanly(tmp_path):
    (tmp_path / "session").mkdir()
    with bind_socket("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([str(SCRIPT), "--watch", str(tmp_path / "session"), "--out", str(tmp_path / "out"),
                                 "--zmq", "tcp://127.0.0.1:0", "--metrics-port", "-1", "--dashboard-port",
                                 str(port)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # refused before anything loads (daemon/preflight.py), naming the option and the port
    assert f"--dashboard-port {port}: port {port} on 127.0.0.1 is already in use" in result.stderr


# ---------------------------------------------------------------------------- hostile and slow clients (issue 20)
def _raw(url: str, payload: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes to the server of ``url``; (status, body) of the answer."""
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    data = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _upgrade(host: str, origin: str | None) -> bytes:
    return ("GET /ws HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode()


def test_request_guard_names_and_origins():
    guard = RequestGuard("127.0.0.1", allow_hosts=("Scope.Example.",), allow_origins=("https://proxy.example",))
    assert split_host("[::1]:8080") == ("::1", 8080) and split_host("LocalHost.:80") == ("localhost", 80)
    for host in ("127.0.0.1:8080", "localhost", "[::1]:1", "10.1.2.3:8080", "scope.example:8080", "SCOPE.example"):
        assert guard.check_host([host]) is None, host
    for host, status in ((["evil.example:8080"], 421), (["127.0.0.1.nip.io"], 421), ([], 400),
                         (["a", "b"], 400), (["bad host"], 400), (["x:99999"], 400)):
        assert guard.check_host(host)[0] == status, host
    assert guard.check_origin(None, "127.0.0.1:8080") is None  # not a browser
    assert guard.check_origin("http://127.0.0.1:8080", "127.0.0.1:8080") is None
    assert guard.check_origin("https://proxy.example", "127.0.0.1:8080") is None
    for origin in ("http://evil.example", "http://127.0.0.1:8081", "https://127.0.0.1:8080", "null", "garbage",
                   "http://localhost:8080"):  # localhost is another origin than 127.0.0.1, as the browser sees it
        assert guard.check_origin(origin, "127.0.0.1:8080")[0] == 403, origin
    assert "gethostname" not in str(guard.names) and socket.gethostname().lower() in RequestGuard("0.0.0.0").names
    with pytest.raises(ValueError, match="--allow-host"):
        RequestGuard("127.0.0.1", allow_hosts=("a/b",))
    with pytest.raises(ValueError, match="--allow-origin"):
        RequestGuard("127.0.0.1", allow_origins=("ftp://x",))


def test_other_sites_cannot_read_the_session_by_dns_rebinding_or_a_cross_site_websocket(served):
    host = served.url.split("/")[2]
    status, body = _raw(served.url, b"GET /api/state HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n")
    assert status == 421 and b"DNS rebinding" in body and b"--allow-host evil.example" in body
    assert _raw(served.url, b"GET /api/state HTTP/1.0\r\n\r\n")[0] == 400  # no Host at all
    status, body = _raw(served.url, _upgrade(host, "http://evil.example"))
    assert status == 403 and b"--allow-origin http://evil.example" in body

    async def page(origin: str | None) -> dict:
        async with aiohttp.ClientSession() as session, session.ws_connect(served.url + "ws", origin=origin) as ws:
            return json.loads((await ws.receive(timeout=10)).data)

    assert "snapshot" in asyncio.run(page(f"http://{host}"))  # its own page
    assert "snapshot" in asyncio.run(page(None))  # a script, not a browser
    served.dashboard.guard = RequestGuard("127.0.0.1", allow_hosts=("scope.example",))
    assert _raw(served.url, b"GET /api/state HTTP/1.1\r\nHost: scope.example:80\r\nConnection: close\r\n\r\n")[0] == 200


def test_only_the_assets_table_is_served_never_a_symlink_or_a_path(tmp_path):
    static = tmp_path / "static"
    shutil.copytree(STATIC, static)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN\n")
    (static / "link.txt").symlink_to(secret)
    (static / ".hidden").write_text("SECRET-TOKEN\n")
    instance = Served(static=static)
    try:
        assert "link.txt" not in instance.dashboard.assets and ".hidden" not in instance.dashboard.assets
        (static / "late.txt").write_text("SECRET-TOKEN\n")  # written after the start: not in the table either
        host = instance.url.split("/")[2]
        for path in ("/static/link.txt", "/static/.hidden", "/static/late.txt", "/static/../secret.txt",
                     "/static/%2e%2e/secret.txt", "/static/%2e%2e%2fsecret.txt", "/static/%252e%252e%252fsecret.txt",
                     "/static/..%5csecret.txt", f"/static/{secret}", f"/static/{str(secret).replace('/', '%2f')}",
                     "/static/index.html%00", "/static/../../dashboard_server.py"):
            status, body = _raw(instance.url, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                                .encode())
            assert status in (400, 404) and b"SECRET" not in body, path
        assert instance.get("/static/dashboard.js")[0] == 200
    finally:
        instance.close()


def test_a_page_that_never_reads_is_cut_and_the_other_pages_go_on(served):
    host, port = served.url.split("/")[2].split(":")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((host, int(port)))
    stalled.sendall(_upgrade(f"{host}:{port}", None))  # and never reads again
    deadline = time.monotonic() + 10
    while len(served.dashboard._pages) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)

    async def reading_page() -> int:
        got = 0
        async with aiohttp.ClientSession() as session, session.ws_connect(served.url + "ws") as ws:
            big = "x" * 200_000
            for seq in range(OUTBOX + 120):  # ~38 MB for the stalled page: its kernel buffers fill, then the outbox
                served.pub.send_multipart(encode(status_message(padding=big)))
                await asyncio.sleep(0.01)
                if seq % 20 == 0:
                    while True:
                        try:
                            await ws.receive(timeout=0.01)
                            got += 1
                        except TimeoutError:
                            break
            while len(served.dashboard._pages) > 1:
                await ws.receive(timeout=10)
                got += 1
            return got

    received = asyncio.run(reading_page())
    deadline = time.monotonic() + 10
    while served.dashboard._pages and time.monotonic() < deadline:  # the reading page's close reaches the server
        time.sleep(0.05)
    assert len(served.dashboard._pages) == 0 and received > OUTBOX  # the stalled page cut, this one served
    stalled.settimeout(10)
    try:  # the server ended it: what was in flight, then end of stream or a reset (never a timeout)
        while stalled.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    finally:
        stalled.close()


def test_idle_connections_are_capped_and_a_new_page_still_loads(served):
    host, port = served.url.split("/")[2].split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(400)]
    try:
        time.sleep(1)
        assert served.dashboard.limit.open_connections <= 256 and served.dashboard.limit.closed >= 144
        assert served.get("/")[0] == 200  # the oldest idle connection made room
        assert MAX_PAGES <= 64
    finally:
        for sock in idle:
            sock.close()

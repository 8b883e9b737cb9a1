"""Hostile and slow clients: a fast subset of bench/hostile_clients.py against the real daemon and its dashboard
(``cryofastar-stream watch --dashboard-port 0`` in a subprocess, real sockets), and the /metrics server's bounds
(daemon/metrics_server.py) on a real port."""

from __future__ import annotations

import importlib.util
import os
import resource
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from cryofastar.daemon.metrics import DaemonMetrics, serve_metrics
from cryofastar.daemon.metrics_server import MetricsServer

_SPEC = importlib.util.spec_from_file_location("hostile_clients",
                                               Path(__file__).parents[1] / "bench" / "hostile_clients.py")
hostile = importlib.util.module_from_spec(_SPEC)
sys.modules["hostile_clients"] = hostile  # dataclasses look their module up
_SPEC.loader.exec_module(hostile)


def _failed(report) -> list[str]:  # noqa: ANN001
    return [f"{c.group}: {c.name} {c.detail}" for c in report.checks if not c.passed]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    instance = hostile.Target(tmp_path_factory.mktemp("hostile"), nofile=1024,
                              extra=("--dashboard-allow-host", "scope-pc.example"))
    yield instance
    assert instance.stop() == 0


def test_every_socket_binds_loopback_and_only_the_dashboards_own_names_and_origin_are_answered(target):
    report = hostile.Report()
    hostile.probe_binds(report, target)
    hostile.probe_host_origin(report, target)
    assert not _failed(report)
    answer = hostile.get(target.host, target.dashboard_port, "/", "evil.example:80")
    assert answer.status == 421 and b"--allow-host evil.example" in answer.body  # says what to do
    assert hostile.get(target.host, target.dashboard_port, "/", "scope-pc.example:8080").status == 200  # watch's


def test_no_url_reads_anything_but_the_dashboards_assets(target, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET 0123456789abcdef\n")
    report = hostile.Report()
    hostile.probe_traversal(report, target, secret, "0123456789abcdef", planted=[])
    assert len(report.checks) > 35 and not _failed(report)


def test_malformed_requests_and_websocket_frames_are_refused_and_the_servers_go_on(target):
    report = hostile.Report()
    hostile.probe_malformed(report, target, timeout=3)  # the campaign waits 8 s for an answer that never comes
    hostile.probe_websocket(report, target, wait_ignored=2)
    assert len(report.checks) > 50 and not _failed(report)
    assert target.alive()


def test_hundreds_of_idle_connections_cost_no_thread_and_a_bounded_number_of_fds(target):
    before = {"daemon": hostile.proc_figures(target.pid), "dashboard": hostile.proc_figures(target.dashboard_pid)}
    held = []
    try:
        for port in (target.dashboard_port, target.metrics_port):
            socks, established = hostile.open_idle(target.host, port, 400)
            held += socks
            assert established == 400
        time.sleep(1.5)
        counts = {**hostile.connections_by_port(target.pid), **hostile.connections_by_port(target.dashboard_pid)}
        assert counts.get(target.metrics_port, 0) <= 64 and counts.get(target.dashboard_port, 0) <= 256
        assert hostile.scrape(target.metrics_url)[0]
        assert hostile.get(target.host, target.dashboard_port, "/").status == 200
        assert hostile.ws_first_message(target.host, target.dashboard_port)[0]
        after = {"daemon": hostile.proc_figures(target.pid), "dashboard": hostile.proc_figures(target.dashboard_pid)}
    finally:
        for sock in held:
            sock.close()
    assert after["daemon"]["threads"] <= before["daemon"]["threads"] + 2  # was one thread per connection
    assert after["dashboard"]["threads"] <= before["dashboard"]["threads"] + 2
    assert after["daemon"]["fds"] <= before["daemon"]["fds"] + 64 + 4
    assert after["dashboard"]["fds"] <= before["dashboard"]["fds"] + 256 + 4


# ---------------------------------------------------------------------------- the /metrics server itself
def _server(**kwargs) -> MetricsServer:
    return MetricsServer(lambda accept: (b"metric 1\n", "text/plain; version=0.0.4"), "127.0.0.1", 0, **kwargs)


def test_metrics_server_answers_a_scrape_and_refuses_the_rest_with_a_reason():
    metrics = DaemonMetrics()
    metrics.batches.inc(3)
    server = serve_metrics(metrics, 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"cryofastar_batches_total 3.0" in response.read()
        request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                                       "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        for payload, status in ((b"GET /metrics\r\n", 400), (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
                                (b"GET /x HTTP/1.1\r\n\r\n", 404), (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
                                (b"GET /" + b"a" * 20000, 431), (b"HEAD /metrics HTTP/1.0\r\n\r\n", 200)):
            answer = hostile.raw("127.0.0.1", server.server_port, payload)
            assert answer.status == status and answer.closed, payload[:30]
        with pytest.raises(OSError, match="cannot serve metrics"):
            serve_metrics(metrics, server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_server_closes_idle_slow_and_never_reading_clients_and_keeps_one_thread():
    server = _server(max_connections=8, request_seconds=1.0, response_seconds=1.0)
    threads = threading.active_count()
    try:
        idle, _ = hostile.open_idle("127.0.0.1", server.server_port, 50)
        time.sleep(0.5)
        assert server.open_connections <= 8 and threading.active_count() == threads
        answer = hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert answer.status == 200 and answer.body == b"metric 1\n"  # the oldest idle one made room
        slow = hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\nHo", timeout=5)
        assert slow.status == 408 and 0.9 < slow.seconds < 3  # a request that never finishes: 408 after 1 s
        time.sleep(1.5)
        assert server.open_connections == 0  # the idle ones too
        for sock in idle:
            sock.close()
    finally:
        server.shutdown()
        server.server_close()
    big = MetricsServer(lambda accept: (b"x" * 20_000_000, "text/plain"), "127.0.0.1", 0, response_seconds=1.0)
    try:
        with socket.socket() as reader:  # asks for 20 MB and never reads
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", big.server_port))
            reader.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            time.sleep(0.5)
            assert big.open_connections == 1
            time.sleep(2.0)
            assert big.open_connections == 0
        assert hostile.raw("127.0.0.1", big.server_port, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=20,
                           limit=30_000_000).status == 200
    finally:
        big.shutdown()
        big.server_close()
    assert not any(t.name == "cryofastar-metrics" for t in threading.enumerate())


def test_a_flood_of_scrapes_renders_at_most_ten_times_a_second():
    renders = []

    def render(_accept: str) -> tuple[bytes, str]:
        renders.append(time.monotonic())
        return b"m 1\n", "text/plain"

    server = MetricsServer(render, "127.0.0.1", 0)
    try:
        results = []

        def scrape_many() -> None:
            for _ in range(40):
                results.append(hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\n\r\n").status)

        workers = [threading.Thread(target=scrape_many) for _ in range(4)]
        t0 = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - t0
    finally:
        server.shutdown()
        server.server_close()
    assert results == [200] * 160
    assert len(renders) <= 10 * elapsed + 2
    assert min(b - a for a, b in zip(renders, renders[1:], strict=False)) >= 0.099


def test_bench_parses_the_proc_tables_it_relies_on():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert ("127.0.0.1", listener.getsockname()[1]) in hostile.listening_sockets(os.getpid())
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert hostile.connections_by_port(os.getpid()).get(listener.getsockname()[1]) == 1
                assert client.fileno() > 0


def test_a_failing_rendering_is_a_500_and_the_server_goes_on():
    calls = []

    def render(_accept: str) -> tuple[bytes, str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a collector failed")
        return b"m 1\n", "text/plain"

    server = MetricsServer(render, "127.0.0.1", 0)
    try:
        assert hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\n\r\n").status == 500
        assert hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\n\r\n").body == b"m 1\n"
        with socket.create_connection(("127.0.0.1", server.server_port)) as gone:  # resets before its answer
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            gone.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert hostile.raw("127.0.0.1", server.server_port, b"GET /metrics HTTP/1.1\r\n\r\n").status == 200
    finally:
        server.shutdown()
        server.server_close()

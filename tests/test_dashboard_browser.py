"""The live dashboard in a real browser (headless Debian chromium driven by Playwright) against
a real daemon on a real directory: every panel must show data, and the page must live through
the daemon restarting and the dashboard server restarting, without a reload."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from cryofastar.protocol import ClassesMessage, encode

playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")

from cryofastar.monitoring.headless_browser import launch_chromium  # noqa: E402
from session_helpers import ScriptProcess, place, simulate_stacks  # noqa: E402

BOX = 48
PER_STACK = 40
N_STACKS = 8
# --keep-junk: a junk-free session whose map counts the tests wait for (the 2D lane may call a few
# clean particles junk in so small a session; exclusion is tested in test_classification_lane)
FAST = ["--settle", "0.3", "--flush", "1", "--publish-every", "1", "--checkpoint-every", "2", "--batch", "48",
        "--metrics-port", "-1", "--refine-after", "100000", "--classes", "8", "--classes-every", "1", "--keep-junk"]
SCREENSHOTS = Path(os.environ.get("CRYOFASTAR_SCREENSHOTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> list[Path]:
    return simulate_stacks(tmp_path_factory.mktemp("simulated"), PER_STACK * N_STACKS, BOX, PER_STACK, seed=21)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as pw:
        try:
            instance = launch_chromium(pw)
        except FileNotFoundError as exc:
            pytest.fail(str(exc))
        yield instance
        instance.close()


@pytest.fixture
def processes(spawn):
    """Start console-script processes with ``processes(*args)`` (stderr in their lines); closed after the test."""
    return lambda *args: spawn(ScriptProcess, *args, merge_stderr=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plot_data(page, element: str) -> list[dict]:
    """The traces plotly.js drew in a div (what is on screen, not what the server sent)."""
    return page.evaluate("id => (document.getElementById(id).data || []).map(t => JSON.parse(JSON.stringify(t)))",
                         element)


def wait_until(page, expression: str, what: str, timeout_s: float = 120) -> None:
    try:
        page.wait_for_function(expression, timeout=timeout_s * 1000, polling=250)
    except playwright.TimeoutError:
        filled = page.evaluate("[...document.querySelectorAll('.panel')].map(p => p.id + '=' + p.dataset.filled)")
        raise AssertionError(f"{what} within {timeout_s} s; panels: {filled}") from None


def views_particles(page) -> int:
    """The particle count the views panel states (its heatmap is density x uniform: its sum is fixed)."""
    layout = page.evaluate("(document.getElementById('views').layout || {}).annotations || []")
    text = layout[0]["text"] if layout else ""
    return int(text.split()[0]) if text.split() and text.split()[0].isdigit() else 0


def map_particles(page) -> int:
    text = page.text_content("#map-note") or ""
    return int(text.split()[0]) if text.split() and text.split()[0].isdigit() else 0


@pytest.mark.slow
def test_every_panel_fills_with_live_data_from_a_real_daemon(stacks, tmp_path, browser, processes):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    place(stacks[0], watch)
    daemon = processes("--watch", str(watch), "--out", str(out), "--zmq", "tcp://127.0.0.1:0", "--dashboard-port",
                       "0", *FAST)
    url = daemon.wait_for(r"dashboard (http://\S+)").group(1)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    wait_until(page, "document.getElementById('panel-map').dataset.filled === 'true'", "no first map")
    first = map_particles(page)
    early_views = views_particles(page)
    for stack in stacks[1:]:
        place(stack, watch)
        time.sleep(0.5)
    (watch / "broken.mrcs").write_bytes(b"not an MRC file" * 64)
    total = PER_STACK * N_STACKS
    wait_until(page, f"parseInt(document.getElementById('map-note').textContent) >= {total}",
               f"the map never reached {total} particles")
    # every panel, the 2D classes' too (the daemon's 2D lane publishes them)
    wait_until(page, "[...document.querySelectorAll('.panel')].every(p => p.dataset.filled === 'true')",
               "a panel stayed empty")
    wait_until(page, "document.querySelector('#rejected tbody').textContent.includes('broken.mrcs')",
               "the rejected file is not listed")

    # each panel shows data, checked on what plotly drew
    for name in ("slice_xy", "slice_xz", "slice_yz", "projection_z", "projection_y", "projection_x"):
        z = plot_data(page, name)[0]["z"]
        values = [v for row in z for v in row]
        assert len(z) == BOX and len(z[0]) == BOX and max(values) - min(values) > 0.5, name
    iso = plot_data(page, "isosurface")[0]
    assert iso["type"] == "isosurface" and len(iso["value"]) == (BOX // 2) ** 3
    assert page.locator("#isosurface canvas").count() > 0  # drawn with WebGL
    fsc = plot_data(page, "fsc")[0]
    assert len(fsc["y"]) == BOX // 2 + 1 and fsc["y"][1] > 0.5  # low frequencies agree between half maps
    resolution = plot_data(page, "resolution")[0]
    assert len(resolution["y"]) >= 2 and all(r > 0 for r in resolution["y"])
    views = plot_data(page, "views")[0]
    assert sum(map(sum, views["z"])) > 0 and len(views["x"]) == 37 and len(views["y"]) == 19
    wait_until(page, f"Math.max(...document.getElementById('throughput').data[1].y) >= {total}",
               "the throughput chart never showed every particle", 15)  # charts redraw at most every 2 s
    throughput = plot_data(page, "throughput")
    assert len(throughput[0]["x"]) >= 2
    assert max(throughput[0]["y"]) > 0  # particles/s
    assert set(plot_data(page, "queues")[0]["y"]) >= {"files", "chunks", "posed"}
    rejected = page.text_content("#rejected tbody")
    assert "broken.mrcs" in rejected and "not a readable MRC" in rejected
    session = page.text_content("#session")
    assert f"{BOX} px" in session and "3.000 Å" in session and "cryofastar-small.safetensors" in session
    assert page.text_content("#connection") == "live" and page.is_hidden("#stale-banner")
    assert int(page.text_content("#head-particles")) == total

    # a structure emerging: more particles in the map, views filling in, resolution recorded over time
    assert map_particles(page) > first
    wait_until(page, f"parseInt(document.getElementById('views').layout.annotations[0].text) >= {total}",
               "the views panel never counted every particle", 15)  # redrawn at most every 5 s
    assert views_particles(page) > early_views
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    # nothing came from outside this machine (no CDN), and the page raised no script error
    assert requests and all(r.startswith((url.rstrip("/"), "ws://", "data:")) for r in requests), requests
    assert errors == []
    page.close()
    assert daemon.stop()[0] == 0


@pytest.mark.slow
def test_the_page_reconnects_when_the_daemon_and_the_dashboard_restart(stacks, tmp_path, browser, processes):
    watch, out = tmp_path / "session", tmp_path / "out"
    watch.mkdir()
    zmq = f"tcp://127.0.0.1:{free_port()}"
    web = free_port()
    daemon = processes("--watch", str(watch), "--out", str(out), "--zmq", zmq, *FAST)
    daemon.wait_for("watching")
    dashboard = processes("dashboard", "--connect", zmq, "--port", str(web), "--stale-after", "3")
    url = dashboard.wait_for(r"dashboard: (http://\S+)").group(1)
    page = browser.new_page()
    page.goto(url)
    place(stacks[0], watch)
    wait_until(page, "document.getElementById('connection').textContent === 'live'", "never live")
    wait_until(page, f"parseInt(document.getElementById('map-note').textContent) >= {PER_STACK}", "no first map")
    session = page.evaluate("document.getElementById('session').textContent")

    assert daemon.stop()[0] == 0  # the daemon goes away: the page says so and keeps the last data
    wait_until(page, "document.getElementById('connection').textContent === 'stale'", "no stale warning", 30)
    assert "No data from the daemon" in page.text_content("#stale-banner")
    assert map_particles(page) >= PER_STACK

    daemon = processes("--watch", str(watch), "--out", str(out), "--zmq", zmq, *FAST)  # resumes the session
    daemon.wait_for("watching")
    place(stacks[1], watch)
    wait_until(page, f"parseInt(document.getElementById('map-note').textContent) >= {2 * PER_STACK}",
               "no map from the restarted daemon", 120)
    assert page.text_content("#connection") == "live" and page.is_hidden("#stale-banner")
    wait_until(page, "document.getElementById('session').textContent.includes('daemon restarts seen1')",
               "the restart was not noticed", 15)
    assert page.evaluate("document.getElementById('session').textContent") != session

    assert dashboard.stop()[0] == 0  # the dashboard server goes away: the page reconnects to its successor
    wait_until(page, "document.getElementById('connection').textContent === 'dashboard offline'",
               "no offline warning", 15)
    dashboard = processes("dashboard", "--connect", zmq, "--port", str(web), "--stale-after", "3")
    dashboard.wait_for("dashboard: ")
    wait_until(page, "document.getElementById('connection').textContent === 'live'", "no reconnection", 30)
    wait_until(page, f"parseInt(document.getElementById('map-note').textContent) >= {2 * PER_STACK}",
               "the new dashboard did not send the map", 30)
    page.close()
    assert daemon.stop()[0] == 0 and dashboard.stop()[0] == 0


def gallery_message(box: int = 96) -> ClassesMessage:
    """Six averages, class ``n`` with one bright pixel at y = +3n, x = 0; counts out of class order."""
    averages = np.zeros((6, box, box), np.float32)
    averages[np.arange(6), box // 2 + 3 * np.arange(1, 7), box // 2] = 1.0
    return ClassesMessage.from_arrays(
        averages, counts=[40.0, 300.0, 7.0, 120.0, 290.0, 55.0], apix=1.5, particles=812, version=3,
        resolution_angstrom=[np.nan, 9.6, 31.0, 12.4, 15.0, 18.2], accuracy_degrees=[np.nan, 2.1, 40, 3.3, 9, 5],
        junk=[False, False, True, False, True, False], junk_score=[0.3, 0.05, 0.95, 0.1, 0.8, 0.2], session="2d")


def test_the_class_gallery_shows_a_published_class_set_largest_first_with_junk_greyed(tmp_path, browser,
                                                                                       processes):
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    dashboard = processes("dashboard", "--connect", f"tcp://127.0.0.1:{port}", "--port", "0")
    url = dashboard.wait_for(r"dashboard: (http://\S+)").group(1)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    wait_until(page, "document.getElementById('connection').textContent !== 'connecting…'", "no WebSocket", 30)
    assert page.is_visible("#panel-classes .empty") and "No 2D classes yet" in page.text_content("#panel-classes")
    assert page.locator(".class-tile").count() == 0

    stop = threading.Event()

    def feed() -> None:  # the same class set until the page shows it (PUB/SUB drops what precedes the subscription)
        frames = encode(gallery_message())
        while not stop.is_set():
            pub.send_multipart(frames)
            stop.wait(0.2)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_until(page, "document.getElementById('panel-classes').dataset.filled === 'true'", "no class gallery", 60)
    finally:
        stop.set()
        feeder.join()
        pub.close(linger=0)
        context.term()
    assert page.is_hidden("#panel-classes .empty")
    tiles = page.evaluate("""[...document.querySelectorAll('#class-gallery .class-tile')].map(t => ({
        number: Number(t.dataset.number), junk: t.classList.contains('junk'), text: t.textContent,
        opacity: Number(getComputedStyle(t).opacity), filter: getComputedStyle(t).filter,
        width: t.querySelector('img').naturalWidth}))""")
    assert [t["number"] for t in tiles] == [2, 5, 4, 6, 1, 3]  # largest first
    assert [t["number"] for t in tiles if t["junk"]] == [5, 3]
    for tile in tiles:  # junk greyed and labelled; the others in full
        assert (tile["opacity"] < 0.6 and "grayscale" in tile["filter"] and "junk" in tile["text"]) == tile["junk"]
        assert tile["width"] == 48  # 96 px averages block-averaged to at most 64 px
    four = page.locator(".class-tile[data-number='4']")
    assert four.locator(".class-number").text_content() == "#4"
    assert four.locator(".class-count").text_content() == "120 ptcls"
    assert four.locator(".class-resolution").text_content() == "12.4 Å"
    assert page.locator(".class-tile[data-number='1'] .class-resolution").text_content() == "– Å"  # undefined
    assert "in-plane accuracy 3.3°" in four.get_attribute("title")
    note = page.text_content("#classes-note")
    assert "6 classes" in note and "2 junk" in note and "812 particles" in note and "1.50 Å/px" in note
    # the image drawn: class 4's bright pixel at y = +12 (block-averaged by 2: +6 of 24), y up as the map slices
    bright = page.evaluate("""() => {
        const img = document.querySelector(".class-tile[data-number='4'] img"), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data;
        let best = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i] > px[best]) best = i;
        return [Math.floor(best / 4 / c.width), (best / 4) % c.width, px[best]];
    }""")
    assert bright == [48 - 1 - (24 + 6), 24, 255]  # row from the top, column, value
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#panel-classes").screenshot(path=str(SCREENSHOTS / "dashboard_classes.png"))
    assert requests and all(r.startswith((url.rstrip("/"), "ws://", "data:")) for r in requests), requests
    assert errors == []
    page.close()
    assert dashboard.stop()[0] == 0

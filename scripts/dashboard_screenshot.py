"""Screenshot of the live dashboard during the README's demo (the picture in README.md).

Runs ``cryofastar-stream demo`` (a simulated session), opens the printed dashboard URL
in headless Debian chromium (Playwright), waits until the map holds ``--particles``
particles and every panel has data, then saves a full-page PNG and lets the demo finish.

    .venv/bin/python scripts/dashboard_screenshot.py docs/images/dashboard.png
    .venv/bin/python scripts/dashboard_screenshot.py shot.png --particles 2000 -- --n 3000 --rate 200
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryofastar.monitoring.headless_browser import launch_chromium
from playwright.sync_api import sync_playwright

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--particles", type=int, default=3000, help="take it once the map holds this many")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args, demo_args = parser.parse_known_args()  # the rest (after --) goes to `cryofastar-stream demo`
    args.demo_args = [a for a in demo_args if a != "--"]
    demo = subprocess.Popen([str(SCRIPT), "demo", "--no-live", "--no-browser", "--dashboard-port", "0",
                             "--metrics-port", "-1", "--zmq", "tcp://127.0.0.1:0", *args.demo_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) or print(line, end="") for line in demo.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + args.timeout
    url = None
    while url is None and time.monotonic() < deadline and demo.poll() is None:
        url = next((m.group(1) for m in map(lambda line: re.search(r"live dashboard: (\S+)", line), list(lines))
                    if m), None)
        time.sleep(0.2)
    if url is None:
        demo.kill()
        raise SystemExit("the demo printed no dashboard URL")
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": args.width, "height": 1200})
        page.goto(url)
        remaining = max(1.0, deadline - time.monotonic())
        page.wait_for_function(
            f"parseInt(document.getElementById('map-note').textContent) >= {args.particles} && "
            "[...document.querySelectorAll('.panel')].every(p => p.dataset.filled === 'true')",
            timeout=remaining * 1000, polling=500)
        time.sleep(2.0)  # let the last redraw settle
        args.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.png), full_page=True)
        print(f"screenshot: {args.png}", flush=True)
        browser.close()
    demo.wait(timeout=max(1.0, deadline - time.monotonic()))


if __name__ == "__main__":
    main()

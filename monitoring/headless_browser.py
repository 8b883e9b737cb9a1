"""Headless Chromium for the dashboard's browser tests, screenshots and benchmarks (Playwright).

One place for the binary and its flags: Debian's ``chromium`` at ``/usr/bin/chromium``
(``CRYOFASTAR_CHROMIUM`` overrides it; Playwright never downloads a browser of its own),
started for a machine with no GPU and no internet: WebGL (the isosurface) through
SwiftShader, and no background connections to Google's hosts. Playwright is a test
dependency (``pip install -e '.[test]'``); the dashboard itself never needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHROMIUM_ARGS", "chromium_path", "launch_chromium"]

CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader")


def chromium_path() -> Path:
    """The Chromium binary: ``$CRYOFASTAR_CHROMIUM`` or ``/usr/bin/chromium``."""
    return Path(os.environ.get("CRYOFASTAR_CHROMIUM", "/usr/bin/chromium"))


def launch_chromium(playwright):  # noqa: ANN001, ANN201 - playwright.sync_api types, imported by the caller
    """A headless Chromium from a started ``sync_playwright()``.

    Raises
    ------
    FileNotFoundError
        No binary at :func:`chromium_path` (the message says how to get one).
    """
    path = chromium_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install Debian's chromium (apt-get install chromium; "
                                "scripts/setup.sh --test does) or set CRYOFASTAR_CHROMIUM")
    return playwright.chromium.launch(executable_path=str(path), args=list(CHROMIUM_ARGS))

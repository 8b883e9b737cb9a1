"""Receive the live stream of a running daemon: print each message, optionally save the maps.

One line per message (status counters, new map with its resolution, pose batches).
With ``--save DIR`` every new map is written as ``DIR/volume.mrc`` (the latest) and
``DIR/volume_<particles>.mrc``, with its FSC curve in ``DIR/volume_fsc.tsv``.
The wire protocol is described in ``docs/protocol.md``.

Example usage::

    cryofastar-stream subscribe tcp://127.0.0.1:5555
    cryofastar-stream subscribe tcp://scope-pc:5555 --save live_maps
    cryofastar-stream subscribe tcp://127.0.0.1:5555 --count 1 --timeout 30   # one message, or give up after 30 s
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from cryofastar.monitoring.subscriber import run_subscriber

logger = logging.getLogger(__name__)


def main(address: str, save: Path | None, count: int | None, timeout: float | None) -> int:
    """Subscribe to ``address`` until ``count`` messages or ``timeout`` idle seconds; returns messages received.

    Parameters
    ----------
    address: str
        Publisher endpoint, e.g. ``tcp://127.0.0.1:5555``.
    save: Path | None
        Directory for the received maps and FSC table; ``None`` saves nothing.
    count: int | None
        Stop after this many messages (``None``: no limit).
    timeout: float | None
        Stop after this many seconds without a message (``None``: wait for ever).

    Raises
    ------
    ValueError
        ``count`` < 1, ``timeout`` <= 0, or a malformed address.
    """
    received = run_subscriber(address, save, count, timeout, echo=typer.echo)
    logger.info("received %d messages from %s", received, address)
    return received

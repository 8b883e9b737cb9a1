"""``cryofastar-stream subscribe``: print each message of a running daemon, optionally save maps and classes.

One line per message (status counters, new map with its resolution, pose batches, 2D
class sets). With ``--save DIR`` every new map is written as ``DIR/volume.mrc`` (the
latest) and ``DIR/volume_<particles>.mrc``, with its FSC curve in ``DIR/volume_fsc.tsv``,
and every new class set as ``DIR/class_averages.mrcs`` + ``DIR/classes.star`` (the latest)
and ``DIR/class_averages_<version>.mrcs`` + ``DIR/classes_<version>.star``.
The wire protocol is described in ``docs/protocol.md``; the options are the fields of
:class:`~cryofastar.monitoring.subscriber.SubscribeSettings`.

Example usage::

    cryofastar-stream subscribe tcp://127.0.0.1:5555
    cryofastar-stream subscribe tcp://scope-pc:5555 --save live_maps
    cryofastar-stream subscribe tcp://127.0.0.1:5555 --count 1 --timeout 30   # one message, or give up after 30 s
"""

from __future__ import annotations

import logging

import typer

from cryofastar.monitoring.subscriber import SubscribeSettings, run_subscriber
from cryofastar.options import settings_command

logger = logging.getLogger(__name__)

__all__ = ["subscribe"]


@settings_command(SubscribeSettings)
def subscribe(settings: SubscribeSettings) -> None:
    """Print a running daemon's status, poses, maps and 2D classes (the reference subscriber)."""
    received = run_subscriber(settings.address, settings.save, settings.count, settings.timeout, echo=typer.echo)
    logger.info("received %d messages from %s", received, settings.address)

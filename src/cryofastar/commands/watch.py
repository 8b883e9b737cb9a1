"""``cryofastar-stream watch DIRECTORY`` (or ``--watch DIRECTORY``): keep a live 3D map of a session.

The options are the fields of :class:`~cryofastar.daemon.settings.DaemonSettings`,
:class:`~cryofastar.engine.classification.ClassifySettings` (the 2D lane's, as for
``classify``) and :class:`~cryofastar.daemon.settings.ServiceSettings`; the service is
:func:`~cryofastar.services.watch.run_service`.

Example usage::

    cryofastar-stream --watch /data/session42 --out /data/session42/cryofastar
    cryofastar-stream watch /data/session42 --poll 5          # NFS/SMB/GPFS: poll instead of inotify
    cryofastar-stream watch /data/session42 --nproc 2         # two processes share the session
    cryofastar-stream subscribe tcp://127.0.0.1:5555 --save maps/
"""

from __future__ import annotations

import dataclasses

import typer

from cryofastar.daemon.settings import DaemonSettings
from cryofastar.engine.classification import ClassifySettings
from cryofastar.options import settings_command
from cryofastar.services.settings import ServiceSettings

__all__ = ["watch"]


@settings_command(DaemonSettings, ClassifySettings, ServiceSettings)  # PublisherError is an OSError
def watch(settings: DaemonSettings, classification: ClassifySettings, service: ServiceSettings) -> None:
    """Watch DIRECTORY and keep a live map and 2D classes (also: cryofastar-stream --watch DIRECTORY)."""
    from cryofastar.engine.distributed import RankFailed
    from cryofastar.services.watch import run_session  # the pipeline: loaded only when it runs

    settings = dataclasses.replace(settings, classification=classification)

    try:
        run_session(settings, service, echo=typer.echo)
    except RankFailed as exc:  # --nproc: a rank failed or died; rank 0 wrote what was consistent
        typer.echo(f"error: {exc}; restart with the same --out to resume (particles not in the map are read again)",
                   err=True)
        raise typer.Exit(code=1) from None
    except RuntimeError as exc:  # the pipeline failed after writing what it had: status 1
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None

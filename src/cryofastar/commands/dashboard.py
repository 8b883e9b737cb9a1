"""``cryofastar-stream dashboard``: serve the live web dashboard of a running daemon.

Example usage::

    cryofastar-stream dashboard --connect tcp://127.0.0.1:5555 --port 8080
    cryofastar-stream --watch /data/session42 --dashboard-port 8080    # daemon and dashboard together
    ssh -L 8080:127.0.0.1:8080 scope-pc                                 # then open http://127.0.0.1:8080/

The options are the fields of :class:`~cryofastar.monitoring.dashboard_process.DashboardSettings`;
the page is described in docs/monitoring.md.
"""

from __future__ import annotations

import typer

from cryofastar.monitoring.dashboard_process import DashboardSettings, serve_dashboard
from cryofastar.options import settings_command

__all__ = ["dashboard"]


@settings_command(DashboardSettings)
def dashboard(settings: DashboardSettings) -> None:
    """Serve a live web dashboard of a running daemon (map, FSC, throughput, views; docs/monitoring.md)."""
    serve_dashboard(settings, echo=typer.echo)

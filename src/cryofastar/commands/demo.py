"""``cryofastar-stream demo``: a simulated microscope session with the daemon on it, shown live.

The options are the fields of :class:`~cryofastar.daemon.settings.DemoSettings`; the demo
is :func:`~cryofastar.services.demo.run_demo` (which prints its live table and figures
through ``typer.echo``).

Example usage::

    cryofastar-stream demo                      # a few minutes on a laptop CPU
    cryofastar-stream demo --out demo/ --n 10000 --rate 200
"""

from __future__ import annotations

import typer

from cryofastar.options import settings_command
from cryofastar.services.settings import DemoSettings

__all__ = ["demo"]


@settings_command(DemoSettings)  # ParticleFileError is a ValueError, PublisherError an OSError
def demo(settings: DemoSettings) -> None:
    """Simulate a live microscope session and run the daemon on it (the README's first command)."""
    from cryofastar.services.demo import run_demo  # the pipeline: loaded only when it runs

    try:
        run_demo(settings, echo=typer.echo)
    except RuntimeError as exc:  # the microscope or the pipeline failed: status 1
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None

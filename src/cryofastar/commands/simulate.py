"""``cryofastar-stream simulate``: a simulated microscope session, a RELION 3.1 particle set with true poses.

The options are the fields of :class:`~cryofastar.recon.simulate.SimulateSettings`;
the simulation is :func:`~cryofastar.recon.simulate.run_simulation`.

Example usage::

    cryofastar-stream simulate --out session --n 2000 --box 64 --apix 2.0 --snr 0.1
    cryofastar-stream simulate --out live --rate 200 --per-stack 100   # stacks appear over time
    cryofastar-stream simulate --out s2 --structure 1abc.cif --ctf
"""

from __future__ import annotations

import typer

from cryofastar.options import settings_command
from cryofastar.recon.simulate import SimulateSettings, run_simulation

__all__ = ["simulate"]


@settings_command(SimulateSettings)  # ParticleFileError is a ValueError
def simulate(settings: SimulateSettings) -> None:
    """Simulate a microscope session as a RELION 3.1 particle set with its true poses."""
    star = run_simulation(settings)
    typer.echo(f"wrote {settings.n} particles to {star} (true map: {star.parent / 'reference.mrc'})")

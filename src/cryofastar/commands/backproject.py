"""Reconstruct a map from the poses in a RELION particle STAR file (relion_reconstruct).

Example usage::

    cryofastar-stream backproject session/particles.star -o map.mrc --half-maps

The options are the fields of :class:`~cryofastar.recon.backprojection.BackprojectSettings`;
the job is :func:`~cryofastar.recon.backprojection.backproject_particles`.
"""

from __future__ import annotations

import typer

from cryofastar.options import settings_command
from cryofastar.recon.backprojection import BackprojectSettings, backproject_particles
from cryofastar.recon.fsc import resolution_text

__all__ = ["backproject"]


@settings_command(BackprojectSettings)
def backproject(settings: BackprojectSettings) -> None:
    """Reconstruct a map from the poses in a particle STAR file; print the half-map FSC resolution.

    Writes MAP.mrc (both half sets), MAP_half1/2.mrc with --half-maps, and MAP_fsc.tsv
    (per shell: resolution in Å, half-map FSC, and the FSC against --reference if given).
    """
    s = settings
    result = backproject_particles(s)
    typer.echo(
        f"{result.n_particles} particles (half sets {result.half_counts[0]}/{result.half_counts[1]}) "
        f"in {result.seconds:.1f} s; half-map FSC 0.143 resolution {resolution_text(result.resolution_angstrom)}"
    )
    if result.known_map_resolution_angstrom is not None:
        typer.echo(f"FSC 0.5 resolution against {s.known_map}: "
                   f"{resolution_text(result.known_map_resolution_angstrom)}")
    for path in result.outputs:
        typer.echo(f"wrote {path}")

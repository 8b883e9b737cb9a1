"""``cryofastar-stream classify``: reference-free 2D classification of a RELION particle set.

Example usage::

    cryofastar-stream classify session/particles.star -o classes/
    cryofastar-stream classify session/particles.star -o classes/ --classes 100 --diameter 180

The options are the fields of :class:`~cryofastar.engine.classification.ClassifyJob` and
:class:`~cryofastar.engine.classification.ClassifySettings`; the job is
:func:`cryofastar.engine.classification.classify` (steps and outputs in its module
docstring). This command adds a progress bar and prints the figures.
"""

from __future__ import annotations

import math

import typer

from cryofastar.engine.classification import ClassifyJob, ClassifyResult, ClassifySettings
from cryofastar.engine.classification import classify as run
from cryofastar.options import settings_command
from cryofastar.recon.fsc import resolution_text

from .progress import ProgressBar

__all__ = ["classify", "summary"]


@settings_command(ClassifyJob, ClassifySettings)  # ParticleFileError is a ValueError
def classify(job: ClassifyJob, settings: ClassifySettings) -> None:
    """2D classes: align every particle to class averages over rotation and shift, soft assignment, junk flagged."""
    bar = ProgressBar("classifying") if job.progress else None
    try:
        result = run(job.particles, job.out, settings, progress=bar)
    finally:
        if bar is not None:
            bar.stop()
    for line in summary(result):
        typer.echo(line)


def summary(result: ClassifyResult) -> list[str]:
    """The lines the command prints: particles, rate, classes kept and flagged, the files written."""
    c = result.classes
    junk = int(c.junk.sum())
    good = ~c.junk & (c.counts > 0)
    kept = float(c.counts[good].sum() / c.counts.sum()) if float(c.counts.sum()) > 0 else 0.0
    res = c.resolution_angstrom[good]
    best = float(res.min()) if res.numel() else math.inf
    lines = [f"{result.n_particles} particles in {c.counts.numel()} classes in {result.seconds:.1f} s "
             f"({result.rate:.0f} alignments/s, {result.alignments} in all); particle diameter "
             f"{result.diameter_angstrom:.0f} Å",
             f"{junk} classes flagged as junk; the others hold {100 * kept:.0f}% of the particles; best class "
             f"resolution {resolution_text(best if math.isfinite(best) else None)}",
             f"{result.junk_particles} of {result.n_particles} particles flagged as junk (all their classes are)"]
    return lines + [f"wrote {path}" for path in result.outputs]

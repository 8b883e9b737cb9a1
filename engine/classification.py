"""2D classification of a particle set: the policy both the offline ``classify`` job and the daemon's 2D lane follow.

:class:`ClassificationPolicy` decides how the work is shared between new particles and
re-alignment of older ones (RELION's iterations, done incrementally): after each batch
of ``n`` new particles, up to ``revisits_per_new * n`` particles that are due
(``revisits_when_behind * n`` while more new particles wait)
(:meth:`~cryofastar.recon.classify2d.StreamingClassifier.due`) are aligned again. The
offline job then keeps re-aligning until every particle has been aligned ``passes``
times in all; the daemon does so while it waits for new files.

:func:`classify` is the offline job (``cryofastar-stream classify``):

1. read the STAR file (:class:`~cryofastar.recon.io.ParticleSource`; images with NaN or
   Inf pixels are reported and left out);
2. the particle diameter: ``--diameter`` or measured from the first 2,000 images;
3. stream the particles through the classifier in chunks, re-aligning as the policy says;
4. write ``class_averages.mrcs`` + ``classes.star``
   (:func:`~cryofastar.recon.io.class_files.write_class_files`) and ``particles.star``:
   the input rows with RELION's Class2D columns (``rlnClassNumber``, ``rlnAnglePsi``,
   ``rlnOriginXAngst/YAngst``, ``rlnMaxValueProbDistribution``) and our junk flag, and
   ``selected_particles.star``: the same rows without the junk (what RELION's Select job
   gives), the input of ``reconstruct`` that keeps junk out of the 3D map.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryofastar.recon.classify2d import (
    ClassifierSettings,
    ClassSet,
    StreamingClassifier,
    class_set,
    particle_columns,
)
from cryofastar.recon.io import ParticleSource
from cryofastar.recon.io.class_files import write_class_files
from cryofastar.recon.io.names import relative_image_names
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.particle_diameter import estimate_particle_diameter

from cryofastar.options import argument, option

from .star_output import optics_for_output, particles_for_output

logger = logging.getLogger(__name__)

__all__ = ["ClassificationPolicy", "Classified", "ClassifyJob", "ClassifyResult", "ClassifySettings",
           "classifier_settings", "classify", "classify_source", "write_class_set"]

Progress = Callable[[int, int], None]
"""``progress(advance, total)``: ``advance`` more alignments done of ``total`` (as ``reconstruct``'s)."""


@dataclass(frozen=True)
class ClassificationPolicy:
    """How new particles and re-alignment share the work (module docstring).

    Attributes
    ----------
    revisits_per_new: float
        Re-alignments after each batch, per new particle.
    revisits_when_behind: float
        The same while more new particles wait (a live lane that is behind spends its time on
        them first, and catches up on re-alignment when the microscope pauses).
    passes: int
        Alignments per particle the offline job completes (the first one included).
    chunk: int
        Particles per call to the classifier.
    """

    revisits_per_new: float = 1.0
    revisits_when_behind: float = 0.25
    passes: int = 4
    chunk: int = 512


@dataclass
class ClassifySettings:
    """What the 2D classification is asked for (options of ``classify`` and of ``watch``'s 2D lane)."""

    classes: int = option(50, help="Number of 2D classes.")
    diameter: float | None = option(
        None, help="Particle diameter in Å (the mask and the centring window); default: measured from the images.")
    max_shift: float | None = option(
        None, help="Largest particle displacement searched, pixels; default: 8% of the box (at least 5).")
    passes: int = option(4, help="Alignments per particle (the first included); later ones re-assign classes.")
    classify_seed: int = option(0, flags=("--classify-seed",), help="Seed of the random start of the classes.")

    def __post_init__(self) -> None:
        if self.classes < 1:
            raise ValueError(f"--classes must be at least 1, got {self.classes}")
        if self.diameter is not None and not (math.isfinite(self.diameter) and self.diameter > 0):
            raise ValueError(f"--diameter must be a positive number of Å, got {self.diameter}")
        if self.max_shift is not None and not (math.isfinite(self.max_shift) and self.max_shift >= 0):
            raise ValueError(f"--max-shift must be >= 0 pixels, got {self.max_shift}")
        if self.passes < 1:
            raise ValueError(f"--passes must be at least 1, got {self.passes}")

    @property
    def policy(self) -> ClassificationPolicy:
        return ClassificationPolicy(passes=self.passes)


@dataclass
class ClassifyJob:
    """The offline job's input and output (arguments of ``classify``)."""

    particles: Path = argument(help="RELION particle STAR file.", metavar="PARTICLES.star")
    out: Path = option(flags=("-o", "--out"), help="Output directory.")
    progress: bool = option(True, flags=("--progress/--no-progress",), help="Show a progress bar.")


@dataclass
class ClassifyResult:
    """What :func:`classify` did."""

    n_particles: int
    classes: ClassSet
    diameter_angstrom: float
    seconds: float
    alignments: int
    junk_particles: int = 0
    outputs: list[Path] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Particle alignments per second."""
        return self.alignments / self.seconds if self.seconds > 0 else math.inf


def classifier_settings(settings: ClassifySettings, box: int, apix: float, diameter_angstrom: float
                        ) -> ClassifierSettings:
    """The classifier's settings for a session of this box and pixel size."""
    shift = settings.max_shift if settings.max_shift is not None else max(5.0, round(0.08 * box))
    return ClassifierSettings(n_classes=settings.classes, diameter_angstrom=diameter_angstrom, max_shift_px=shift,
                              seed=settings.classify_seed)


def write_class_set(classes: ClassSet, out_dir: Path) -> list[Path]:
    """``class_averages.mrcs`` and ``classes.star`` of a class set in ``out_dir`` (the one writer of both)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stack, star = out_dir / "class_averages.mrcs", out_dir / "classes.star"
    write_class_files(stack, star, classes.averages, classes.apix, classes.counts.tolist(),
                      classes.resolution_angstrom.tolist(), classes.accuracy_degrees.tolist(),
                      classes.junk.tolist(), classes.junk_score.tolist())
    return [stack, star]


@dataclass
class Classified:
    """A particle set classified in memory (:func:`classify_source`).

    Attributes
    ----------
    classifier: StreamingClassifier
        The classifier, every particle aligned at least once.
    classes: ClassSet
        Its class set (averages at the particles' box, counts, junk flags).
    diameter_angstrom: float
        The particle diameter used (given or measured).
    alignments: int
        Alignments done in all.
    """

    classifier: StreamingClassifier
    classes: ClassSet
    diameter_angstrom: float
    alignments: int


def classify_source(source: ParticleSource, settings: ClassifySettings, progress: Progress | None = None
                    ) -> Classified:
    """Classify a particle set with finite images (steps 2-3 of the module docstring); write nothing.

    Raises
    ------
    ValueError
        Fewer particles than classes.
    """
    policy = settings.policy
    n = len(source)
    if n < settings.classes:
        raise ValueError(f"{n} particles cannot fill {settings.classes} classes: ask for at most {n} (--classes)")
    diameter = settings.diameter
    if diameter is None:
        sample = source.images(np.arange(min(n, 2000)))
        diameter = estimate_particle_diameter(sample.images, source.apix, sample.ctf) if n >= 2 else \
            0.8 * source.box * source.apix
        logger.info("particle diameter measured from the images: %.0f Å", diameter)
    classifier = StreamingClassifier(classifier_settings(settings, source.box, source.apix, diameter),
                                     source.box, source.apix)
    total_work = n * policy.passes
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        if progress is not None:
            progress(max(0, min(done + count, total_work) - min(done, total_work)), total_work)
        done += count

    for chunk in source.chunks(policy.chunk):
        classifier.add(chunk.images, chunk.ctf, chunk.half_sets)
        advance(len(chunk))
        advance(_revisit(classifier, source, int(policy.revisits_per_new * len(chunk))))
    classifier.begin()  # a set smaller than the random start
    while int(classifier.table.aligned_at[:n].min()) < 0 or done < total_work:
        moved = _revisit(classifier, source, min(policy.chunk, total_work - done) or policy.chunk)
        if moved == 0:
            break
        advance(moved)
    return Classified(classifier, class_set(classifier), float(diameter), done)


def classify(particles: Path, out_dir: Path, settings: ClassifySettings, progress: Progress | None = None
             ) -> ClassifyResult:
    """Run the offline job (module docstring) on ``particles``; write its outputs in ``out_dir``.

    Raises
    ------
    ValueError
        Fewer particles than classes, or a bad STAR file (:class:`~cryofastar.recon.io.ParticleFileError`).
    """
    start = time.perf_counter()
    source = ParticleSource.from_star(particles)
    source, _ = source.finite(settings.policy.chunk)
    classified = classify_source(source, settings, progress)
    classifier, classes = classified.classifier, classified.classes
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = write_class_set(classes, out_dir)
    table = source.table
    star = out_dir / "particles.star"
    columns = particle_columns(classifier, classes)
    if table is not None:
        stacks, stack_ids = np.unique(source.stacks.astype(str), return_inverse=True)
        names = relative_image_names(stacks, stack_ids, source.indices, out_dir)
        rows = particles_for_output(table, names, columns, {})
        write_particles(star, rows, optics_for_output(table))
        selected = out_dir / "selected_particles.star"
        write_particles(selected, rows[columns["rlnCryofastarJunk"] == 0], optics_for_output(table))
        outputs += [star, selected]
    junk = int(columns["rlnCryofastarJunk"].sum())
    return ClassifyResult(n_particles=len(source), classes=classes, diameter_angstrom=classified.diameter_angstrom,
                          seconds=time.perf_counter() - start, alignments=classified.alignments, junk_particles=junk,
                          outputs=outputs)


def _revisit(classifier: StreamingClassifier, source: ParticleSource, count: int) -> int:
    rows = classifier.due(count)
    if rows.size == 0:
        return 0
    chunk = source.images(rows)
    classifier.realign(rows, chunk.all_images(), chunk.ctf)
    return int(rows.size)

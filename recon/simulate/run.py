"""A simulated microscope session from its settings (``cryofastar-stream simulate``).

:class:`SimulateSettings` holds what can be set (each field's default and help text);
:func:`run_simulation` builds the molecule (a structure file, or a procedurally
generated protein-like one), its map, and writes the particle set with
:func:`~cryofastar.recon.simulate.session.write_session`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryofastar.options import option

from .atoms import load_structure
from .particles import CtfRange
from .potential import atoms_to_volume
from .procedural import procedural_molecule
from .session import write_session

logger = logging.getLogger(__name__)

__all__ = ["SimulateSettings", "run_simulation"]


@dataclass
class SimulateSettings:
    """A simulated session: molecule, particles, noise, CTF and timing.

    Attributes
    ----------
    out: Path
        Output directory (stacks, ``particles.star``, ``reference.mrc``).
    structure: Path | None
        PDB/mmCIF structure; ``None``: a procedural molecule from ``seed``.
    n, box, apix: int, int, float
        Particles, box (px, even, >= 16) and pixel size (Å).
    snr: float | None
        Signal-to-noise ratio; ``None`` (or ``no_noise``): noise-free.
    no_noise: bool
        Write noise-free particles whatever ``snr`` says.
    ctf: bool
        Apply a CTF with defocus drawn from ``defocus_min..defocus_max`` (µm).
    per_stack: int
        Particles per ``.mrcs`` stack.
    rate: float | None
        Live session: particles per second (``None``: all at once).
    seed: int
        Seed of molecule, poses and noise.
    max_shift: float
        Largest particle displacement per axis (px).
    defocus_min, defocus_max: float
        Defocus range (µm, underfocus positive).
    junk: float
        Share of the particles replaced by junk (noise boxes, carbon edges, aggregates of two,
        off-centre particles, in equal shares; :mod:`~cryofastar.recon.simulate.junk`), in [0, 1).

    Raises
    ------
    ValueError
        An odd or too small box, a pixel size <= 0, an empty defocus range or a junk share
        outside [0, 1).
    """

    out: Path = option(flags=("--out",), help="Output directory for stacks, particles.star, reference.mrc.")
    structure: Path | None = option(
        None, help="PDB/mmCIF structure; default: a procedurally generated protein-like molecule.")
    n: int = option(2000, flags=("--n",), help="Number of particles.")
    box: int = option(64, help="Box size in pixels (even).")
    apix: float = option(2.0, help="Pixel size in Å.")
    snr: float | None = option(
        0.1, help="Signal-to-noise ratio (variance of clean images / noise variance); omit with --no-noise.")
    no_noise: bool = option(False, flags=("--no-noise",), help="Write noise-free particles.")
    ctf: bool = option(False, flags=("--ctf/--no-ctf",), help="Apply a CTF (RELION formula) and write its parameters.")
    per_stack: int = option(500, help="Particles per .mrcs stack.")
    rate: float | None = option(None, help="Live session: emit stacks at this many particles per second.")
    seed: int = option(0, help="Random seed (molecule, poses, noise).")
    max_shift: float = option(4.0, help="Largest particle displacement per axis, pixels.")
    defocus_min: float = option(0.8, help="Smallest defocus, µm (underfocus positive).")
    defocus_max: float = option(2.5, help="Largest defocus, µm.")
    junk: float = option(
        0.0, help="Share of the particles replaced by junk, in [0, 1): noise boxes, carbon edges, aggregates of two "
        "particles and off-centre particles in equal shares; the truth is particles.star's "
        "rlnCryofastarSimulatedJunk (0 = particle, 1-4 = those types).")

    def __post_init__(self) -> None:
        if self.box < 16 or self.box % 2:
            raise ValueError(f"--box must be an even number of pixels >= 16, got {self.box}")
        if self.apix <= 0:
            raise ValueError(f"--apix must be positive, got {self.apix}")
        if self.defocus_min <= 0 or self.defocus_max < self.defocus_min:
            raise ValueError("defocus range must satisfy 0 < --defocus-min <= --defocus-max (µm)")
        if not 0.0 <= self.junk < 1.0:
            raise ValueError(f"--junk must be a fraction in [0, 1) (the share of particles replaced by junk), "
                             f"got {self.junk}")

    @property
    def noise_snr(self) -> float | None:
        """The SNR the particles get (``None``: noise-free)."""
        return None if self.no_noise else self.snr


def run_simulation(settings: SimulateSettings) -> Path:
    """Simulate and write the particle set; return the path of its STAR file.

    Parameters
    ----------
    settings: SimulateSettings
        What to simulate.

    Returns
    -------
    Path
        ``settings.out / "particles.star"`` (the true map is ``reference.mrc`` beside it).
    """
    s = settings
    if s.structure is not None:
        atoms = load_structure(s.structure)
        source = {"molecule": str(s.structure)}
    else:
        atoms = procedural_molecule(s.seed)
        source = {"molecule": f"procedural(seed={s.seed})"}
    radius = atoms.radius_angstrom()
    if radius > 0.5 * s.box * s.apix:
        logger.warning(
            "molecule radius %.0f Å exceeds half the box (%.0f Å): it will be cut off; "
            "use a larger --box or --apix", radius, 0.5 * s.box * s.apix,
        )
    volume = atoms_to_volume(atoms, s.box, s.apix)
    ctf_range = (
        CtfRange(defocus_min_angstrom=s.defocus_min * 1e4, defocus_max_angstrom=s.defocus_max * 1e4)
        if s.ctf else None
    )
    return write_session(
        s.out, volume, s.apix, s.n, s.noise_snr, s.seed, per_stack=s.per_stack, rate=s.rate, ctf=ctf_range,
        max_shift_px=s.max_shift, metadata=source,
        on_stack=lambda path, count: logger.info("wrote %s (%d particles)", path.name, count), junk_fraction=s.junk,
    )

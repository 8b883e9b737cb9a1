"""Simulate a microscope session: a RELION 3.1 particle set with true poses.

Example usage::

    cryofastar-stream simulate --out session --n 2000 --box 64 --apix 2.0 --snr 0.1
    cryofastar-stream simulate --out live --rate 200 --per-stack 100   # stacks appear over time
    cryofastar-stream simulate --out s2 --structure 1abc.cif --ctf
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryofastar.recon.simulate import (
    CtfRange,
    atoms_to_volume,
    load_structure,
    procedural_molecule,
    write_session,
)

logger = logging.getLogger(__name__)


def main(
    out: Path,
    structure: Path | None,
    n: int,
    box: int,
    apix: float,
    snr: float | None,
    ctf: bool,
    per_stack: int,
    rate: float | None,
    seed: int,
    max_shift: float,
    defocus_min_um: float,
    defocus_max_um: float,
) -> Path:
    """Simulate and write the set; returns the STAR path."""
    if box < 16 or box % 2:
        raise ValueError(f"--box must be an even number of pixels >= 16, got {box}")
    if apix <= 0:
        raise ValueError(f"--apix must be positive, got {apix}")
    if defocus_min_um <= 0 or defocus_max_um < defocus_min_um:
        raise ValueError("defocus range must satisfy 0 < --defocus-min <= --defocus-max (µm)")
    if structure is not None:
        atoms = load_structure(structure)
        source = {"molecule": str(structure)}
    else:
        atoms = procedural_molecule(seed)
        source = {"molecule": f"procedural(seed={seed})"}
    radius = atoms.radius_angstrom()
    if radius > 0.5 * box * apix:
        logger.warning(
            "molecule radius %.0f Å exceeds half the box (%.0f Å): it will be cut off; "
            "use a larger --box or --apix", radius, 0.5 * box * apix,
        )
    volume = atoms_to_volume(atoms, box, apix)
    ctf_range = (
        CtfRange(defocus_min_angstrom=defocus_min_um * 1e4, defocus_max_angstrom=defocus_max_um * 1e4)
        if ctf else None
    )
    return write_session(
        out, volume, apix, n, snr, seed, per_stack=per_stack, rate=rate, ctf=ctf_range,
        max_shift_px=max_shift, metadata=source,
        on_stack=lambda path, count: logger.info("wrote %s (%d particles)", path.name, count),
    )

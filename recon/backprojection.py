"""Settings of a back-projection from known poses (``cryofastar-stream backproject``).

:class:`BackprojectSettings` holds what can be set, each field's default and help text
once. The engine that reads the particles and inserts them (``main`` of
:mod:`cryofastar.commands.backproject`) takes these fields as its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryofastar.options import argument, option

__all__ = ["INTERPOLATIONS", "BackprojectSettings"]

INTERPOLATIONS = ("trilinear", "nearest")
"""Insertion kernels (:mod:`cryofastar.recon.insertion`)."""


@dataclass
class BackprojectSettings:
    """A map from the poses in a particle STAR file.

    Attributes
    ----------
    particles: Path
        RELION 3.1 (or 3.0) particle STAR file with poses.
    output: Path
        Output map; half maps and the FSC table are written beside it.
    half_maps: bool
        Also write ``MAP_half1.mrc`` and ``MAP_half2.mrc``.
    interpolation: str
        ``trilinear`` or ``nearest`` insertion.
    oversampling: int
        Fourier grid oversampling (RELION padding factor).
    batch: int
        Particles inserted per step.
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    apix: float | None
        Pixel size (Å) if the STAR file gives none.
    use_ctf: bool
        Use the CTF columns when present.
    reference: Path | None
        Known map (same box) to report the FSC-0.5 resolution against.

    Raises
    ------
    ValueError
        An unknown ``interpolation``.
    """

    particles: Path = argument(help="RELION 3.1 (or 3.0) particle STAR file with poses.")
    output: Path = option(flags=("-o", "--output"), help="Output map (.mrc).")
    half_maps: bool = option(False, flags=("--half-maps",), help="Also write MAP_half1.mrc and MAP_half2.mrc.")
    interpolation: str = option("trilinear",
                                help="Insertion kernel: trilinear (accurate) or nearest (~8x faster).")
    oversampling: int = option(2, help="Fourier grid oversampling (RELION padding factor).")
    batch: int = option(256, help="Particles inserted per step.")
    device: str = option("auto", help="auto, cpu or cuda.")
    apix: float | None = option(None, help="Pixel size in Å if the STAR file gives none.")
    use_ctf: bool = option(True, flags=("--ctf/--no-ctf",),
                           help="Use the CTF columns when present (Wiener-style insertion).")
    reference: Path | None = option(
        None, help="Known map (MRC, same box): also report the FSC-0.5 resolution against it.")

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be trilinear or nearest, got {self.interpolation!r}")

"""The maps of a reconstruction and their one writer: full map, half maps, FSC table.

Every command and the daemon write their maps through :func:`write_map_set`, so the
files have one form wherever they come from. From the volume path ``DIR/STEM.mrc``:

- ``DIR/STEM.mrc``: the map of both half sets, `(B, B, B)` [z, y, x], voxel size set;
- ``DIR/STEM_half1.mrc``, ``DIR/STEM_half2.mrc``: the half maps (optional);
- ``DIR/STEM_fsc.tsv``: one row per Fourier shell ``0 .. B // 2``: ``shell``,
  ``resolution_angstrom`` (``inf`` for DC), ``fsc_half_maps`` and, when a known map was
  given, ``fsc_vs_known`` (the map against it, no alignment).

Each file is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .accumulator import HalfSetAccumulator
from .fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from .io import read_volume, write_fsc_table, write_volume
from .io.tables import FSC_HALF_MAPS_COLUMN, FSC_KNOWN_MAP_COLUMN

__all__ = ["MapSet", "map_set", "read_known_map", "write_map_set"]



@dataclass
class MapSet:
    """A reconstruction's maps and FSC curves.

    Attributes
    ----------
    volume: torch.Tensor
        `(B, B, B)` map of both half sets [z, y, x].
    half_volumes: torch.Tensor
        `(2, B, B, B)` the half maps.
    apix: float
        Voxel size (Å).
    fsc: torch.Tensor
        `(B // 2 + 1,)` half-map FSC per shell.
    resolution_angstrom: float
        Half-map FSC = 0.143 crossing (``inf`` while undefined).
    fsc_vs_known: torch.Tensor | None
        `(B // 2 + 1,)` FSC of ``volume`` against a known map, if one was given.
    known_map_resolution_angstrom: float | None
        Its FSC = 0.5 crossing (Å).
    """

    volume: torch.Tensor
    half_volumes: torch.Tensor
    apix: float
    fsc: torch.Tensor
    resolution_angstrom: float
    fsc_vs_known: torch.Tensor | None = None
    known_map_resolution_angstrom: float | None = None

    @property
    def shell_resolutions_angstrom(self) -> torch.Tensor:
        """`(B // 2 + 1,)` resolution (Å) of each shell, ``inf`` for DC."""
        return shell_resolutions_angstrom(self.volume.shape[-1], self.apix)


def map_set(accumulator: HalfSetAccumulator, known_map: torch.Tensor | None = None) -> MapSet:
    """The maps of ``accumulator`` and their FSC curves (against ``known_map`` `(B, B, B)` too, if given)."""
    halves = accumulator.half_volumes()
    volume = accumulator.volume()
    curve = fsc(halves[0], halves[1])
    apix = accumulator.apix
    maps = MapSet(volume, halves, apix, curve, float(resolution_at_threshold(curve, apix, 0.143)))
    if known_map is not None:
        maps.fsc_vs_known = fsc(volume, known_map.to(volume.device))
        maps.known_map_resolution_angstrom = float(resolution_at_threshold(maps.fsc_vs_known, apix, 0.5))
    return maps


def write_map_set(volume_path: Path, maps: MapSet, half_maps: bool = True) -> list[Path]:
    """Write ``maps`` beside ``volume_path`` (module docstring); return the paths written, the map first."""
    volume_path = Path(volume_path)
    suffix = volume_path.suffix or ".mrc"
    written = [volume_path]
    write_volume(volume_path, maps.volume, maps.apix)
    if half_maps:
        for k in (1, 2):
            path = volume_path.with_name(f"{volume_path.stem}_half{k}{suffix}")
            write_volume(path, maps.half_volumes[k - 1], maps.apix)
            written.append(path)
    columns = {"resolution_angstrom": maps.shell_resolutions_angstrom, FSC_HALF_MAPS_COLUMN: maps.fsc}
    if maps.fsc_vs_known is not None:
        columns[FSC_KNOWN_MAP_COLUMN] = maps.fsc_vs_known
    fsc_path = volume_path.with_name(f"{volume_path.stem}_fsc.tsv")
    write_fsc_table(fsc_path, columns)
    written.append(fsc_path)
    return written



def read_known_map(path: Path | None, box: int) -> torch.Tensor | None:
    """A known map to compare with (``--reference``), checked to have the particles' ``box`` (``None`` if no path).

    Returns `(B, B, B)` float32 [z, y, x]; raises ValueError naming the option on another box.
    """
    if path is None:
        return None
    volume, _ = read_volume(path)
    if volume.shape[0] != box:
        raise ValueError(f"--reference {path} has box {volume.shape[0]} px, particles {box} px")
    return volume

"""Small tab-separated tables written beside maps (FSC curves)."""

from __future__ import annotations

import os

import torch

from .atomic import atomic_path

__all__ = ["FSC_HALF_MAPS_COLUMN", "FSC_KNOWN_MAP_COLUMN", "write_fsc_table"]

FSC_HALF_MAPS_COLUMN = "fsc_half_maps"
"""Column of the FSC between the two half maps (every FSC table the package writes has it)."""
FSC_KNOWN_MAP_COLUMN = "fsc_vs_reference"
"""Column of the FSC of the map against a known map (when one was given)."""


def write_fsc_table(path: str | os.PathLike[str], columns: dict[str, torch.Tensor]) -> None:
    """Tab-separated FSC table, written atomically: a ``shell`` column, then ``columns``, one row per shell.

    Parameters
    ----------
    path: str | os.PathLike[str]
        Output ``.tsv`` file.
    columns: dict[str, torch.Tensor]
        Column name -> `(B // 2 + 1,)` values per shell (e.g. ``resolution_angstrom``, ``inf`` for DC).
    """
    with atomic_path(path) as tmp:
        lines = ["shell\t" + "\t".join(columns)]
        for shell in range(len(next(iter(columns.values())))):
            lines.append(f"{shell}\t" + "\t".join(f"{float(c[shell]):.6g}" for c in columns.values()))
        tmp.write_text("\n".join(lines) + "\n")

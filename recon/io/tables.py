"""Small tables written beside maps: FSC curves (tab-separated) and JSON records (e.g. ab initio's verdict)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .atomic import atomic_path

__all__ = ["FSC_HALF_MAPS_COLUMN", "FSC_KNOWN_MAP_COLUMN", "write_fsc_table", "write_json"]

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


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], record: dict) -> Path:
    """Write ``record`` as indented JSON, atomically; non-finite floats become ``null``. Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n")
    return Path(path)

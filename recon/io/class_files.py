"""The files of a 2D class set: an MRC stack of averages and a RELION-style class table.

One writer for every producer (the offline ``classify`` job, the daemon's 2D lane, the
reference subscriber). ``classes.star`` holds one ``data_model_classes`` table, the
block RELION's ``*_model.star`` uses for classes, so ``relion_display`` and cryoSPARC's
import read it: ``rlnReferenceImage`` (``NNNNNN@stack``, the stack named relative to
the table), ``rlnClassNumber`` (1-based), ``rlnClassDistribution`` (fraction of the
particles), ``rlnEstimatedResolution`` (Å) and ``rlnAccuracyRotations`` (degrees; both
999 where undefined, as RELION writes them), then ours: ``rlnCryofastarParticleCount``
(sum of membership weights), ``rlnCryofastarJunk`` (0/1) and
``rlnCryofastarJunkScore`` (0..1, higher = more likely junk).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import starfile
import torch

from .atomic import atomic_path
from .mrc import write_stack

__all__ = ["CLASS_STAR_COLUMNS", "UNDEFINED_STAR_VALUE", "write_class_files"]

CLASS_STAR_COLUMNS = ("rlnReferenceImage", "rlnClassNumber", "rlnClassDistribution", "rlnEstimatedResolution",
                      "rlnAccuracyRotations", "rlnCryofastarParticleCount", "rlnCryofastarJunk",
                      "rlnCryofastarJunkScore")
"""Columns of ``data_model_classes``, in order (module docstring)."""

UNDEFINED_STAR_VALUE = 999.0
"""RELION's value for an undefined resolution or accuracy."""


def _defined(values: Sequence[float | None]) -> list[float]:
    return [UNDEFINED_STAR_VALUE if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def write_class_files(stack_path: str | os.PathLike[str], star_path: str | os.PathLike[str], averages: torch.Tensor,
                      apix: float, counts: Sequence[float], resolution_angstrom: Sequence[float | None],
                      accuracy_degrees: Sequence[float | None], junk: Sequence[bool],
                      junk_score: Sequence[float], numbers: Sequence[int] | None = None) -> None:
    """Write the averages and their table, each atomically (the stack first, so a table never names a missing one).

    Parameters
    ----------
    stack_path, star_path: str | os.PathLike[str]
        The ``.mrcs`` stack and the ``.star`` table.
    averages: torch.Tensor
        `(K, B, B)` class averages [class, y, x] in class order (class ``k`` is row ``k + 1``).
    apix: float
        Pixel size of the averages, Å.
    counts, resolution_angstrom, accuracy_degrees, junk, junk_score: Sequence
        One value per class (``None``/NaN/inf resolution or accuracy: undefined).
    numbers: Sequence[int] | None
        The class numbers (``rlnClassNumber``) of the rows; ``None``: 1 .. K.
    """
    k = int(averages.shape[0])
    numbers = list(range(1, k + 1)) if numbers is None else [int(n) for n in numbers]
    for name, values in (("counts", counts), ("resolution", resolution_angstrom), ("accuracy", accuracy_degrees),
                         ("junk", junk), ("junk scores", junk_score), ("class numbers", numbers)):
        if len(values) != k:
            raise ValueError(f"{len(values)} {name} for {k} class averages")
    stack_path, star_path = Path(stack_path), Path(star_path)
    write_stack(stack_path, averages.detach().to(torch.float32).cpu(), apix)
    total = float(sum(float(c) for c in counts))
    relative = os.path.relpath(stack_path, star_path.parent)
    table = pd.DataFrame({
        "rlnReferenceImage": [f"{row + 1:06d}@{relative}" for row in range(k)],
        "rlnClassNumber": numbers,
        "rlnClassDistribution": [float(c) / total if total > 0 else 0.0 for c in counts],
        "rlnEstimatedResolution": _defined(resolution_angstrom),
        "rlnAccuracyRotations": _defined(accuracy_degrees),
        "rlnCryofastarParticleCount": [float(c) for c in counts],
        "rlnCryofastarJunk": [int(bool(j)) for j in junk],
        "rlnCryofastarJunkScore": [float(s) for s in junk_score],
    }, columns=list(CLASS_STAR_COLUMNS))
    with atomic_path(star_path) as tmp:
        starfile.write({"model_classes": table}, tmp, overwrite=True)

"""The particle STAR file an offline job writes: the input's rows and optics with the job's new columns.

Shared by ``reconstruct`` (poses) and ``classify`` (classes and 2D poses), so both keep
every input column, move optics values to the optics block and drop RELION 3.0 pixel
origins the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from cryofastar.recon.io.star import ParticleTable

__all__ = ["optics_for_output", "particles_for_output"]


def optics_for_output(table: ParticleTable) -> pd.DataFrame:
    """The optics block of an output STAR file: the input's, or one built from its particle columns (RELION 3.0)."""
    if table.optics is not None:
        return table.optics
    optics = {"rlnOpticsGroup": [1], "rlnImagePixelSize": [table.apix], "rlnImageSize": [table.box],
              "rlnImageDimensionality": [2]}
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if column in table.particles.columns:
            optics[column] = [float(table.particles[column].iloc[0])]
    return pd.DataFrame(optics)


def particles_for_output(table: ParticleTable, image_names: list[str], poses: dict[str, np.ndarray],
                          extra: dict[str, np.ndarray]) -> pd.DataFrame:
    """The input rows (optics values moved to the optics block, RELION 3.0 origins dropped) with the new poses."""
    merged = set(table.optics.columns) - {"rlnOpticsGroup"} if table.optics is not None else set()
    rows = table.particles.drop(columns=[c for c in table.particles.columns if c in merged])
    rows = rows.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in rows.columns])
    if "rlnOpticsGroup" not in rows.columns:
        rows = rows.assign(rlnOpticsGroup=1)
    return rows.assign(rlnImageName=image_names, **poses, **extra)

"""Write a simulated microscope session as a RELION 3.1 particle set.

Layout of the output directory::

    reference.mrc            the true map the particles were projected from
    particles_00001.mrcs     stacks of ``per_stack`` particles, in order
    ...
    particles.star           data_optics + data_particles with the true poses
    simulation.json          what was simulated (molecule, SNR, seed, ...)

Every file is written under a temporary dot-name and renamed into place, so a
directory watcher only ever sees complete files. With ``rate`` (particles/s) the
stacks appear one by one over time, like a live session; ``particles.star``
(which names every stack) is written once all stacks exist.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..io import write_particles, write_stack, write_volume
from .particles import CtfRange, SimulatedParticles, simulate_particles

__all__ = ["write_session"]


def _particle_rows(sim: SimulatedParticles, stack_name: str, optics_group: int = 1) -> pd.DataFrame:
    n = sim.images.shape[0]
    rows = {
        "rlnImageName": [f"{i:06d}@{stack_name}" for i in range(1, n + 1)],
        "rlnAngleRot": sim.angles_degrees[:, 0].numpy(),
        "rlnAngleTilt": sim.angles_degrees[:, 1].numpy(),
        "rlnAnglePsi": sim.angles_degrees[:, 2].numpy(),
        "rlnOriginXAngst": sim.origins_angstrom[:, 0].numpy(),
        "rlnOriginYAngst": sim.origins_angstrom[:, 1].numpy(),
    }
    if sim.ctf is not None:
        rows["rlnDefocusU"] = sim.ctf.defocus_u_angstrom.numpy()
        rows["rlnDefocusV"] = sim.ctf.defocus_v_angstrom.numpy()
        rows["rlnDefocusAngle"] = sim.ctf.defocus_angle_degrees.numpy()
        rows["rlnPhaseShift"] = sim.ctf.phase_shift_degrees.numpy()
    rows["rlnOpticsGroup"] = np.full(n, optics_group)
    return pd.DataFrame(rows)


def _optics_table(box: int, apix: float, ctf: CtfRange) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [ctf.voltage_kv],
            "rlnSphericalAberration": [ctf.spherical_aberration_mm],
            "rlnAmplitudeContrast": [ctf.amplitude_contrast],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )


def write_session(
    out_dir: str | os.PathLike[str],
    volume: torch.Tensor,
    apix: float,
    n_particles: int,
    snr: float | None,
    seed: int,
    per_stack: int = 500,
    rate: float | None = None,
    ctf: CtfRange | None = None,
    max_shift_px: float = 4.0,
    metadata: dict[str, object] | None = None,
    on_stack: Callable[[Path, int], None] | None = None,
) -> Path:
    """Simulate and write a particle set; returns the path of ``particles.star``.

    Parameters
    ----------
    out_dir: str | os.PathLike[str]
        Output directory (created).
    volume: torch.Tensor
        `(B, B, B)` true map.
    apix: float
        Pixel size in Å.
    n_particles: int
        Number of particles.
    snr: float | None
        Signal-to-noise ratio (``None``: noise-free).
    seed: int
        Seed of every random draw.
    per_stack: int
        Particles per ``.mrcs`` stack.
    rate: float | None
        Particles per second to emit (live session); ``None``: as fast as possible.
    ctf: CtfRange | None
        CTF distribution (``None``: no CTF).
    max_shift_px: float
        Largest displacement per axis in pixels.
    metadata: dict[str, object] | None
        Extra entries for ``simulation.json``.
    on_stack: Callable[[Path, int], None] | None
        Called after each stack is in place with its path and particle count.
    """
    if n_particles < 1 or per_stack < 1:
        raise ValueError("n and per-stack must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = int(volume.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    write_volume(out / "reference.mrc", volume, apix)

    noise_sigma = 0.0
    if snr is not None and math.isfinite(snr):
        # One noise level for the whole session, from a probe of 64 particles.
        probe = simulate_particles(volume, 64, apix, snr, torch.Generator().manual_seed(seed + 1),
                                   max_shift_px=max_shift_px, ctf=ctf)
        noise_sigma = probe.noise_sigma

    tables = []
    start = time.monotonic()
    n_stacks = math.ceil(n_particles / per_stack)
    for k in range(n_stacks):
        count = min(per_stack, n_particles - k * per_stack)
        sim = simulate_particles(volume, count, apix, None, generator, max_shift_px=max_shift_px,
                                 ctf=ctf, noise_sigma=noise_sigma)
        name = f"particles_{k + 1:05d}.mrcs"
        if rate is not None:
            due = start + (k * per_stack + count) / rate
            time.sleep(max(0.0, due - time.monotonic()))
        write_stack(out / name, sim.images, apix)
        tables.append(_particle_rows(sim, name))
        if on_stack is not None:
            on_stack(out / name, count)

    star = out / "particles.star"
    write_particles(star, pd.concat(tables, ignore_index=True), _optics_table(box, apix, ctf or CtfRange()))
    info = {
        "n_particles": n_particles, "box": box, "apix_angstrom": apix, "snr": snr,
        "noise_sigma": noise_sigma, "seed": seed, "per_stack": per_stack, "rate": rate,
        "max_shift_px": max_shift_px, "ctf": asdict(ctf) if ctf is not None else None,
        **(metadata or {}),
    }
    (out / "simulation.json").write_text(json.dumps(info, indent=2) + "\n")
    return star

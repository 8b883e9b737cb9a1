"""Write a simulated microscope session as a RELION 3.1 particle set.

Layout of the output directory::

    reference.mrc            the true map the particles were projected from
    particles_00001.mrcs     stacks of ``per_stack`` particles, in order
    ...
    particles.star           data_optics + data_particles with the true poses
    simulation.json          what was simulated (molecule, SNR, seed, junk, ...)

Every file is written under a temporary dot-name and renamed into place, so a
directory watcher only ever sees complete files. With ``rate`` (particles/s) the
stacks appear one by one over time, like a live session; ``particles.star``
(which names every stack) is written once all stacks exist.

Junk (``junk_fraction > 0``; :mod:`~cryofastar.recon.simulate.junk`): a seeded set of
``round(junk_fraction * n_particles)`` slots, spread over the whole session, holds junk
instead of particles, the four types in equal shares (counts differ by at most one, in the
order of :data:`~cryofastar.recon.simulate.junk.JUNK_TYPES`). Slots, types and junk images
come from their own generator (seeded from ``seed`` and :data:`JUNK_STREAM`), and every
slot's particle is still drawn from the session's generator before being replaced, so the
real particles are the very images of the junk-free session with the same seed. The noise
level stays the one the particles' probe defines. The truth is the integer column
:data:`~cryofastar.recon.io.columns.SIMULATED_JUNK_COLUMN` of ``particles.star`` (0 for a
particle, else the :class:`~cryofastar.recon.simulate.junk.JunkType`), written only when
``junk_fraction > 0``; ``simulation.json`` records the fraction and the count per type.
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

from ..ctf import CtfParams
from ..io import write_particles, write_stack, write_volume
from ..io.columns import SIMULATED_JUNK_COLUMN
from .junk import JUNK_TYPES, JunkScale, simulate_junk
from .particles import CtfRange, SimulatedParticles, simulate_particles

__all__ = ["JUNK_STREAM", "junk_slots", "write_session"]

JUNK_STREAM = 21
"""Second entropy word of the junk generator's seed (``numpy.random.SeedSequence([seed, JUNK_STREAM])``)."""


def junk_slots(n_particles: int, junk_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The `(n_particles,)` int64 :class:`~cryofastar.recon.simulate.junk.JunkType` of a session's slots: 0 or 1..4.

    ``round(junk_fraction * n_particles)`` slots, drawn without replacement, are junk; the
    ``i``-th of them drawn gets ``JUNK_TYPES[i % 4]`` (equal shares, counts differ by at most one).
    """
    if not 0.0 <= junk_fraction < 1.0:
        raise ValueError(f"junk fraction must be in [0, 1), got {junk_fraction}")
    n_junk = round(junk_fraction * n_particles)
    kinds = torch.zeros(n_particles, dtype=torch.int64)
    slots = torch.randperm(n_particles, generator=generator)[:n_junk]
    kinds[slots] = torch.tensor([int(t) for t in JUNK_TYPES], dtype=torch.int64).repeat(n_junk // 4 + 1)[:n_junk]
    return kinds


def _replace_rows(sim: SimulatedParticles, rows: torch.Tensor, junk: SimulatedParticles) -> SimulatedParticles:
    """``sim`` with its rows ``rows`` (a `(m,)` index) replaced by ``junk``'s ``m`` images, poses and CTFs."""
    def put(values: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = values.clone()
        out[rows] = new.to(out.dtype)
        return out

    ctf = None
    if sim.ctf is not None and junk.ctf is not None:
        ctf = CtfParams(**{name: None if value is None else put(value, getattr(junk.ctf, name))
                           for name, value in vars(sim.ctf).items()})
    return SimulatedParticles(
        images=put(sim.images, junk.images), rotations=put(sim.rotations, junk.rotations),
        angles_degrees=put(sim.angles_degrees, junk.angles_degrees),
        origins_angstrom=put(sim.origins_angstrom, junk.origins_angstrom), ctf=ctf, noise_sigma=sim.noise_sigma,
    )


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
    junk_fraction: float = 0.0,
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
    junk_fraction: float
        Share of the particles replaced by junk, in ``[0, 1)`` (module docstring).
    """
    if n_particles < 1 or per_stack < 1:
        raise ValueError("n and per-stack must be at least 1")
    if not 0.0 <= junk_fraction < 1.0:
        raise ValueError(f"junk fraction must be in [0, 1), got {junk_fraction}")
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

    kinds = torch.zeros(n_particles, dtype=torch.int64)
    scale = None
    if junk_fraction > 0:
        junk_seed = int(np.random.SeedSequence([seed % 2**63, JUNK_STREAM]).generate_state(1)[0])
        junk_generator = torch.Generator().manual_seed(junk_seed)
        kinds = junk_slots(n_particles, junk_fraction, junk_generator)
        scale = JunkScale.measure(volume, junk_generator)

    tables = []
    start = time.monotonic()
    n_stacks = math.ceil(n_particles / per_stack)
    for k in range(n_stacks):
        count = min(per_stack, n_particles - k * per_stack)
        sim = simulate_particles(volume, count, apix, None, generator, max_shift_px=max_shift_px,
                                 ctf=ctf, noise_sigma=noise_sigma)
        stack_kinds = kinds[k * per_stack : k * per_stack + count]
        rows = torch.nonzero(stack_kinds).reshape(-1)
        if scale is not None and rows.numel():
            junk = simulate_junk(volume, stack_kinds[rows], apix, junk_generator, scale, ctf=ctf,
                                 noise_sigma=noise_sigma, max_shift_px=max_shift_px)
            sim = _replace_rows(sim, rows, junk)
        name = f"particles_{k + 1:05d}.mrcs"
        if rate is not None:
            due = start + (k * per_stack + count) / rate
            time.sleep(max(0.0, due - time.monotonic()))
        write_stack(out / name, sim.images, apix)
        table = _particle_rows(sim, name)
        if scale is not None:
            table[SIMULATED_JUNK_COLUMN] = stack_kinds.numpy()
        tables.append(table)
        if on_stack is not None:
            on_stack(out / name, count)

    star = out / "particles.star"
    write_particles(star, pd.concat(tables, ignore_index=True), _optics_table(box, apix, ctf or CtfRange()))
    info = {
        "n_particles": n_particles, "box": box, "apix_angstrom": apix, "snr": snr,
        "noise_sigma": noise_sigma, "seed": seed, "per_stack": per_stack, "rate": rate,
        "max_shift_px": max_shift_px, "ctf": asdict(ctf) if ctf is not None else None,
        "junk_fraction": junk_fraction,
        "junk_counts": {t.name.lower(): int((kinds == t).sum()) for t in JUNK_TYPES},
        "junk_scale": asdict(scale) if scale is not None else None,
        **(metadata or {}),
    }
    (out / "simulation.json").write_text(json.dumps(info, indent=2) + "\n")
    return star

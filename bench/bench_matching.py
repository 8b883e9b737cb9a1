"""Speed and accuracy of projection matching (recon.projection_matching) at working box 64.

A benchmark, not a test. A held-out procedural molecule (seed 1,000,000,000) at box
``--box`` (2 Å/px), ``--n`` particles at SNR ``--snr``; the reference is the true map,
so the figures isolate the matcher itself:

- **local** (:func:`refine_local`, the daemon's defaults: ±10° in 5° steps, then two
  finer stages of 19 candidates; ±2 px then ±1 px shifts), starting every particle 8°
  and about 1 px away from the truth, at several band limits (the band follows the map's
  FSC resolution in use): time per particle and median error after;
- **global** (:func:`search_global`, torch-so3 grid at 15° and 10°, ±4 px shifts, band
  at 20 Å) from nothing: time per particle and median error.

    python bench/bench_matching.py
    python bench/bench_matching.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from cryofastar.recon.map_slices import MapSlicer
from cryofastar.recon.orientation_grids import global_rotation_grid, local_rotation_grid
from cryofastar.recon.projection_matching import refine_local, search_global
from cryofastar.recon.rotations import geodesic_degrees
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles


def timed(fn, device: torch.device):  # noqa: ANN001, ANN201
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--apix", type=float, default=2.0)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}; box {args.box}, {args.apix} Å/px, SNR {args.snr}, "
          f"{args.n} particles")
    volume = atoms_to_volume(procedural_molecule(1_000_000_000), args.box, args.apix)
    sim = simulate_particles(volume, args.n, args.apix, args.snr, torch.Generator().manual_seed(1), max_shift_px=3.0)
    images = sim.images.to(device)
    kicks = local_rotation_grid(8.0, 8.0)[1:7]
    start = sim.rotations @ kicks[torch.arange(args.n) % len(kicks)]
    true_px = sim.origins_angstrom / args.apix
    start_px = true_px.round() + torch.tensor([1.0, 0.0], dtype=torch.float64)
    print(f"start: median {float(geodesic_degrees(start, sim.rotations).median()):.1f}° off, "
          f"{float((start_px - true_px).norm(dim=-1).median()):.2f} px off")
    print(f"{'mode':<34}{'ms/particle':>12}{'median error °':>16}{'shift error px':>16}")
    for resolution in (16.0, 8.0, 6.0, 4.0):
        slicer = MapSlicer(volume.to(device), min(0.5, args.apix / resolution))
        refine_local(images[:64], slicer, start[:64], start_px[:64])  # warm-up
        match, seconds = timed(lambda s=slicer: refine_local(images, s, start, start_px), device)
        error = float(geodesic_degrees(match.rotations, sim.rotations).median())
        shift = float((match.origins_px - true_px).norm(dim=-1).median())
        print(f"{f'local, band {resolution:.0f} Å':<34}{1000 * seconds / args.n:>12.2f}{error:>16.2f}{shift:>16.2f}")
    for step in (15.0, 10.0):
        grid = global_rotation_grid(step)
        slicer = MapSlicer(volume.to(device), args.apix / 20.0)
        n = min(args.n, 256)
        match, seconds = timed(lambda g=grid, s=slicer, n=n: search_global(images[:n], s, g, max_shift_px=4), device)
        error = float(geodesic_degrees(match.rotations, sim.rotations[:n]).median())
        shift = float((match.origins_px - true_px[:n]).norm(dim=-1).median())
        print(f"{f'global {step:.0f}° ({len(grid)} orientations), 20 Å':<34}{1000 * seconds / n:>12.2f}"
              f"{error:>16.2f}{shift:>16.2f}")


if __name__ == "__main__":
    main()

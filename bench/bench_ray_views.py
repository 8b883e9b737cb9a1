"""Speed and agreement of the ray-view simulator (recon.simulate.ray_views) against the real-space path.

A benchmark, not a test. A procedural molecule (seed ``--seed``) filling 60 % of the box
``--box``; ``--views`` SO(3)-uniform views with ``--rays`` rays of ``--radii`` radii out to
``--fraction`` of Nyquist, CTF (``CtfRange()`` defaults), displacements up to 4 px, noise at
SNR 0.1. Prints

- **speed** (views/s, best of ``--repeats``): ``simulate_ray_views`` (``"grid"`` and ``"rays"``),
  ``simulate_ray_sets`` over ``--sets`` maps of ``--views / --sets`` views each, and the real path
  ``simulate_particles`` + ``image_rays``;
- **agreement** with ``image_rays(simulate_particles(...))`` at the same poses, displacements and
  CTF parameters: correlation and amplitude ratio of the clean rays (no shift; shifts; shifts and
  CTF), the noise sigma at SNR 0.1 (without and with CTF), and the noise-only rays' variance per
  radius against ``image_rays`` of white-noise images.

    python bench/bench_ray_views.py                 # 2 threads, box 64
    python bench/bench_ray_views.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import (
    CtfRange,
    RayVolume,
    atoms_to_volume,
    procedural_molecule,
    simulate_particles,
    simulate_ray_sets,
    simulate_ray_views,
)


def best_rate(fn: Callable[[], object], n: int, repeats: int, device: torch.device) -> float:
    """Views per second of the fastest of ``repeats`` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.complex128), b.to(torch.complex128)
    return float((a.conj() * b).sum().real / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--views", type=int, default=500)
    parser.add_argument("--rays", type=int, default=96)
    parser.add_argument("--radii", type=int, default=24)
    parser.add_argument("--fraction", type=float, default=0.75)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = (args.rays, args.radii, args.fraction)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}; box {args.box}, {args.views} views, "
          f"L={args.rays}, R={args.radii}, max radius {args.fraction} Nyquist, load {os.getloadavg()[0]:.1f}")

    atoms = procedural_molecule(args.seed)
    apix = 2.0 * max(atoms.radius_angstrom(), 5.0) / (0.6 * args.box)
    volume = atoms_to_volume(atoms, args.box, apix)
    t0 = time.perf_counter()
    ray_volume = RayVolume(volume.to(device))
    print(f"RayVolume: {1e3 * (time.perf_counter() - t0):.0f} ms per map ({apix:.2f} Å/px)")

    generator = torch.Generator(device=device).manual_seed(0)
    rotations = random_rotations(args.views, torch.Generator().manual_seed(0))
    ctf = CtfRange().sample(args.views, torch.Generator().manual_seed(1))
    print("\nspeed (views/s, CTF, shifts up to 4 px, noise at SNR 0.1)")
    for sampling in ("grid", "rays"):
        rate = best_rate(lambda s=sampling: simulate_ray_views(
            ray_volume, rotations, *shape, apix, generator, max_shift_px=4.0, ctf=ctf, snr=0.1, sampling=s),
            args.views, args.repeats, device)
        print(f"  simulate_ray_views, {sampling!r:7}: {rate:8.0f}")
    per_set = args.views // args.sets
    maps = [ray_volume] + [RayVolume(atoms_to_volume(procedural_molecule(args.seed + s), args.box, apix).to(device))
                           for s in range(1, args.sets)]
    stacked = RayVolume.stack(maps)
    set_rotations = random_rotations(args.sets * per_set, torch.Generator().manual_seed(2)).reshape(
        args.sets, per_set, 3, 3)
    set_ctf = CtfRange().sample(args.sets * per_set, torch.Generator().manual_seed(3))
    for name, volumes in (("stacked", stacked), ("list", maps)):
        rate = best_rate(lambda v=volumes: simulate_ray_sets(
            v, set_rotations, *shape, apix, generator, max_shift_px=4.0, ctf=set_ctf, snr=0.1),
            args.sets * per_set, args.repeats, device)
        print(f"  simulate_ray_sets, {args.sets} maps x {per_set} views ({name}): {rate:8.0f}")
    volume_cpu, generator_cpu = volume.cpu(), torch.Generator().manual_seed(0)
    rate = best_rate(lambda: image_rays(simulate_particles(
        volume_cpu, args.views, apix, 0.1, generator_cpu, max_shift_px=4.0, ctf=CtfRange(),
        rotations=rotations).images.to(device), *shape), args.views, max(1, args.repeats - 1), device)
    print(f"  simulate_particles + image_rays:  {rate:8.0f}")

    print("\nagreement with image_rays(simulate_particles(...)) at the same poses, shifts, CTF "
          "(correlation, amplitude ratio ray simulator / real path)")
    n = min(args.views, 200)
    for label, shift, ctf_range in (("clean", 0.0, None), ("shifts", 4.0, None), ("shifts + CTF", 4.0, CtfRange())):
        sim = simulate_particles(volume_cpu, n, apix, None, torch.Generator().manual_seed(4), max_shift_px=shift,
                                 ctf=ctf_range)
        reference = image_rays(sim.images, *shape)
        figures = []
        for sampling in ("grid", "rays"):
            out = simulate_ray_views(ray_volume, sim.rotations, *shape, apix, generator,
                                     shifts_px=-sim.origins_angstrom / apix, ctf=sim.ctf, sampling=sampling)
            clean = out.clean.cpu()
            ratio = float(clean.norm() / reference.norm())
            figures.append(f"{sampling} {correlation(clean, reference):.5f} / {ratio:.4f}")
        print(f"  {label:13}: " + ",  ".join(figures))
    for label, ctf_range in (("no CTF", None), ("CTF", CtfRange())):
        sim = simulate_particles(volume_cpu, n, apix, 0.1, torch.Generator().manual_seed(5), max_shift_px=4.0,
                                 ctf=ctf_range)
        out = simulate_ray_views(ray_volume, sim.rotations, *shape, apix, generator,
                                 shifts_px=-sim.origins_angstrom / apix, ctf=sim.ctf, snr=0.1)
        print(f"  sigma at SNR 0.1, {label:6}: ray simulator {float(out.noise_sigma):.5f}, "
              f"simulate_particles {sim.noise_sigma:.5f}, ratio {float(out.noise_sigma) / sim.noise_sigma:.5f}")
    n_noise = 6000
    out = simulate_ray_views(ray_volume, random_rotations(n_noise, torch.Generator().manual_seed(6)), *shape, apix,
                             generator, noise_sigma=1.0)
    noise = (out.rays - out.clean).cpu()
    reference = image_rays(torch.randn(n_noise, args.box, args.box, generator=torch.Generator().manual_seed(7)), *shape)
    ratio = noise.abs().square().mean((0, 1)) / reference.abs().square().mean((0, 1))
    print(f"  noise variance per radius / image_rays of white noise ({n_noise} views): "
          f"min {float(ratio.min()):.3f}, max {float(ratio.max()):.3f}, mean {float(ratio.mean()):.4f}")


if __name__ == "__main__":
    main()

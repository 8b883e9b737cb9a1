"""Insertion throughput of the reconstruction core (particles per second).

Prints one row per (box, interpolation): the time to insert batches of random
particles (pad, FFT, re-centre, scatter into the two half-set grids) after one
warm-up batch. Random images cost the same as real ones.

    python bench/bench_backproject.py                 # CPU, boxes 64 128 256
    python bench/bench_backproject.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.rotations import random_rotations


def bench(box: int, interpolation: str, batch: int, batches: int, device: str, ctf: bool) -> float:
    g = torch.Generator().manual_seed(0)
    acc = HalfSetAccumulator(box, 1.0, interpolation=interpolation, device=device)
    images = torch.randn(batch, box, box, generator=g)
    rotations = random_rotations(batch, g)
    shifts = torch.randn(batch, 2, generator=g)
    halves = 1 + torch.arange(batch) % 2
    params = None
    if ctf:
        from cryofastar.recon.simulate import CtfRange

        params = CtfRange().sample(batch, g)
    acc.add(images, rotations, shifts, halves, params)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        acc.add(images, rotations, shifts, halves, params)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--interpolations", nargs="+", default=["nearest", "trilinear"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=4.0, help="rough time budget per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ctf", action="store_true", help="Wiener-style insertion with CTF")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"{'box':>5} {'interpolation':>13} {'batch':>6} {'particles/s':>12}")
    for box in args.boxes:
        for interpolation in args.interpolations:
            probe = bench(box, interpolation, args.batch, 1, args.device, args.ctf)
            batches = max(1, int(args.seconds * probe / args.batch))
            rate = bench(box, interpolation, args.batch, batches, args.device, args.ctf)
            print(f"{box:>5} {interpolation:>13} {args.batch:>6} {rate:>12.0f}", flush=True)


if __name__ == "__main__":
    main()

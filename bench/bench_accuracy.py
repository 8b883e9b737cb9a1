"""Reconstruction accuracy from true poses, on particles made by an independent simulator.

The particles are made here, not by cryofastar's simulator: each is the map
rotated in real space (trilinear ``grid_sample`` at ``A.T @ (x, y, z)``, RELION's
rule) and summed along z, displaced by up to ``--max-shift`` px (real-space
bicubic shift), with the RELION origin ``-d * apix`` recorded. The map is a
procedurally generated molecule (a seed the training set does not use by default).
Reconstructions compared against the true map:

- ``cryofastar trilinear`` / ``cryofastar nearest``: :class:`HalfSetAccumulator`;
- ``plain inversion``: torch-fourier-slice's ``backproject_2d_to_3d`` recipe (its
  ``insert_central_slices_rfft_3d``, trilinear, 2x padding, weights clamped at 1,
  sinc^2 correction) on the re-centred images, run in batches (all at once needs
  more than 24 GB at box 128).

Prints the FSC with the true map at fractions of Nyquist, the FSC-0.5 resolution (Å)
and the minimum FSC up to 0.9 x Nyquist.

    python bench/bench_accuracy.py --box 128 --n 3000                 # noise-free
    python bench/bench_accuracy.py --box 128 --n 5000 --snr 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from cryofastar.recon import HalfSetAccumulator, fsc, resolution_at_threshold
from cryofastar.recon.fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from torch_fourier_slice import insert_central_slices_rfft_3d
from torch_fourier_slice.volume_utils import separable_sinc2_correction


def project_real_space(volume: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """`(n, B, B)` rotate-and-sum projections (RELION: map sampled at A.T @ (x, y, z))."""
    box = volume.shape[-1]
    c = (torch.arange(box, dtype=torch.float32) - box // 2)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    xyz = torch.stack([x, y, z], -1).reshape(-1, 3)  # image (x, y) and depth z
    out = []
    for m in matrices.float():
        p = xyz @ m  # rows: (A.T @ v).T = v.T @ A
        # grid_sample (align_corners=False): index i sits at (2i + 1) / B - 1; i = p + B//2
        grid = ((2 * p + 1) / box).reshape(1, box, box, box, 3)
        sampled = F.grid_sample(volume[None, None], grid, mode="bilinear", align_corners=False,
                                padding_mode="zeros")
        out.append(sampled[0, 0].sum(0))
    return torch.stack(out)


def shift_real_space(images: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Move image content by +d px (x, y) with bicubic real-space interpolation."""
    n, box, _ = images.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -d.float() * 2 / box  # sample at r - d
    grid = F.affine_grid(theta, [n, 1, box, box], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bicubic", align_corners=False, padding_mode="zeros")[:, 0]


def plain_inversion(images: torch.Tensor, matrices: torch.Tensor, origins_px: torch.Tensor) -> torch.Tensor:
    """torch-fourier-slice's backproject_2d_to_3d, accumulated over batches of 64."""
    box = images.shape[-1]
    size = 2 * box
    p = box // 2
    data = weights = None
    for start in range(0, images.shape[0], 64):
        sl = slice(start, start + 64)
        recentred = irfft2_centered(phase_shift_rfft2(rfft2_centered(images[sl]), origins_px[sl], box), box)
        padded = F.pad(recentred, [p] * 4)
        dft = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(padded, dim=(-2, -1)), dim=(-2, -1)), dim=(-2,))
        d, w = insert_central_slices_rfft_3d(dft, (size, size, size), matrices[sl].transpose(-1, -2).float())
        data = d if data is None else data + d
        weights = w if weights is None else weights + w
    dft = data / torch.clamp(weights, min=1.0)
    dft = torch.fft.ifftshift(dft, dim=(-3, -2))
    vol = torch.fft.fftshift(torch.fft.irfftn(dft, dim=(-3, -2, -1), s=(size,) * 3), dim=(-3, -2, -1))
    vol = vol / separable_sinc2_correction(vol.shape)
    return vol[p:-p, p:-p, p:-p].real.contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--snr", type=float, default=None)
    parser.add_argument("--max-shift", type=float, default=4.0)
    parser.add_argument("--molecule-seed", type=int, default=900001)
    parser.add_argument("--no-plain", action="store_true", help="skip the (slow) plain inversion")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(12345)
    box, apix = args.box, args.apix
    volume = atoms_to_volume(procedural_molecule(args.molecule_seed), box, apix)
    t0 = time.perf_counter()
    matrices = random_rotations(args.n, g)
    d = (torch.rand(args.n, 2, generator=g, dtype=torch.float64) * 2 - 1) * args.max_shift
    images = []
    for start in range(0, args.n, 64):
        sl = slice(start, start + 64)
        images.append(shift_real_space(project_real_space(volume, matrices[sl]), d[sl]))
    images = torch.cat(images)
    if args.snr is not None:
        sigma = math.sqrt(float(images.var(dim=(-2, -1)).mean()) / args.snr)
        images = images + sigma * torch.randn(images.shape, generator=g)
    origins = -d * apix
    halves = 1 + torch.arange(args.n) % 2
    print(f"# box {box}, {apix} Å/px, {args.n} particles, SNR {args.snr or 'inf'}, shifts ±{args.max_shift} px; "
          f"simulated in {time.perf_counter() - t0:.0f} s")
    fractions = [0.5, 0.7, 0.8, 0.9, 1.0]
    print(f"{'method':>22} {'seconds':>8} " + " ".join(f"FSC@{f:.1f}Nyq" for f in fractions)
          + f" {'min<=0.9Nyq':>11} {'FSC0.5 (Å)':>10}")

    def report(name: str, vol: torch.Tensor, seconds: float) -> None:
        curve = fsc(vol, volume)
        cut = int(0.9 * box / 2)
        cells = " ".join(f"{float(curve[int(round(f * box / 2))]):>11.4f}" for f in fractions)
        print(f"{name:>22} {seconds:>8.1f} {cells} {float(curve[1:cut + 1].min()):>11.4f} "
              f"{resolution_at_threshold(curve, apix, 0.5):>10.2f}", flush=True)

    for interpolation in ("trilinear", "nearest"):
        t = time.perf_counter()
        acc = HalfSetAccumulator(box, apix, interpolation=interpolation)
        for start in range(0, args.n, 256):
            sl = slice(start, start + 256)
            acc.add(images[sl], matrices[sl], origins[sl], halves[sl])
        vol = acc.volume()
        report(f"cryofastar {interpolation}", vol, time.perf_counter() - t)
    if not args.no_plain:
        t = time.perf_counter()
        report("plain inversion", plain_inversion(images, matrices, origins / apix), time.perf_counter() - t)


if __name__ == "__main__":
    main()

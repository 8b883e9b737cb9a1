"""Benchmark map-only ab initio (recon/ab_initio/): random start, projection matching only.

Per held-out asymmetric procedural molecule (evaluation seeds >= 1e9, model/TRAINING_DATA.md):
simulate ``--n`` particles (box 64, 2 Å/px, SNR ``--snr``, shifts up to 4 px, no CTF),
run :func:`run_ab_initio`, and print wall time, median geodesic pose error after global
alignment (incl. hand), and FSC-0.5 resolution against the true map (the better of the map
and its mirror) for the ab initio map and for the map from the true poses.

    .venv/bin/python bench/bench_ab_initio.py --n 10000
"""

from __future__ import annotations

import argparse
import time

import torch
from cryofastar.model.evaluation import apply_alignment_to_rotations, pose_errors
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ab_initio import AbInitioSettings, run_ab_initio
from cryofastar.recon.map_alignment import resolution_vs_known_map
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles

# held-out seeds (>= 1e9) whose molecules are monomers (no Cn symmetry): procedural.py draws
# the oligomer order right after the size; checked with the same rng sequence
SEEDS = (1_000_000_005, 1_000_000_003, 1_000_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--apix", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="settings overrides, e.g. top_k=16 batch_size=512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, value = item.split("=")
        kind = type(getattr(AbInitioSettings(), key))
        overrides[key] = (value.lower() == "true") if kind is bool else kind(value)
    settings = AbInitioSettings(**overrides)
    print(f"box {args.box}, {args.apix} Å/px, SNR {args.snr}, {args.n} particles, {args.passes} passes, "
          f"{torch.get_num_threads()} threads; {settings}")
    for seed in args.seeds:
        truth = atoms_to_volume(procedural_molecule(seed), args.box, args.apix)
        sim = simulate_particles(truth, args.n, args.apix, args.snr, torch.Generator().manual_seed(1), max_shift_px=4.0)
        halves = 1 + (torch.arange(args.n) % 2)
        t = time.perf_counter()
        def progress(label: str, poses, seen: torch.Tensor, sim=sim, t=t) -> None:
            e = pose_errors(poses.rotations[seen], sim.rotations[seen]).geodesic_degrees
            print(f"    after {label}: median error {e.median():.1f}° of {int(seen.sum())} "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)

        result = run_ab_initio(sim.images, halves, args.apix, passes=args.passes, settings=settings, seed=0,
                               callback=progress)
        wall = time.perf_counter() - t
        errors = pose_errors(result.poses.rotations, sim.rotations, result.poses.origins_angstrom / args.apix,
                             sim.origins_angstrom / args.apix)
        # the ab initio map is in its own frame: rebuild it with the poses expressed in the true
        # frame (alignment fitted by pose_errors, incl. hand), then compare with the truth
        aligned = HalfSetAccumulator(args.box, args.apix)
        aligned.add(sim.images, apply_alignment_to_rotations(result.poses.rotations, errors.alignment),
                    result.poses.origins_angstrom, halves)
        true_map = HalfSetAccumulator(args.box, args.apix)
        true_map.add(sim.images, sim.rotations, sim.origins_angstrom, halves)
        geo = errors.geodesic_degrees
        print(f"molecule {seed}: wall {wall:.1f} s ({1e3 * wall / args.n:.2f} ms/particle), "
              f"median error {geo.median():.1f}° (<15°: {100 * (geo < 15).float().mean():.0f}%), "
              f"shift error {errors.translation_px.median():.2f} px, "
              f"FSC0.5 vs truth {resolution_vs_known_map(aligned.volume(), truth, args.apix):.1f} Å "
              f"(true poses {resolution_vs_known_map(true_map.volume(), truth, args.apix):.1f} Å), "
              f"half-map FSC0.143 {result.accumulator.resolution_angstrom():.1f} Å", flush=True)
        for h in result.history:
            change = f", median change {h['median_change_degrees']:.1f}°" if "median_change_degrees" in h else ""
            change += f", restart score {h['restart_score']:.4f}" if "restart_score" in h else ""
            print(f"    {h['stage']}: band {h['band_angstrom']:.1f} Å, internal half-map FSC0.143 "
                  f"{h['half_map_fsc_angstrom']:.1f} Å, {h['seconds']:.1f} s{change}", flush=True)


if __name__ == "__main__":
    main()

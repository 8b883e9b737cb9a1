"""Held-out pose accuracy of the network: the issue's grid of SNR x views, with chance beside it.

For each held-out molecule (procedural seeds >= 1,000,000,000 and the evaluation
structures of model/TRAINING_DATA.md, never trained on) and each SNR, simulate
``--particles`` particles at box 64 (SO(3)-uniform poses, shifts up to ``--max-shift``
px, no CTF unless ``--ctf``), pose them with the network in one session frame (reference
chosen by confidence, ``views`` per pass) and report, after one global alignment
(rotation and hand):

- median and mean ‖R_pred − R_true‖_F (not squared), median geodesic angle (°),
  median translation error (px) — and the same for random poses (chance);
- FSC-0.5 resolution (Å) against the true map of maps back-projected from the aligned
  predicted poses, from the true poses (ceiling) and from random poses (floor);
- the wall time of the pose step (forward passes + Kabsch), per particle.

    python bench/eval_poses.py                                    # shipped weights, full grid
    python bench/eval_poses.py --weights run/best.safetensors --particles 500 --snr 1 --views 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cryofastar.engine.posing import NetworkPoser
from cryofastar.model.curriculum import Stage
from cryofastar.model.evaluation import apply_alignment_to_rotations, chance_level, pose_errors
from cryofastar.model.training_data import EVAL_SEED_START, sample_rotations
from cryofastar.model.weights import DEFAULT_WEIGHTS, load_model
from cryofastar.recon import HalfSetAccumulator, fsc, resolution_at_threshold
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.atoms import load_structure
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles


def held_out_molecules(n_procedural: int, n_structures: int) -> list[tuple[str, object]]:
    """(name, Atoms) of held-out molecules: procedural seeds from EVAL_SEED_START, then eval structures."""
    molecules = [(f"procedural-{EVAL_SEED_START + k}", procedural_molecule(EVAL_SEED_START + k))
                 for k in range(n_procedural)]
    if n_structures:
        from cryofastar.datasets import fetch_structures

        paths = fetch_structures("eval")
        step = max(1, len(paths) // n_structures)
        molecules += [(p.stem, load_structure(p)) for p in paths[::step][:n_structures]]
    return molecules


def map_resolution(images: torch.Tensor, rotations: torch.Tensor, origins_angstrom: torch.Tensor, apix: float,
                   truth: torch.Tensor) -> float:
    """FSC-0.5 resolution (Å) against ``truth`` of the map back-projected with these poses."""
    acc = HalfSetAccumulator(images.shape[-1], apix)
    halves = 1 + (torch.arange(len(images)) % 2)
    acc.add(images, rotations, origins_angstrom, halves)
    return resolution_at_threshold(fsc(acc.volume(), truth), apix, 0.5)


def evaluate_one(model, volume: torch.Tensor, apix: float, snr: float, views: int, n: int, max_shift: float,
                 ctf: bool, seed: int, poses: str = "full") -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    rotations = None
    if poses != "full":  # the restricted distributions of the training curriculum, for diagnosis
        rotations = sample_rotations(Stage(poses, "cone" if poses.startswith("cone") else "inplane", views=n,
                                           cone_degrees=float(poses[4:] or 0) if poses.startswith("cone") else 0.0),
                                     n, g)
    sim = simulate_particles(volume, n, apix, snr, g, max_shift_px=max_shift, ctf=CtfRange() if ctf else None,
                             rotations=rotations)
    true_rot, true_origin_px = sim.rotations, sim.origins_angstrom / apix
    t0 = time.perf_counter()
    with torch.no_grad():  # the posing recipe of reconstruct and the daemon
        poser = NetworkPoser(model, views=views)
        best = poser.choose_reference(sim.images[: min(64, n)])
        order = torch.cat([torch.arange(best), torch.arange(best + 1, n)])
        poses = poser.pose(sim.images[order], apix)
    pose_seconds = time.perf_counter() - t0
    pred_rot, pred_origin = torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64)
    pred_rot[order], pred_origin[order] = poses.rotations, poses.origins_angstrom / apix
    pred_rot[best] = torch.eye(3, dtype=torch.float64)
    pred_origin[best] = 0.0
    errors = pose_errors(pred_rot, true_rot, pred_origin, true_origin_px)
    chance = chance_level(true_rot, torch.Generator().manual_seed(seed + 1), pred_origin, true_origin_px)
    aligned = apply_alignment_to_rotations(pred_rot, errors.alignment)
    random = random_rotations(n, torch.Generator().manual_seed(seed + 2))
    res_pred = map_resolution(sim.images, aligned, pred_origin * apix, apix, volume)
    res_true = map_resolution(sim.images, true_rot, sim.origins_angstrom, apix, volume)
    res_random = map_resolution(sim.images, random, sim.origins_angstrom, apix, volume)
    return {
        "snr": snr, "views": views, "particles": n,
        "median_frobenius": errors.frobenius_median, "mean_frobenius": errors.frobenius_mean,
        "median_geodesic_deg": errors.geodesic_median_degrees,
        "median_translation_px": errors.translation_median_px,
        "chance_median_frobenius": chance.frobenius_median, "chance_mean_frobenius": chance.frobenius_mean,
        "chance_median_geodesic_deg": chance.geodesic_median_degrees,
        "chance_median_translation_px": chance.translation_median_px,
        "fsc05_predicted_A": res_pred, "fsc05_true_poses_A": res_true, "fsc05_random_poses_A": res_random,
        "mirrored": errors.alignment.mirrored, "mirrored_passes": int(poses.mirrored.sum()),
        "anchor_disagreement_deg": float(poses.anchor_disagreement_degrees.nanmean()),
        "pose_ms_per_particle": 1000 * pose_seconds / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--snr", type=float, nargs="+", default=[10.0, 1.0, 0.1])
    parser.add_argument("--views", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--procedural", type=int, default=3, help="held-out procedural molecules")
    parser.add_argument("--structures", type=int, default=2, help="held-out real structures (fetched once)")
    parser.add_argument("--max-shift", type=float, default=3.0, help="largest shift per axis, px")
    parser.add_argument("--ctf", action="store_true", help="simulate with a CTF")
    parser.add_argument("--fill", type=float, default=0.6, help="molecule diameter / box")
    parser.add_argument("--poses", default="full",
                        help="full (SO(3)-uniform, the real task), or a curriculum distribution for diagnosis: "
                             "inplane, cone30 (views within 30 degrees of one direction, any in-plane angle)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(args.weights)
    print(f"weights {args.weights}; {model.n_parameters() / 1e6:.2f} M parameters; box {model.config.box}; "
          f"{torch.get_num_threads()} CPU threads; poses {args.poses}; {args.particles} particles per row")
    rows = []
    header = (f"{'molecule':<26}{'SNR':>6}{'views':>6}{'med geo°':>9}{'chance':>8}{'mean|dR|F':>10}{'chance':>8}"
              f"{'trans px':>9}{'chance':>8}{'FSC.5 pred':>11}{'true':>7}{'random':>8}{'ms/ptcl':>8}")
    print(header)
    print("-" * len(header))
    for k, (name, atoms) in enumerate(held_out_molecules(args.procedural, args.structures)):
        box = model.config.box
        apix = 2.0 * atoms.radius_angstrom() / (args.fill * box)
        volume = atoms_to_volume(atoms, box, apix)
        for snr in args.snr:
            for views in args.views:
                row = evaluate_one(model, volume, apix, snr, views, args.particles, args.max_shift, args.ctf,
                                   seed=1000 * k + int(10 * snr) + views, poses=args.poses)
                row.update(molecule=name, apix=apix)
                rows.append(row)
                print(f"{name:<26}{snr:>6g}{views:>6}{row['median_geodesic_deg']:>9.1f}"
                      f"{row['chance_median_geodesic_deg']:>8.1f}{row['mean_frobenius']:>10.3f}"
                      f"{row['chance_mean_frobenius']:>8.3f}{row['median_translation_px']:>9.2f}"
                      f"{row['chance_median_translation_px']:>8.2f}{row['fsc05_predicted_A']:>11.1f}"
                      f"{row['fsc05_true_poses_A']:>7.1f}{row['fsc05_random_poses_A']:>8.1f}"
                      f"{row['pose_ms_per_particle']:>8.2f}", flush=True)
    print("\nmedians over molecules (median geodesic °, predicted / chance; FSC-0.5 Å predicted / true poses):")
    for snr in args.snr:
        for views in args.views:
            sel = [r for r in rows if r["snr"] == snr and r["views"] == views]

            def med(key: str, sel: list[dict] = sel) -> float:
                return sorted(r[key] for r in sel)[len(sel) // 2]

            ratio = med("fsc05_predicted_A") / med("fsc05_true_poses_A")
            print(f"  SNR {snr:>4g}, {views:>3} views: {med('median_geodesic_deg'):6.1f} / "
                  f"{med('chance_median_geodesic_deg'):6.1f}°; FSC-0.5 {med('fsc05_predicted_A'):5.1f} / "
                  f"{med('fsc05_true_poses_A'):5.1f} Å (x{ratio:.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")



if __name__ == "__main__":
    main()

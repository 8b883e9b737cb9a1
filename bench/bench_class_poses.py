"""Milestone M3: class poses from the 2D classifier's class averages of simulated SNR 0.1 sessions with CTF.

Per molecule the script runs the real CLI as a user would: ``cryofastar-stream simulate`` (10,000
particles, box 64, SNR 0.1, CTF) and ``cryofastar-stream classify`` (50 classes); then it poses the
class averages as ``reconstruct --poses-from classes`` does (:class:`cryofastar.engine.class_posing.ClassPoser`,
classical and, with ``--weights``, learned) and compares them with the truth.

**A class's true pose.** Each member ``p`` (the particle's most probable class) with true RELION
matrix ``A_p`` and 2D angle ``psi_p`` says the class average is the projection at
``Rz(psi_p)ᵀ A_p`` (docs/conventions.md, "Fourier rays and common lines"); the class's true pose
is the chordal mean of these over its members, and their median distance to it (the class's
spread) is reported: a class average is a blur of that many degrees.

**Verdict.** Whether the class poses are trusted (two decoder starts agree,
:meth:`~cryofastar.engine.class_posing.ClassPoser.pose_particles`), and whether that verdict is right
(trusted exactly when the median error is under 10°).

**Error.** The classes' relative rotations against the true ones after one global rotation and
hand (:func:`cryofastar.model.evaluation.pose_errors`), median over the classes posed; chance
(random rotations, aligned the same way) beside it. Molecules: procedural seeds from
``EVAL_SEED_START`` (held out), never trained on; a Cn oligomer's poses are compared up to its
symmetry (:func:`~cryofastar.recon.simulate.procedural.oligomer_order`).

    .venv/bin/python bench/bench_class_poses.py --molecules 4 --weights RUN/best.safetensors \\
        --json bench/results/class_poses_m3.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
from cryofastar.engine.class_posing import ClassPoser, ClassViews, class_order
from cryofastar.model.evaluation import pose_errors
from cryofastar.model.training_data import EVAL_SEED_START
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.io import image_keys, read_images, read_particles
from cryofastar.recon.pose_alignment import cyclic_symmetry, nearest_symmetry_mates
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from cryofastar.recon.simulate.procedural import oligomer_order

HERE = Path(__file__).parent


def cli() -> list[str]:
    return [str(Path(sys.executable).with_name("cryofastar-stream"))]


def _run(command: list[str], log: Path) -> None:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")


def true_class_poses(session: Path, classified: Path, n_classes: int,
                     operators: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """`(K, 3, 3)` true class poses (chordal mean over members) and `(K,)` median member spread (degrees).

    For a molecule with symmetry operators ``S_k`` a member's pose is any of ``A @ S_k``: each member
    takes the mate nearest the class's running mean (three rounds) before the mean is taken.
    """
    truth_table, pred_table = read_particles(session / "particles.star"), read_particles(classified / "particles.star")
    rows = pd.Series(np.arange(len(truth_table)), index=image_keys(truth_table))[image_keys(pred_table)].to_numpy()
    a_true = truth_table.rotations()[torch.as_tensor(rows)]
    pred = pred_table.particles
    psi = torch.tensor(pred["rlnAnglePsi"].to_numpy(np.float64))
    inplane = euler_to_matrix(torch.zeros_like(psi), torch.zeros_like(psi), psi)
    implied = inplane.transpose(-1, -2) @ a_true
    members = pred["rlnClassNumber"].to_numpy() - 1
    poses = torch.full((n_classes, 3, 3), float("nan"), dtype=torch.float64)
    spread = np.full(n_classes, np.nan)
    for c in range(n_classes):
        rows = torch.from_numpy(members == c)
        if not rows.any():
            continue
        mine = implied[rows]
        mean = mine[0]
        for _ in range(3 if operators is not None else 1):
            if operators is not None:
                mine = nearest_symmetry_mates(mean.expand_as(mine), implied[rows], operators)
            u, _, vh = torch.linalg.svd(mine.sum(0))
            if torch.linalg.det(u @ vh) < 0:
                u[:, -1] = -u[:, -1]
            mean = u @ vh
        poses[c] = mean
        spread[c] = float(geodesic_degrees(mine, mean.expand(int(rows.sum()), 3, 3)).median())
    return poses, spread


def molecule(seed: int, args: argparse.Namespace, posers: dict[str, ClassPoser]) -> dict:
    root = args.work / f"seed{seed}"
    session, classified = root / "session", root / "classify"
    root.mkdir(parents=True, exist_ok=True)
    if not (session / "particles.star").is_file():
        _run([*cli(), "simulate", "--out", str(session), "--n", str(args.n), "--box", "64", "--apix",
              f"{args.apix:g}", "--snr", f"{args.snr:g}", "--ctf", "--seed", str(seed)], root / "simulate.log")
    if not (classified / "classes.star").is_file():
        _run([*cli(), "classify", str(session / "particles.star"), "-o", str(classified), "--classes",
              str(args.classes), "--no-progress"], root / "classify.log")
    averages = read_images(classified / "class_averages.mrcs")
    classes = starfile.read(classified / "classes.star")
    classes = classes if not isinstance(classes, dict) else list(classes.values())[-1]
    counts = torch.tensor(classes["rlnCryofastarParticleCount"].to_numpy(np.float64))
    junk = torch.tensor(classes["rlnCryofastarJunk"].to_numpy() > 0)
    order = class_order(counts, junk)
    order_n = oligomer_order(seed)
    operators = cyclic_symmetry(order_n) if order_n > 1 else None
    truth, spread = true_class_poses(session, classified, len(averages), operators)
    good = order[~junk[torch.as_tensor(order)].numpy()]
    record = {"seed": seed, "symmetry": f"C{order_n}", "classes_posed": len(order), "good_classes": len(good),
              "median_member_spread_deg": float(np.nanmedian(spread[good]))}
    chance = pose_errors(random_rotations(len(good), torch.Generator().manual_seed(seed)), truth[torch.as_tensor(good)],
                         symmetry=order_n)
    record["chance_median_deg"] = chance.geodesic_median_degrees
    for name, poser in posers.items():
        t = time.perf_counter()
        matrices = poser.pose_classes(torch.as_tensor(averages), order)
        seconds = time.perf_counter() - t
        errors = pose_errors(matrices[torch.as_tensor(good)], truth[torch.as_tensor(good)], symmetry=order_n)
        verdict = poser.pose_particles(ClassViews(torch.as_tensor(averages), counts, junk, np.zeros(0, np.int64),
                                                  np.zeros(0), np.zeros((0, 2))))
        record[name] = {"median_deg": errors.geodesic_median_degrees,
                        "within_10": float((errors.geodesic_degrees < 10).double().mean()), "seconds": seconds,
                        "trusted": verdict.trusted, "agreement_deg": verdict.as_dict()["agreement_degrees"]}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--molecules", type=int, default=4, help="procedural seeds EVAL_SEED_START + k")
    parser.add_argument("--first", type=int, default=20, help="first k (the panel and tests use lower ones)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="explicit seeds instead")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--apix", type=float, default=2.5)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--work", type=Path, default=HERE / ".class-poses-work")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    posers = {"classical": ClassPoser.load("classical")}
    if args.weights is not None:
        posers["learned"] = ClassPoser.load(args.weights)
    seeds = args.seeds or [EVAL_SEED_START + args.first + k for k in range(args.molecules)]
    records = []
    for seed in seeds:
        record = molecule(seed, args, posers)
        records.append(record)
        print(json.dumps(record), flush=True)
    for name in posers:
        medians = [r[name]["median_deg"] for r in records]
        chance = float(np.median([r["chance_median_deg"] for r in records]))
        print(f"{name}: class pose median per molecule {[round(m, 1) for m in medians]}; median of medians "
              f"{float(np.median(medians)):.1f}° (chance {chance:.0f}°)")
        right = [r[name]["trusted"] == (r[name]["median_deg"] < 10) for r in records]
        print(f"{name}: two-start verdict {[r[name]['trusted'] for r in records]}; agrees with the truth "
              f"(median < 10°) on {sum(right)} of {len(right)}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "molecules": records},
                                        indent=1))


if __name__ == "__main__":
    main()

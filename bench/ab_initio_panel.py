"""The ab initio panel: `reconstruct` (no network, map-only ab initio + refinement) on many unseen molecules.

Each cell is one molecule x box x CTF (off/on) x SNR x particle count x seed. Per cell the
script, on one machine:

1. takes the molecule's clean particles from the cache (bench/panel_molecules.py: real
   held-out structures, Cn oligomers of them and held-out procedural molecules; pixel size
   by one rule, shifts up to 3 px, CTF with defocus 0.8-2.5 µm, astigmatism, 300 kV), adds
   noise at the cell's SNR and writes a RELION 3.1 STAR file and stack, as a user would have;
2. runs the offline job exactly as ``cryofastar-stream reconstruct --poses-from map-only``
   does (:func:`cryofastar.engine.offline.reconstruct`), timed;
3. scores its poses after one global alignment (rotation and hand) onto the true ones
   (median geodesic error, mean ‖ΔR‖_F, not squared: the paper's metric), and the map the
   aligned poses make (one back-projector, with the CTF, for every row) against the true
   map: FSC-0.5 resolution. True poses (ceiling) and SO(3)-uniform random poses (floor) are
   scored the same way.

A cell succeeds when the median error is below 5° **and** its map's FSC-0.5 resolution is
within 1.3x of the true-pose map's. The job's own convergence verdict (``ab_initio.json``)
is recorded beside it; ``verdict_agrees`` says whether it matched the truth.

Results merge into ``--json`` (one entry per cell; cells already there are skipped unless
``--redo``), so the panel fills over several runs; ``--report`` prints the tables.

    .venv/bin/python bench/ab_initio_panel.py --quick                  # 6 molecules, SNR 0.1, 2,000 particles
    .venv/bin/python bench/ab_initio_panel.py --snr 0.1 0.05 --n 5000  # the issue's main cells, all molecules
    .venv/bin/python bench/ab_initio_panel.py --report
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from cryofastar.engine.offline import ReconstructSettings, reconstruct
from cryofastar.model.evaluation import apply_alignment_to_rotations, network_poses, pose_errors
from cryofastar.recon import HalfSetAccumulator, fsc, resolution_at_threshold
from cryofastar.recon.io import read_particles, write_particles
from cryofastar.recon.io.columns import SPREAD_COLUMN
from cryofastar.recon.io.mrc import write_stack
from cryofastar.recon.map_alignment import translate_onto
from cryofastar.recon.pose_alignment import nearest_symmetry_mates, symmetry_group
from cryofastar.recon.pose_precision import MEDIAN_PER_RMS, PRECISE_DEGREES
from cryofastar.recon.refinement import RefinementReference
from cryofastar.recon.rotations import geodesic_degrees, random_rotations

sys.path.insert(0, str(Path(__file__).parent))
from panel_molecules import CTF_RANGE, MOLECULES, QUICK, CleanSet, clean_set, symmetry_operators  # noqa: E402

HERE = Path(__file__).parent
SUCCESS_DEGREES = 5.0
SUCCESS_FSC_FACTOR = 1.3


def cell_key(molecule: str, box: int, ctf: bool, snr: float, n: int, seed: int) -> str:
    return f"{molecule}|b{box}|{'ctf' if ctf else 'noctf'}|snr{snr:g}|n{n}|s{seed}"


def write_star(star: Path, cs: CleanSet, stack: str, first: int, n: int) -> None:
    """A RELION 3.1 STAR file of particles ``first .. first + n - 1`` of ``cs``, images 1..n of ``stack``.

    ``stack`` is the stack's path as the STAR names it (relative to the STAR's directory);
    optics with voltage, Cs and amplitude contrast, defocus columns when ``cs`` has a CTF, no
    poses (the job must find them).
    """
    rows = {"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)], "rlnOpticsGroup": [1] * n}
    optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [cs.apix],
              "rlnImageSize": [cs.box], "rlnImageDimensionality": [2]}
    optics.update({"rlnVoltage": [CTF_RANGE.voltage_kv], "rlnSphericalAberration": [CTF_RANGE.spherical_aberration_mm],
                   "rlnAmplitudeContrast": [CTF_RANGE.amplitude_contrast]})
    if cs.ctf is not None:
        c = cs.ctf[first:first + n]
        rows.update({"rlnDefocusU": c.defocus_u_angstrom.numpy(), "rlnDefocusV": c.defocus_v_angstrom.numpy(),
                     "rlnDefocusAngle": c.defocus_angle_degrees.numpy(),
                     "rlnPhaseShift": c.phase_shift_degrees.numpy()})
    write_particles(star, pd.DataFrame(rows), pd.DataFrame(optics))


def write_cell(cs: CleanSet, images: torch.Tensor, folder: Path) -> Path:
    """A RELION 3.1 STAR file and one stack of the cell's particles (no poses: the job must find them)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_stack(folder / "particles.mrcs", images, cs.apix)
    star = folder / "particles.star"
    write_star(star, cs, "particles.mrcs", 0, images.shape[0])
    return star


def score(cs: CleanSet, images: torch.Tensor, rotations: torch.Tensor, origins_angstrom: torch.Tensor,
          symmetry: int | torch.Tensor = 1) -> dict:
    """Pose errors after global alignment (rotation, hand, map translation; modulo the molecule's ``symmetry``
    operators, :func:`panel_molecules.symmetry_operators`) and the aligned map's FSC vs the truth (a symmetric
    map projects alike at equivalent poses: the map needs only G)."""
    n = images.shape[0]
    true_rot, true_px = cs.rotations[:n], cs.origins_angstrom[:n] / cs.apix
    errors = pose_errors(rotations, true_rot, origins_angstrom / cs.apix, true_px, fit_translation=True,
                         symmetry=symmetry)
    aligned = apply_alignment_to_rotations(rotations, errors.alignment)
    acc = HalfSetAccumulator(cs.box, cs.apix)
    acc.add(images, aligned, origins_angstrom, 1 + torch.arange(n) % 2, ctf=None if cs.ctf is None else cs.ctf[:n])
    curve = fsc(translate_onto(acc.volume(), cs.volume), cs.volume)
    return {"median_deg": errors.geodesic_median_degrees, "frobenius_mean": errors.frobenius_mean,
            "shift_median_px": errors.translation_median_px, "mirrored": errors.alignment.mirrored,
            "fsc05_angstrom": resolution_at_threshold(curve, cs.apix, 0.5)}


LEAVE_OUT_GROUPS = 4
"""Each half's particles are matched in this many groups, each against its half map without the group in it."""


def attainable(cs: CleanSet, images: torch.Tensor, symmetry: int | torch.Tensor = 1, chunk: int = 1000) -> dict:
    """How well one pose per particle can be known in this cell, whatever finds the map.

    The particles are matched (the engine's :class:`RefinementReference`, default search
    settings, with the CTF) against the half maps their *true* poses make (a perfect ab
    initio's map, noise included): ``local_from_truth`` refines each particle's pose from the
    truth (the best-scoring pose near it: the precision the data allow any one-pose-per-particle
    estimator with this score); ``global`` searches SO(3) then refines (what our search finds
    with a perfect map). Median errors (degrees, modulo ``symmetry``, no alignment needed: the
    maps are in the true frame) and the share of particles more than 30° off.

    **Leave-group-out.** A particle must not be matched against a map that holds its own
    noise at its true pose: at SNR 0.1 and a few thousand particles per half, that noise is a
    large share of each high-resolution voxel, and it pins the pose to the truth (1GBT, SNR
    0.1: 1.8° with itself in the map, 3.7° without). Each half's particles are split into
    :data:`LEAVE_OUT_GROUPS` groups; a group is matched against its half map with that group
    taken out (:meth:`HalfSetAccumulator.remove`).
    """
    n = images.shape[0]
    true_rot, true_org = cs.rotations[:n], cs.origins_angstrom[:n]
    ctf = None if cs.ctf is None else cs.ctf[:n]
    acc = HalfSetAccumulator(cs.box, cs.apix)
    halves = 1 + torch.arange(n) % 2
    acc.add(images, true_rot, true_org, halves, ctf=ctf)
    resolution = acc.resolution_angstrom()
    groups = (torch.arange(n) // 2) % LEAVE_OUT_GROUPS
    out = {"true_pose_half_map_angstrom": resolution, "leave_out_groups": LEAVE_OUT_GROUPS}
    found = {"local_from_truth": torch.empty_like(true_rot), "global": torch.empty_like(true_rot)}
    for group in range(LEAVE_OUT_GROUPS):
        members = torch.nonzero(groups == group).squeeze(-1)
        without = HalfSetAccumulator.from_state_dict({**acc.state_dict(), "grids": acc.grids.clone(),
                                                      "particle_counts": acc.particle_counts.clone()})
        without.remove(images[members], true_rot[members], true_org[members], halves[members],
                       None if ctf is None else ctf[members])
        reference = RefinementReference(without.half_volumes(), cs.apix, resolution)
        for first in range(0, len(members), chunk):
            rows = members[first : first + chunk]
            for mode, label in (("local", "local_from_truth"), ("global", "global")):
                match, _ = reference.match(images[rows], halves[rows], true_rot[rows], true_org[rows], mode,
                                           None if ctf is None else ctf[rows])
                found[label][rows] = match.rotations
    for label, rotations in found.items():
        errors = geodesic_degrees(rotations, nearest_symmetry_mates(rotations, true_rot,
                                                                    symmetry_group(symmetry).double()))
        out[f"{label}_median_deg"] = float(errors.median())
        out[f"{label}_over30"] = float((errors > 30).double().mean())
    return out


def leave_group_out(cell: dict | None) -> bool:
    """Whether ``cell`` holds attainable figures measured leave-group-out (the current way)."""
    return cell is not None and "leave_out_groups" in cell.get("attainable", {})


def poses_path(args: argparse.Namespace, key: str) -> Path:
    """Where a cell's poses are kept (in the work folder, not committed) for ``--rescore``."""
    return args.work / "poses" / (key.replace("|", "_") + ".pt")


def run_cell(args: argparse.Namespace, molecule, box: int, ctf: bool, snr: float, n: int, seed: int) -> dict:
    key = cell_key(molecule.name, box, ctf, snr, n, seed)
    cs = clean_set(molecule, box, ctf, max(args.n_cache, n), args.cache)
    images = cs.noisy(n, snr, seed)
    folder = args.work / key.replace("|", "_")
    star = write_cell(cs, images, folder)
    t = time.perf_counter()
    settings = ReconstructSettings(device=args.device, poses_from=args.poses_from, seed=seed,
                                   class_weights=args.class_weights)
    result = reconstruct(star, folder / "out", settings)
    wall = time.perf_counter() - t
    table = read_particles(folder / "out" / "particles.star")
    start = {}
    if args.poses_from == "classes":  # the class poses before refinement (the decoder's, via each particle's class)
        start_rotations, _ = network_poses(table)
        errors = pose_errors(start_rotations, cs.rotations[:n], symmetry=symmetry_operators(molecule))
        start = {"poses_from": "classes", "class_weights": args.class_weights, "classes_posed": result.classes_posed,
                 "class_poses_median_deg": errors.geodesic_median_degrees,
                 "class_poses_won_fraction": result.network_won_fraction,
                 "class_poses_verdict": result.class_poses,
                 "class_poses_confirmation": result.confirmation,
                 "class_poses_informative": "ab-initio" not in result.refine_modes}
    poses = {"rotations": table.rotations().double(), "origins_angstrom": table.origins_angstrom().double()}
    poses_path(args, key).parent.mkdir(parents=True, exist_ok=True)
    torch.save(poses, poses_path(args, key))
    verdict = result.ab_initio or {}
    rows = table.particles
    spread = float(rows[SPREAD_COLUMN].median()) if SPREAD_COLUMN in rows else None
    entry = {"molecule": molecule.name, "source": molecule.source, "shape": cs.shape,
             "atoms": cs.atoms, "box": box, "apix": cs.apix, "ctf": ctf, "snr": snr, "n": n, "seed": seed,
             "device": args.device, "wall_s": wall, "ab_initio_s": result.ab_initio_seconds,
             "verdict": verdict.get("converged"), "ab_initio": verdict,
             "median_angular_spread_deg": spread,  # the last refinement round's posterior RMS angle (evidence)
             **start}
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return score_cell(entry, cs, images, molecule, poses)


def score_cell(entry: dict, cs: CleanSet, images: torch.Tensor, molecule, poses: dict) -> dict:
    """The cell's rows (ours, true poses, random poses), success and whether the verdict agreed, into ``entry``."""
    n, seed = images.shape[0], entry["seed"]
    sym = symmetry_operators(molecule)
    ours = score(cs, images, poses["rotations"], poses["origins_angstrom"], sym)
    true = score(cs, images, cs.rotations[:n], cs.origins_angstrom[:n], sym)
    g = torch.Generator().manual_seed(seed)
    floor = score(cs, images, random_rotations(n, g), torch.zeros(n, 2, dtype=torch.float64), sym)
    success = (ours["median_deg"] < SUCCESS_DEGREES
               and ours["fsc05_angstrom"] <= SUCCESS_FSC_FACTOR * true["fsc05_angstrom"])
    entry.update({"symmetry": len(sym), "success": bool(success), "ours": ours, "true_poses": true,
                  "random_poses": floor, "verdict_agrees": entry["verdict"] == bool(success)})
    return entry


def rescore(args: argparse.Namespace, store: dict) -> list[str]:
    """Score again every cell (of ``--molecules``, if given) whose poses are kept (after a change to the scoring,
    e.g. a symmetry found); returns the keys rescored.

    A cell run before the angular spread was recorded takes it from its kept output (``--keep``) when that
    output holds the same poses (the same run).
    """
    known = {m.name: m for m in MOLECULES}
    done = []
    for key, entry in store["cells"].items():
        path = poses_path(args, key)
        if args.molecules and entry["molecule"] not in args.molecules:
            continue
        if not path.exists():
            print(f"{key}: no kept poses, not rescored")
            continue
        molecule = known[entry["molecule"]]
        cs = clean_set(molecule, entry["box"], entry["ctf"], max(args.n_cache, entry["n"]), args.cache)
        poses = torch.load(path)
        score_cell(entry, cs, cs.noisy(entry["n"], entry["snr"], entry["seed"]), molecule, poses)
        kept = args.work / key.replace("|", "_") / "out" / "particles.star"
        if entry.get("median_angular_spread_deg") is None and kept.exists():
            table = read_particles(kept)
            if SPREAD_COLUMN in table.particles and torch.allclose(table.rotations().double(), poses["rotations"],
                                                                   atol=1e-4):
                entry["median_angular_spread_deg"] = float(table.particles[SPREAD_COLUMN].median())
        done.append(key)
        print(f"{key}: median {entry['ours']['median_deg']:.1f}°, success {entry['success']}", flush=True)
    return done


def add_attainable(args: argparse.Namespace, store: dict, key: str, molecule) -> None:
    """:func:`attainable` into the stored cell ``key`` (skipped when absent, or current unless ``--redo``)."""
    entry = store["cells"].get(key)
    if entry is None or (leave_group_out(entry) and not args.redo):  # measured before leave-group-out: again
        return
    cs = clean_set(molecule, entry["box"], entry["ctf"], max(args.n_cache, entry["n"]), args.cache)
    t = time.perf_counter()
    entry["attainable"] = {**attainable(cs, cs.noisy(entry["n"], entry["snr"], entry["seed"]),
                                        symmetry_operators(molecule)), "seconds": time.perf_counter() - t}
    write_store(args.json, store, [key])
    a = entry["attainable"]
    print(f"{key}: attainable: local from truth {a['local_from_truth_median_deg']:.1f}°, global with the true-pose "
          f"maps {a['global_median_deg']:.1f}° ({100 * a['global_over30']:.0f}% > 30°); ours "
          f"{entry['ours']['median_deg']:.1f}°", flush=True)


def machine() -> dict:
    """The machine the cells ran on (wall times are comparable only within one machine)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "gpu": gpu}


def estimated_precision(entry: dict) -> float | None:
    """The engine's estimate of the cell's median pose error (degrees; :mod:`cryofastar.recon.pose_precision`).

    From the verdict in ``ab_initio.json``; cells run before it was written there have only the
    median spread, which the engine's estimate is a fixed multiple of. ``None``: not recorded.
    """
    precision = (entry.get("ab_initio") or {}).get("pose_precision")
    if precision is not None:
        return precision["estimated_median_error_degrees"]
    spread = entry.get("median_angular_spread_deg")
    return None if spread is None else MEDIAN_PER_RMS * spread


def full_verdict(entry: dict) -> bool | None:
    """Both parts of the verdict: found (two starts agree) and precise (estimate under the bar).

    ``None``: no estimate recorded.
    """
    estimate = estimated_precision(entry)
    return None if estimate is None else bool(entry["verdict"]) and estimate < PRECISE_DEGREES


def report(cells: dict) -> None:
    rows = sorted(cells.values(), key=lambda e: (e["box"], e["ctf"], -e["snr"], e["n"], e["molecule"], e["seed"]))
    print("| molecule | shape | Å/px | CTF | SNR | n | seed | median ° | ‖ΔR‖_F | FSC0.5 Å (true / random) | "
          "attainable ° (from truth / global) | est. ° | wall s | verdict | success |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in rows:
        o, t, r = e["ours"], e["true_poses"], e["random_poses"]
        a = e.get("attainable")
        reach = "–" if a is None else f"{a['local_from_truth_median_deg']:.1f} / {a['global_median_deg']:.1f}"
        if a is not None and not leave_group_out(e):
            reach += " (self in map)"
        estimate = estimated_precision(e)
        verdict = "converged" if e["verdict"] else "NOT converged"
        if estimate is not None:
            verdict += ", precise" if estimate < PRECISE_DEGREES else ", NOT precise"
        print(f"| {e['molecule']} | {e['shape']} | {e['apix']:.2f} | {'yes' if e['ctf'] else 'no'} | {e['snr']:g} | "
              f"{e['n']} | {e['seed']} | {o['median_deg']:.1f} | {o['frobenius_mean']:.3f} | "
              f"{o['fsc05_angstrom']:.1f} ({t['fsc05_angstrom']:.1f} / {r['fsc05_angstrom']:.1f}) | "
              f"{reach} | {'–' if estimate is None else f'{estimate:.1f}'} | {e['wall_s']:.0f} | "
              f"{verdict} | {'yes' if e['success'] else '**no**'} |")
    print()
    groups: dict[tuple, list] = {}
    for e in rows:
        groups.setdefault((e["box"], e["ctf"], e["snr"], e["n"]), []).append(e)
    print("| box | CTF | SNR | n | cells | success | found (< 15°) | mean ‖ΔR‖_F of successes | converged = success | "
          "converged = found | converged and precise = success | median wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (box, ctf, snr, n), es in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3])):
        ok = [e for e in es if e["success"]]
        frob = sum(e["ours"]["frobenius_mean"] for e in ok) / len(ok) if ok else math.nan
        found = sum(e["ours"]["median_deg"] < FOUND_DEGREES for e in es)
        agree = sum(e["verdict_agrees"] for e in es)
        agree_found = sum(bool(e["verdict"]) == (e["ours"]["median_deg"] < FOUND_DEGREES) for e in es)
        judged = [e for e in es if full_verdict(e) is not None]
        full = sum(full_verdict(e) == e["success"] for e in judged)
        walls = sorted(e["wall_s"] for e in es)
        print(f"| {box} | {'yes' if ctf else 'no'} | {snr:g} | {n} | {len(es)} | {len(ok)}/{len(es)} "
              f"({100 * len(ok) / len(es):.0f}%) | {found}/{len(es)} | {frob:.3f} | {agree}/{len(es)} | "
              f"{agree_found}/{len(es)} | {full}/{len(judged)} | {walls[len(walls) // 2]:.0f} |")


FOUND_DEGREES = 15.0
"""Below this median error the structure was found, even where the cell misses the 5° success bar."""


def draw_figure(cells: dict, path: Path) -> None:
    """An SVG grid (no plotting library needed): molecules x conditions, coloured by outcome, median error written.

    Green: success; amber: structure found (median < 15°) but not a success; red: not found.
    A square in the corner of a cell shows the verdict (filled: converged).
    """
    rows = sorted({(e["atoms"], e["molecule"], e["shape"]) for e in cells.values()})
    columns = sorted({(e["box"], e["ctf"], -e["snr"], e["n"]) for e in cells.values()})
    by_cell: dict[tuple, list] = {}
    for e in cells.values():
        by_cell.setdefault((e["molecule"], (e["box"], e["ctf"], -e["snr"], e["n"])), []).append(e)
    cw, ch, left, top = 64, 22, 230, 86
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(560, left + cw * len(columns) + 20)}" '
           f'height="{top + ch * len(rows) + 60}" font-family="DejaVu Sans, sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="18" font-size="13">ab initio panel: median pose error (°) of each cell</text>',
           f'<text x="10" y="34">green: success; amber: found (&lt; {FOUND_DEGREES:g}°), not a success; '
           'red: not found; ■ verdict: converged</text>']
    for j, (box, ctf, snr, n) in enumerate(columns):
        x = left + j * cw + cw / 2
        out.append(f'<text x="{x}" y="{top - 28}" text-anchor="middle">{"CTF" if ctf else "no CTF"}</text>')
        out.append(f'<text x="{x}" y="{top - 16}" text-anchor="middle">SNR {-snr:g}</text>')
        out.append(f'<text x="{x}" y="{top - 4}" text-anchor="middle">b{box} n{n}</text>')
    for i, (atoms, name, shape) in enumerate(rows):
        y = top + i * ch
        out.append(f'<text x="8" y="{y + 15}">{name} ({shape}, {atoms} atoms)</text>')
        for j, column in enumerate(columns):
            x = left + j * cw
            for k, e in enumerate(sorted(by_cell.get((name, column), []), key=lambda e: e["seed"])):
                w = cw / len(by_cell[(name, column)])
                median = e["ours"]["median_deg"]
                colour = "#4caf50" if e["success"] else "#ffb300" if median < FOUND_DEGREES else "#e53935"
                out.append(f'<rect x="{x + k * w:.1f}" y="{y}" width="{w - 1:.1f}" height="{ch - 2}" fill="{colour}"/>')
                out.append(f'<text x="{x + k * w + w / 2:.1f}" y="{y + 15}" text-anchor="middle">{median:.1f}</text>')
                if e["verdict"]:
                    out.append(f'<rect x="{x + k * w + 2:.1f}" y="{y + 2}" width="5" height="5" fill="black"/>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def write_store(path: Path, store: dict, keys: list[str] | None = None) -> None:
    """Write ``store`` to ``path`` atomically; with ``keys``, only those cells (and the machine), merged into
    the file as it is now, under a lock: two runs (e.g. ``--attainable`` beside a panel run) never undo
    each other's cells. A cell written again without attainable figures keeps the leave-group-out ones
    the file has (a property of the cell's data, not of the method)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if keys is not None and path.exists():
            on_disk = json.loads(path.read_text())
            for k in keys:
                before = on_disk["cells"].get(k)
                if "attainable" not in store["cells"][k] and leave_group_out(before):
                    store["cells"][k]["attainable"] = before["attainable"]
                on_disk["cells"][k] = store["cells"][k]
            on_disk["machine"] = store.get("machine", on_disk.get("machine"))
            store = on_disk
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=1, allow_nan=True) + "\n")
        tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 molecules, box 64, SNR 0.1, 2,000 particles, "
                        "CTF off and on, seed 1")
    parser.add_argument("--molecules", nargs="+", default=None, help="names (default: all, or the quick subset)")
    parser.add_argument("--box", type=int, nargs="+", default=[64])
    parser.add_argument("--ctf", choices=["off", "on"], nargs="+", default=["off", "on"])
    parser.add_argument("--snr", type=float, nargs="+", default=[0.1])
    parser.add_argument("--n", type=int, nargs="+", default=[5000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-cache", type=int, default=10_000, help="clean particles cached per molecule")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "ab_initio_panel.json")
    parser.add_argument("--work", type=Path, default=HERE / ".panel-work")
    parser.add_argument("--cache", type=Path, default=None, help="clean particles (default ~/.cache/cryofastar/panel)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the job runs (the issue's figures: cpu, 2 threads; keep cuda cells in their own "
                        "--json, their wall times are another machine's)")
    parser.add_argument("--poses-from", choices=["map-only", "classes"], default="map-only",
                        help="the job's source of first poses (reconstruct --poses-from); keep classes cells in their "
                        "own --json")
    parser.add_argument("--class-weights", default="shipped",
                        help="with --poses-from classes: the geometric decoder (reconstruct --class-weights: "
                        "shipped, classical or a weights file); keep each in its own --json")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep each cell's STAR, stack and outputs")
    parser.add_argument("--rescore", action="store_true", help="score again the cells whose poses --work keeps")
    parser.add_argument("--attainable", action="store_true", help="for the selected cells already in --json: how "
                        "well one pose per particle can be known (true-pose maps; no ab initio run)")
    parser.add_argument("--report", action="store_true", help="print the tables of --json, draw --figure and stop")
    parser.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "images" / "ab_initio_panel.svg")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = json.loads(args.json.read_text()) if args.json.exists() else {"cells": {}}
    if args.rescore:
        write_store(args.json, store, rescore(args, store))
        return
    if args.report:
        report(store["cells"])
        draw_figure(store["cells"], args.figure)
        print(f"\nwrote {args.figure}")
        return
    if args.quick:
        args.molecules = args.molecules or list(QUICK)
        args.n, args.snr, args.seeds, args.box = [2000], [0.1], [1], [64]
    names = args.molecules or [m.name for m in MOLECULES]
    unknown = set(names) - {m.name for m in MOLECULES}
    if unknown:
        raise SystemExit(f"error: unknown molecules {sorted(unknown)}; known: {[m.name for m in MOLECULES]}")
    store["machine"] = machine()
    for box in args.box:
        for ctf in (c == "on" for c in args.ctf):
            for snr in args.snr:
                for n in args.n:
                    for seed in args.seeds:
                        for molecule in (m for m in MOLECULES if m.name in names):
                            key = cell_key(molecule.name, box, ctf, snr, n, seed)
                            if args.attainable:
                                add_attainable(args, store, key, molecule)
                                continue
                            if key in store["cells"] and not args.redo:
                                continue
                            entry = run_cell(args, molecule, box, ctf, snr, n, seed)
                            store["cells"][key] = entry
                            write_store(args.json, store, [key])
                            o = entry["ours"]
                            print(f"{key}: median {o['median_deg']:.1f}°, FSC0.5 {o['fsc05_angstrom']:.1f} Å "
                                  f"(true {entry['true_poses']['fsc05_angstrom']:.1f}), {entry['wall_s']:.0f} s, "
                                  f"verdict {'converged' if entry['verdict'] else 'NOT converged'}, "
                                  f"success {entry['success']}", flush=True)


if __name__ == "__main__":
    main()

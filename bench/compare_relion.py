"""RELION 3.1 as a peer, on the ab initio panel's cells (bench/ab_initio_panel.py).

Two comparisons, both on the same STAR files and the same 2 cores:

``--reconstruct``
    ``relion_reconstruct`` against ``cryofastar-stream backproject`` on a cell's particles
    with their **true** poses (no CTF and CTF): the FSC between the two maps, each map's
    FSC-0.5 resolution against the true map, and the wall time of each. A disagreement
    would be a convention bug (tests/test_relion_conventions.py pins the same at SNR 20).

``--initial-model``
    RELION's de novo initial model, ``relion_refine --denovo_3dref --sgd``, with the
    settings of its 3.1 single-particle tutorial (15° initial sampling, offsets 6 px in
    steps of 2, flattened solvent, zero mask, 1 and 3 classes) and relion_refine's own SGD
    defaults (50 + 200 + 50 iterations, mini-batches of 100 to 500, 35 Å to 15 Å). RELION
    is given the mask diameter a user would type (1.1x the molecule's true largest
    extent); ours estimates it from the images. The poses of the last iteration's
    ``_data.star`` (with 3 classes: the particles of the largest class) are scored exactly
    like the panel scores ours (one global alignment with hand; median error, mean
    ‖ΔR‖_F; FSC-0.5 of the aligned poses' map against the truth, one back-projector) and
    put beside our ``reconstruct`` on the same cell, read from the panel's JSON (run the
    panel on the cell first). Same success rule: median < 5° and FSC-0.5 within 1.3x of
    the true-pose map.

RELION is never a dependency of the package; ``apt-get install relion`` (Debian, CPU build)
provides it. Results merge into ``--json``; ``--report`` prints the tables.

    .venv/bin/python bench/compare_relion.py --reconstruct --molecules 1GBT 6WQA --ctf off on
    .venv/bin/python bench/compare_relion.py --initial-model --molecules 1GBT --ctf on --classes 1 3
    .venv/bin/python bench/compare_relion.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import starfile
import torch
from cryofastar.recon import fsc, resolution_at_threshold
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.io import read_particles, read_volume

sys.path.insert(0, str(Path(__file__).parent))
from ab_initio_panel import SUCCESS_DEGREES, SUCCESS_FSC_FACTOR, cell_key, score, write_cell  # noqa: E402
from panel_molecules import MOLECULES, CleanSet, atoms_of, clean_set, symmetry_operators  # noqa: E402

HERE = Path(__file__).parent
CLI = Path(sys.executable).parent / "cryofastar-stream"
INITIAL_MODEL_ARGS = [
    "--sgd", "--denovo_3dref", "--sym", "C1", "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc",
    "--preread_images", "--pool", "3", "--pad", "1", "--skip_gridding", "--oversampling", "1", "--healpix_order", "1",
    "--offset_range", "6", "--offset_step", "2", "--sgd_write_iter", "10",
]
"""relion_refine's arguments for a de novo initial model, as RELION 3.1's GUI writes them for its tutorial
(--K, --particle_diameter, --ctf, --i, --o and --j are added per cell)."""


def relion_version() -> str:
    done = subprocess.run(["relion_refine", "--version"], capture_output=True, text=True, check=False)
    return " ".join(line.strip() for line in done.stdout.splitlines()[:2])


def run(cmd: list[str], cwd: Path, log: Path, timeout: float, stop_at_timeout: bool = False) -> tuple[float, bool]:
    """Run ``cmd`` in ``cwd`` (RELION resolves image names there), its output to ``log``.

    Returns the wall seconds and whether it finished; past ``timeout`` it is stopped, and
    that is an error unless ``stop_at_timeout`` (a capped peer run, scored at its last output).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t = time.perf_counter()
    with log.open("w") as out:
        try:
            done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            if not stop_at_timeout:
                raise
            return time.perf_counter() - t, False
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t, True


SGD_ITERATIONS = 300
"""relion_refine's SGD iterations with its defaults (50 initial + 200 in between + 50 final)."""


def sgd_particle_passes(iterations: int, ini: int = 50, between: int = 200, fin: int = 50, ini_subset: int = 100,
                        fin_subset: int = 500) -> float:
    """Particles RELION's SGD has processed after ``iterations`` (mini-batches grow linearly in between)."""
    done = 0.0
    for i in range(1, iterations + 1):
        if i <= ini:
            done += ini_subset
        elif i <= ini + between:
            done += ini_subset + (fin_subset - ini_subset) * (i - ini) / between
        else:
            done += fin_subset
    return done


def add_true_poses(star: Path, cs: CleanSet, n: int) -> None:
    """Write the true poses (RELION angles and rlnOriginX/YAngst) into the cell's STAR file."""
    blocks = starfile.read(star, always_dict=True)
    rot, tilt, psi = matrix_to_euler(cs.rotations[:n])
    rows = blocks["particles"]
    rows["rlnAngleRot"], rows["rlnAngleTilt"], rows["rlnAnglePsi"] = rot.numpy(), tilt.numpy(), psi.numpy()
    rows["rlnOriginXAngst"] = cs.origins_angstrom[:n, 0].numpy()
    rows["rlnOriginYAngst"] = cs.origins_angstrom[:n, 1].numpy()
    starfile.write(blocks, star, overwrite=True)


def fsc_summary(a: torch.Tensor, b: torch.Tensor, apix: float) -> dict:
    curve = fsc(a, b)
    top = int(0.9 * (len(curve) - 1))
    return {"fsc05_angstrom": resolution_at_threshold(curve, apix, 0.5),
            "mean_to_0.9_nyquist": float(curve[1 : top + 1].mean()),
            "min_to_0.9_nyquist": float(curve[1 : top + 1].min())}


def compare_reconstruct(args: argparse.Namespace, molecule, ctf: bool, snr: float, n: int, seed: int) -> dict:
    cs = clean_set(molecule, args.box, ctf, max(10_000, n))
    folder = args.work / ("reconstruct_" + cell_key(molecule.name, args.box, ctf, snr, n, seed).replace("|", "_"))
    star = write_cell(cs, cs.noisy(n, snr, seed), folder)
    add_true_poses(star, cs, n)
    relion_s, _ = run(["relion_reconstruct", "--i", star.name, "--o", "relion.mrc", *(["--ctf"] if ctf else [])],
                   folder, folder / "relion_reconstruct.log", args.timeout)
    ours_s, _ = run([str(CLI), "backproject", star.name, "-o", "ours.mrc", "--device", "cpu"], folder,
                 folder / "backproject.log", args.timeout)
    relion, ours = read_volume(folder / "relion.mrc")[0], read_volume(folder / "ours.mrc")[0]
    entry = {"molecule": molecule.name, "box": args.box, "apix": cs.apix, "ctf": ctf, "snr": snr, "n": n,
             "seed": seed, "relion_s": relion_s, "ours_s": ours_s,
             "relion_vs_ours": fsc_summary(relion, ours, cs.apix),
             "relion_vs_truth": fsc_summary(relion, cs.volume, cs.apix),
             "ours_vs_truth": fsc_summary(ours, cs.volume, cs.apix)}
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


def last_iteration(outdir: Path) -> tuple[int, Path]:
    """The highest ``run_itNNN_data.star`` RELION wrote."""
    found = sorted(outdir.glob("run_it*_data.star"))
    if not found:
        raise RuntimeError(f"relion_refine wrote no run_it*_data.star in {outdir}")
    return int(found[-1].name[6:9]), found[-1]


def compare_initial_model(args: argparse.Namespace, molecule, ctf: bool, snr: float, n: int, seed: int,
                          classes: int, panel: dict) -> dict:
    key = cell_key(molecule.name, args.box, ctf, snr, n, seed)
    if key not in panel:
        raise SystemExit(f"error: the panel has no cell {key}: run bench/ab_initio_panel.py on it first")
    cs = clean_set(molecule, args.box, ctf, max(10_000, n))
    images = cs.noisy(n, snr, seed)
    folder = initial_model_folder(args, key, classes)
    if args.score_stopped:
        return score_stopped_initial_model(molecule, cs, images, folder, classes, panel[key])
    star = write_cell(cs, images, folder)
    (folder / "out").mkdir(exist_ok=True)
    diameter = mask_diameter_angstrom(molecule, cs)
    cmd = ["relion_refine", "--i", star.name, "--o", "out/run", "--K", str(classes), "--particle_diameter",
           f"{diameter:.0f}", "--j", str(args.threads), *(["--ctf"] if ctf else []), *INITIAL_MODEL_ARGS,
           *args.relion_args]
    (folder / "command.txt").write_text(" ".join(cmd) + "\n")
    started = time.time()
    wall, finished = run(cmd, folder, folder / "relion_refine.log", args.timeout, stop_at_timeout=True)
    entry = score_initial_model(molecule, cs, images, folder, classes, panel[key], wall, finished, started)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


def mask_diameter_angstrom(molecule, cs: CleanSet) -> float:
    """The mask diameter (Å) RELION is given: 1.1x the molecule's true largest extent, as a user would type it."""
    return min(1.1 * 2 * atoms_of(molecule).radius_angstrom(), (cs.box - 2) * cs.apix)


def initial_model_folder(args: argparse.Namespace, key: str, classes: int) -> Path:
    """Where a cell's RELION initial model runs (``--work``)."""
    return args.work / (f"initial_model_K{classes}_" + key.replace("|", "_"))


def score_stopped_initial_model(molecule, cs: CleanSet, images: torch.Tensor, folder: Path, classes: int,
                                ours: dict) -> dict:
    """Score a RELION run that was stopped by hand (its folder kept) at its last written iteration.

    Its wall time is that of the last iteration written, counted from the cell's STAR file
    (written just before RELION started); the run counts as not finished.
    """
    if not (folder / "command.txt").exists() or not (folder / "out").is_dir():
        raise SystemExit(f"error: no stopped RELION run in {folder}")
    started = (folder / "particles.star").stat().st_mtime
    _, data = last_iteration(folder / "out")
    entry = score_initial_model(molecule, cs, images, folder, classes, ours, data.stat().st_mtime - started,
                                False, started)
    entry["stopped_by_hand"] = True
    return entry


def score_initial_model(molecule, cs: CleanSet, images: torch.Tensor, folder: Path, classes: int, ours: dict,
                        wall: float, finished: bool, started: float) -> dict:
    """The entry of one initial-model cell: RELION's last iteration scored like the panel scores ours."""
    n = images.shape[0]
    iteration, data = last_iteration(folder / "out")
    written = {int(p.name[6:9]): p.stat().st_mtime - started
               for p in sorted((folder / "out").glob("run_it*_data.star"))}
    table = read_particles(data)
    order = torch.as_tensor(table.image_indices - 1)  # RELION's rows back to the stack's order
    rotations = torch.empty(n, 3, 3, dtype=torch.float64)
    origins = torch.empty(n, 2, dtype=torch.float64)
    rotations[order], origins[order] = table.rotations().double(), table.origins_angstrom().double()
    members = torch.arange(n)
    if classes > 1:
        labels = torch.empty(n, dtype=torch.long)
        labels[order] = torch.as_tensor(table.particles["rlnClassNumber"].to_numpy()).long()
        members = torch.nonzero(labels == torch.bincount(labels).argmax()).squeeze(-1)
    sub = _subset(cs, members)
    sym = symmetry_operators(molecule)
    peer = score(sub, images[members], rotations[members], origins[members], sym)
    true = score(sub, images[members], cs.rotations[members], cs.origins_angstrom[members], sym)
    success = (peer["median_deg"] < SUCCESS_DEGREES
               and peer["fsc05_angstrom"] <= SUCCESS_FSC_FACTOR * true["fsc05_angstrom"])
    projected = wall * sgd_particle_passes(SGD_ITERATIONS) / sgd_particle_passes(max(iteration, 1))
    return {"molecule": molecule.name, "box": cs.box, "apix": cs.apix, "ctf": cs.ctf is not None,
            "snr": ours["snr"], "n": n, "seed": ours["seed"], "classes": classes,
            "particle_diameter_angstrom": mask_diameter_angstrom(molecule, cs), "iterations": iteration,
            "scored_particles": len(members), "relion_s": wall, "relion_finished": finished,
            "relion_iteration_s": written,
            "relion_projected_s": wall if finished else projected,
            "relion": peer, "relion_true_poses": true,
            "relion_success": bool(success), "ours_s": ours["wall_s"], "ours": ours["ours"],
            "ours_success": ours["success"], "ours_true_poses": ours["true_poses"],
            "command": (folder / "command.txt").read_text().strip()}


def _subset(cs: CleanSet, members: torch.Tensor) -> CleanSet:
    """The clean set restricted to ``members`` (so :func:`score` sees those particles as the first ``m``)."""
    return CleanSet(cs.molecule, cs.atoms, cs.shape, cs.box, cs.apix, cs.volume, cs.clean[members],
                    cs.rotations[members], cs.origins_angstrom[members], None if cs.ctf is None else cs.ctf[members])


def _stopped(entry: dict) -> str:
    """What the wall-time cell of an unfinished RELION run says beside its time."""
    return (f" (stopped at iteration {entry['iterations']} of {SGD_ITERATIONS}, projected "
            f"{entry['relion_projected_s']:.0f})")


def report(store: dict) -> None:
    rec = store.get("reconstruct", {})
    if rec:
        print("| molecule | Å/px | CTF | SNR | n | FSC RELION vs ours (mean / min to 0.9 Nyquist) | FSC-0.5 vs truth "
              "RELION / ours (Å) | wall RELION / ours (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for e in sorted(rec.values(), key=lambda e: (e["ctf"], e["molecule"])):
            c = e["relion_vs_ours"]
            print(f"| {e['molecule']} | {e['apix']:.2f} | {'yes' if e['ctf'] else 'no'} | {e['snr']:g} | {e['n']} | "
                  f"{c['mean_to_0.9_nyquist']:.3f} / {c['min_to_0.9_nyquist']:.3f} | "
                  f"{e['relion_vs_truth']['fsc05_angstrom']:.2f} / {e['ours_vs_truth']['fsc05_angstrom']:.2f} | "
                  f"{e['relion_s']:.1f} / {e['ours_s']:.1f} |")
        print()
    im = store.get("initial_model", {})
    if im:
        print("| molecule | CTF | SNR | n | RELION K | RELION median ° / ‖ΔR‖_F / FSC0.5 Å (true) | RELION s | "
              "RELION success | ours median ° / ‖ΔR‖_F / FSC0.5 Å (true) | ours s | ours success | time ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for e in sorted(im.values(), key=lambda e: (e["ctf"], e["molecule"], e["classes"])):
            r, o = e["relion"], e["ours"]
            print(f"| {e['molecule']} | {'yes' if e['ctf'] else 'no'} | {e['snr']:g} | {e['n']} | {e['classes']} "
                  f"({e['scored_particles']} scored) | {r['median_deg']:.1f} / {r['frobenius_mean']:.3f} / "
                  f"{r['fsc05_angstrom']:.1f} ({e['relion_true_poses']['fsc05_angstrom']:.1f}) | {e['relion_s']:.0f}"
                  f"{'' if e['relion_finished'] else _stopped(e)} | "
                  f"{'yes' if e['relion_success'] else 'no'} | {o['median_deg']:.1f} / {o['frobenius_mean']:.3f} / "
                  f"{o['fsc05_angstrom']:.1f} ({e['ours_true_poses']['fsc05_angstrom']:.1f}) | {e['ours_s']:.0f} | "
                  f"{'yes' if e['ours_success'] else 'no'} | {e['relion_s'] / e['ours_s']:.1f}x |")
        for k in sorted({e["classes"] for e in im.values()}):
            es = [e for e in im.values() if e["classes"] == k]
            walls = sorted(e["relion_s"] / e["ours_s"] for e in es)  # a stopped run's time is a lower bound
            print(f"\nK={k}: {len(es)} cells; RELION success {sum(e['relion_success'] for e in es)}/{len(es)}, "
                  f"ours {sum(e['ours_success'] for e in es)}/{len(es)}; "
                  f"RELION's wall time / ours: {walls[0]:.1f}x to {walls[-1]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reconstruct", action="store_true", help="relion_reconstruct vs backproject, true poses")
    parser.add_argument("--initial-model", action="store_true", help="relion_refine --denovo_3dref --sgd vs ours")
    parser.add_argument("--report", action="store_true", help="print the tables of --json and stop")
    parser.add_argument("--molecules", nargs="+", default=["1GBT", "6WQA", "2XHE", "C3-1K1I", "proc-05"])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--ctf", choices=["off", "on"], nargs="+", default=["on"])
    parser.add_argument("--snr", type=float, nargs="+", default=[0.1])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per RELION run; an initial model "
                        "still running then is stopped and scored at its last written iteration")
    parser.add_argument("--relion-args", nargs=argparse.REMAINDER, default=[],
                        help="extra relion_refine arguments (last on the command line; e.g. fewer iterations)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "compare_relion.json")
    parser.add_argument("--panel-json", type=Path, default=HERE / "results" / "ab_initio_panel.json")
    parser.add_argument("--work", type=Path, default=HERE / ".relion-work")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep each cell's files")
    parser.add_argument("--score-stopped", action="store_true",
                        help="--initial-model: score a run stopped by hand (its folder in --work) at its last "
                             "written iteration, as not finished, instead of running RELION")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.report:
        report(store)
        return
    if not (args.reconstruct or args.initial_model):
        raise SystemExit("error: say --reconstruct, --initial-model or --report")
    if shutil.which("relion_refine") is None:
        raise SystemExit("error: RELION not found: apt-get install relion (Debian's CPU build of RELION 3.1)")
    known = {m.name: m for m in MOLECULES}
    unknown = set(args.molecules) - set(known)
    if unknown:
        raise SystemExit(f"error: unknown molecules {sorted(unknown)}; known: {sorted(known)}")
    store["relion"] = relion_version()
    panel = json.loads(args.panel_json.read_text())["cells"] if args.panel_json.exists() else {}
    jobs = []
    for ctf in (c == "on" for c in args.ctf):
        for snr in args.snr:
            for seed in args.seeds:
                for name in args.molecules:
                    if args.reconstruct:
                        jobs.append(("reconstruct", cell_key(name, args.box, ctf, snr, args.n, seed),
                                     lambda m=known[name], c=ctf, s=snr, sd=seed: compare_reconstruct(
                                         args, m, c, s, args.n, sd)))
                    if args.initial_model:
                        for k in args.classes:
                            jobs.append(("initial_model", f"{cell_key(name, args.box, ctf, snr, args.n, seed)}|K{k}",
                                         lambda m=known[name], c=ctf, s=snr, sd=seed, k=k: compare_initial_model(
                                             args, m, c, s, args.n, sd, k, panel)))
    args.work.mkdir(parents=True, exist_ok=True)
    for part, key, job in jobs:
        if key in store.get(part, {}) and not args.redo:
            continue
        entry = job()
        store.setdefault(part, {})[key] = entry
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=1, allow_nan=True) + "\n")
        tmp.replace(args.json)
        if part == "reconstruct":
            print(f"{key}: FSC RELION vs ours mean {entry['relion_vs_ours']['mean_to_0.9_nyquist']:.3f}; "
                  f"vs truth {entry['relion_vs_truth']['fsc05_angstrom']:.2f} / "
                  f"{entry['ours_vs_truth']['fsc05_angstrom']:.2f} Å; "
                  f"{entry['relion_s']:.1f} / {entry['ours_s']:.1f} s",
                  flush=True)
        else:
            r = entry["relion"]
            print(f"{key}: RELION median {r['median_deg']:.1f}°, FSC0.5 {r['fsc05_angstrom']:.1f} Å, "
                  f"{entry['relion_s']:.0f} s, success {entry['relion_success']} "
                  f"(ours {entry['ours']['median_deg']:.1f}°"
                  f", {entry['ours_s']:.0f} s, success {entry['ours_success']})", flush=True)
    report(store)


if __name__ == "__main__":
    main()

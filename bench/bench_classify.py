"""Benchmark of 2D classification (issue 21, "Figures to reach"): simulate an unseen molecule, classify it, score it.

For each molecule:

1. ``cryofastar-stream simulate`` (the real command, a subprocess) writes a session of a held-out molecule of
   bench/panel_molecules.py (real evaluation structures nobody trained or tuned on, or procedural molecules of
   held-out seeds; its pixel size by the panel's one rule: the molecule's largest diameter spans 0.7 of the
   box), default 10,000 particles, box 64, SNR 0.1, with CTF and 20 % junk; or, to tune a method (never to
   report its figures), a training structure named ``train:<file name>`` (cryofastar.datasets, role "train");
2. ``cryofastar-stream classify SESSION/particles.star -o OUT --classes 50`` (a subprocess), timed by the wall
   clock (process start to exit, so Python's start-up counts against it) — the rate the command prints, if
   any, is reported beside it;
3. bench/classify_eval.py scores the output files against the session's truth, and a table of the figures
   is printed next to the issue's targets, met or not, and written as JSON to
   ``bench/results/classify_<tag>.json``;
4. two controls are scored the same way (``--no-controls`` skips them): the CEILING, the same number of
   classes made from the true poses (real particles clustered by true view direction, Wiener averages of the
   truly aligned particles: :func:`classify_eval.ceiling_classification`), and the FLOOR, one Wiener average
   of all real particles, every view in it. The issue's low-passed correlation cannot tell the floor's blob
   from a view (it scores ~0.95); the band-passed one (40-10 Å) can, and is printed beside it.

The throughput targets of the issue are for the 2D lane running beside the 3D lane in the daemon; this script
measures the offline command alone and says so in its table.

Example usage::

    .venv/bin/python bench/bench_classify.py                       # 2XHE, 10,000 particles, box 64
    .venv/bin/python bench/bench_classify.py --n 2000 --classes 20 --tag small
    .venv/bin/python bench/bench_classify.py --molecules 2XHE,1GBT,proc-05 --junk 0
    .venv/bin/python bench/bench_classify.py --box 128 --extra-args "--device cpu"
    .venv/bin/python bench/bench_classify.py --molecules train:19hc.pdb,train:pdb7pbl.pdb --no-controls
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from classify_eval import GOOD_CORRELATION, ceiling_classification, evaluate_classification  # noqa: E402
from panel_molecules import (  # noqa: E402
    MOLECULES,
    Molecule,
    atoms_of,
    pixel_size,
    structure_path,
    symmetry_operators,
)

RESULTS = Path(__file__).parent / "results"
DEFAULT_MOLECULE = "2XHE"
"""A held-out real structure (6,267 atoms, flat, no symmetry; 2.7 Å/px at box 64 by the panel's rule)."""
TARGETS = {
    "good_fraction": 0.80,  # share of real particles whose class average correlates >= 0.9
    "inplane_median_degrees": 5.0,  # below
    "junk_precision": 0.90,
    "junk_recall": 0.80,
    "throughput": {64: 300.0, 128: 100.0},  # particles/s on 2 cores
}
"""The issue's targets."""


def cli_command() -> list[str]:
    """The ``cryofastar-stream`` of this environment (beside the running Python, else on PATH; also for
    bench_classify_lane.py)."""
    beside = Path(sys.executable).with_name("cryofastar-stream")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("cryofastar-stream")
    if found is None:
        raise SystemExit("cryofastar-stream not found (install the package: pip install -e .)")
    return [found]


def molecule_named(name: str) -> Molecule:
    """The panel's molecule ``name`` (case-insensitive), ``train:<file name>`` (a training structure, to tune
    on), or a clear error listing them."""
    if name.lower().startswith("train:"):
        molecule = Molecule(name, name)
        try:
            structure_path(molecule)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        return molecule
    for molecule in MOLECULES:
        if molecule.name.lower() == name.lower():
            return molecule
    raise SystemExit(f"unknown molecule {name!r}; the held-out panel: {', '.join(m.name for m in MOLECULES)}")


def _structure_args(molecule: Molecule, seed: int) -> tuple[list[str], int]:
    """``simulate`` arguments that make ``molecule``, and the seed to simulate with."""
    kind, _, rest = molecule.source.partition(":")
    if kind in ("eval", "train"):
        return ["--structure", str(structure_path(molecule))], seed
    if kind == "procedural":  # simulate's procedural molecule is made from its --seed
        return [], int(rest)
    raise SystemExit(f"{molecule.name}: a {kind} molecule is built in memory by bench/panel_molecules.py and has no "
                     "structure file for the simulate command; choose an eval: or procedural: molecule")


def _run(command: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``command``, its output to ``log``; return (exit status, wall seconds, output)."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(f"$ {shlex.join(command)}\n{done.stdout}\n[exit {done.returncode}, {wall:.1f} s]\n")
    return done.returncode, wall, done.stdout


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _printed_rate(output: str) -> float | None:
    """The last ``N particles/s`` (or ``p/s``) the command printed, if any."""
    found = re.findall(r"([0-9][0-9,]*(?:\.[0-9]+)?)\s*(?:particles|p)\s*/\s*s", output)
    return float(found[-1].replace(",", "")) if found else None


def run_molecule(name: str, args: argparse.Namespace) -> dict:
    """Simulate, classify and evaluate one molecule; return its record (module docstring)."""
    molecule = molecule_named(name)
    atoms = atoms_of(molecule)
    apix = args.apix if args.apix is not None else pixel_size(atoms, args.box)
    structure, seed = _structure_args(molecule, args.seed)
    label = f"{molecule.name}-n{args.n}-b{args.box}-snr{args.snr:g}-junk{args.junk:g}-seed{seed}"
    root = Path(args.work) / label
    session, out = root / "session", root / "classify"
    record = {"molecule": molecule.name, "source": molecule.source, "atoms": len(atoms), "apix": apix,
              "n": args.n, "box": args.box, "snr": args.snr, "ctf": not args.no_ctf, "junk_fraction": args.junk,
              "seed": seed, "classes": args.classes, "extra_args": args.extra_args, "work": str(root)}
    root.mkdir(parents=True, exist_ok=True)
    cli = cli_command()

    if args.reuse and (session / "particles.star").is_file() and (session / "reference.mrc").is_file():
        print(f"[{molecule.name}] reusing the session in {session}")
    else:
        if session.exists():
            shutil.rmtree(session)
        simulate = [*cli, "simulate", "--out", str(session), *structure, "--n", str(args.n), "--box", str(args.box),
                    "--apix", f"{apix:g}", "--snr", f"{args.snr:g}", "--no-ctf" if args.no_ctf else "--ctf",
                    "--seed", str(seed)]
        if args.junk > 0:
            simulate += ["--junk", f"{args.junk:g}"]
        print(f"[{molecule.name}] simulating: {shlex.join(simulate)}", flush=True)
        rc, wall, output = _run(simulate, root / "simulate.log")
        if rc != 0:
            print(f"[{molecule.name}] simulate failed (exit {rc}):\n{_tail(output)}")
            return {**record, "error": f"simulate exited {rc}", "output_tail": output[-3000:]}
        print(f"[{molecule.name}] simulated in {wall:.0f} s")

    if out.exists():
        shutil.rmtree(out)
    classify = [*cli, "classify", str(session / "particles.star"), "-o", str(out), "--classes", str(args.classes),
                *shlex.split(args.extra_args)]
    print(f"[{molecule.name}] classifying: {shlex.join(classify)}", flush=True)
    rc, wall, output = _run(classify, root / "classify.log")
    record["classify_wall_seconds"] = round(wall, 2)
    record["classify_output_tail"] = output[-3000:]
    print(_tail(output, 8))
    if rc != 0:
        print(f"[{molecule.name}] classify failed (exit {rc}) after {wall:.1f} s")
        return {**record, "error": f"classify exited {rc}"}
    record["throughput_wall"] = round(args.n / wall, 1)
    record["throughput_printed"] = _printed_rate(output)
    print(f"[{molecule.name}] classified {args.n} particles in {wall:.1f} s ({args.n / wall:.0f} particles/s, "
          f"wall clock with start-up); evaluating...", flush=True)

    start = time.perf_counter()
    report = evaluate_classification(out, session, lowpass_angstrom=args.lowpass_angstrom,
                                     symmetry=symmetry_operators(molecule))
    record["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    record["symmetry_operators"] = int(len(symmetry_operators(molecule)))
    record["report"] = report
    if not args.no_controls:
        for name_, k in (("ceiling", args.classes), ("floor", 1)):
            start = time.perf_counter()
            ceiling_classification(session, root / name_, k, seed=args.seed)
            record[name_] = evaluate_classification(root / name_, session, lowpass_angstrom=args.lowpass_angstrom,
                                                    symmetry=symmetry_operators(molecule))
            print(f"[{molecule.name}] {name_} ({k} class{'es' if k > 1 else ''} from the true poses) scored in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return record


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def figures(record: dict, junk_fraction: float) -> list[tuple[str, str, str, str]]:
    """Rows (figure, measured, target, met) of one molecule's record."""
    rows = []
    if "report" not in record:
        return [("run", record.get("error", "?"), "", "FAILED")]
    r = record["report"]
    ok = lambda flag: "yes" if flag else "NO"  # noqa: E731
    good = r["good_fraction"]
    rows.append((f"real particles in classes with corr >= {GOOD_CORRELATION:g} ({r['lowpass_angstrom']} Å low-pass)",
                 _fmt(100 * good, ".1f") + " %", f">= {100 * TARGETS['good_fraction']:.0f} %",
                 ok(good >= TARGETS["good_fraction"])))
    rows.append(("  same, unfiltered correlation (info)", _fmt(100 * r["good_fraction_unfiltered"], ".1f") + " %",
                 "", ""))
    rows.append((f"  same, band-passed {r['highpass_angstrom']}-{r['lowpass_angstrom']} Å (info)",
                 _fmt(100 * r["good_fraction_bandpass"], ".1f") + " %", "", ""))
    rows.append(("  median class correlation, low-passed / band-passed (info)",
                 f"{_fmt(r['median_class_correlation'], '.3f')} / "
                 f"{_fmt(r['median_class_correlation_bandpass'], '.3f')}", "", ""))
    for control in ("ceiling", "floor"):
        if control in record:
            c = record[control]
            what = "true poses, same classes" if control == "ceiling" else "one class, all views"
            rows.append((f"  {control} ({what}): good % / median low-passed / band-passed",
                         f"{_fmt(100 * c['good_fraction'], '.0f')} % / {_fmt(c['median_class_correlation'], '.3f')} / "
                         f"{_fmt(c['median_class_correlation_bandpass'], '.3f')}", "", ""))
    ip = r["inplane"]
    if ip["n_particles"]:
        rows.append((f"in-plane error, median ({ip['n_particles']} real particles in good classes)",
                     _fmt(ip["median_degrees"], ".2f") + "°", f"< {TARGETS['inplane_median_degrees']:g}°",
                     ok(ip["median_degrees"] < TARGETS["inplane_median_degrees"])))
        rows.append(("  in-plane error, 90th percentile (info)", _fmt(ip["p90_degrees"], ".2f") + "°", "", ""))
        rows.append(("  out-of-plane (swing), median / 90th pct (info)",
                     f"{_fmt(ip['swing_median_degrees'], '.2f')}° / {_fmt(ip['swing_p90_degrees'], '.2f')}°", "", ""))
    else:
        rows.append(("in-plane error, median", "no good class", f"< {TARGETS['inplane_median_degrees']:g}°", "NO"))
    junk = r["junk"]
    if junk is not None:
        applies = abs(junk_fraction - 0.2) < 1e-9
        target_p = f">= {100 * TARGETS['junk_precision']:.0f} %" + ("" if applies else " (at 20 % junk)")
        target_r = f">= {100 * TARGETS['junk_recall']:.0f} %" + ("" if applies else " (at 20 % junk)")
        rows.append((f"junk precision ({junk['n_flagged']} flagged, {junk['n_junk']} junk)",
                     _fmt(100 * junk["precision"], ".1f") + " %", target_p,
                     ok(junk["precision"] >= TARGETS["junk_precision"]) if applies else "n/a"))
        rows.append(("junk recall", _fmt(100 * junk["recall"], ".1f") + " %", target_r,
                     ok(junk["recall"] >= TARGETS["junk_recall"]) if applies else "n/a"))
        for kind, value in junk["recall_by_type"].items():
            rows.append((f"  recall, {kind} ({junk['count_by_type'][kind]})", _fmt(100 * value, ".1f") + " %", "", ""))
        rows.append(("  real particles flagged junk (info)", str(junk["real_flagged"]), "", ""))
    target = TARGETS["throughput"].get(record["box"])
    rate = record["throughput_wall"]
    rows.append(("throughput, offline classify alone, wall clock", _fmt(rate, ".0f") + " p/s",
                 f">= {target:g} p/s (beside 3D)" if target else "(no target at this box)",
                 (ok(rate >= target) if target else "")))
    if record.get("throughput_printed") is not None:
        rows.append(("  rate the command printed (info)", _fmt(record["throughput_printed"], ".0f") + " p/s", "", ""))
    return rows


def _print_table(record: dict, junk_fraction: float) -> None:
    rows = figures(record, junk_fraction)
    width = max(len(r[0]) for r in rows)
    print(f"\n{record['molecule']} ({record['source']}): {record['n']} particles, box {record['box']}, "
          f"{record['apix']:g} Å/px, SNR {record['snr']:g}, CTF {'on' if record['ctf'] else 'off'}, "
          f"junk {record['junk_fraction']:g}, {record['classes']} classes")
    print(f"{'figure':<{width}}  {'measured':>14}  {'target':<28}  met")
    for figure, measured, target, met in rows:
        print(f"{figure:<{width}}  {measured:>14}  {target:<28}  {met}")


def json_safe(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python (also for bench_classify_lane.py)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--molecule", default=DEFAULT_MOLECULE, help=f"panel molecule (default {DEFAULT_MOLECULE})")
    p.add_argument("--molecules", default=None, help="comma-separated panel molecules (overrides --molecule)")
    p.add_argument("--n", type=int, default=10_000, help="particles (default 10,000)")
    p.add_argument("--box", type=int, default=64, help="box, px (default 64)")
    p.add_argument("--snr", type=float, default=0.1, help="SNR (default 0.1)")
    p.add_argument("--apix", type=float, default=None, help="pixel size, Å (default: the panel's rule per molecule)")
    p.add_argument("--no-ctf", action="store_true", help="simulate without a CTF (default: with)")
    p.add_argument("--classes", type=int, default=50, help="classes (default 50)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (a procedural molecule's is its own)")
    p.add_argument("--junk", type=float, default=0.2, help="junk fraction (default 0.2; 0 for none)")
    p.add_argument("--lowpass-angstrom", type=float, default=10.0, help="low-pass of the correlation (Å)")
    p.add_argument("--work", default="/tmp/bench_classify", help="working directory (sessions, outputs, logs)")
    p.add_argument("--reuse", action="store_true", help="reuse a session already simulated with these settings")
    p.add_argument("--extra-args", default="", help="extra arguments for classify (one string)")
    p.add_argument("--no-controls", action="store_true", help="skip the ceiling and floor controls")
    p.add_argument("--tag", default=None, help="JSON name: bench/results/classify_<tag>.json")
    args = p.parse_args(argv)
    if not 0 <= args.junk < 1:
        p.error("--junk must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [m.strip() for m in args.molecules.split(",") if m.strip()] if args.molecules else [args.molecule]
    for name in names:
        molecule_named(name)  # every name checked before anything runs
    tag = args.tag or f"{'-'.join(names)}_n{args.n}_b{args.box}_junk{args.junk:g}"
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__}
    records = []
    for name in names:
        record = run_molecule(name, args)
        records.append(record)
        _print_table(record, args.junk)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"classify_{tag}.json"
    payload = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": machine, "targets": {k: v for k, v in TARGETS.items() if k != "throughput"},
               "throughput_targets": {str(k): v for k, v in TARGETS["throughput"].items()},
               "good_correlation": GOOD_CORRELATION, "molecules": records}
    path.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    print(f"\nwrote {path}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())

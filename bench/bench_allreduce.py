"""What sharing ``reconstruct`` over ranks costs: the all-reduce of the half-set grids, and --nproc 1 against 2.

Prints, for each box, the bytes one all-reduce of a :class:`~cryofastar.recon.HalfSetAccumulator` sums (from the
real accumulator's tensors, :func:`cryofastar.engine.distributed.allreduce_bytes`) and the measured wall time of
that all-reduce between two gloo ranks on this machine (started by torch's own launcher, as ``reconstruct --nproc
2`` starts them; median of ``--repeats``); a box whose two ranks' grids would not fit in the memory available is
reported by size only. How often offline needs it: once per map (1 after posing, 1 per refinement round, 1 for
ab initio's map), as ``reconstruct`` counts them.

Then (unless ``--no-reconstruct``) one simulated set is reconstructed with ``--nproc 1`` and ``--nproc 2`` (the
same settings, in this machine's order: 1 then 2), with both wall times, the per-stage times of each run and how
far apart their maps are. Figures go to ``--json``.

    python bench/bench_allreduce.py --json bench/results/bench_allreduce_cpu.json
    python bench/bench_allreduce.py --boxes 64 128 --no-reconstruct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from cryofastar.engine import distributed as d
from cryofastar.engine.offline import ReconstructSettings, reconstruct_on_ranks
from cryofastar.recon import HalfSetAccumulator

SCRIPT = Path(sys.executable).parent / "cryofastar-stream"


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def time_allreduce(boxes: list[int], repeats: int) -> dict[int, list[float]]:
    """Worker (each rank): all-reduce a filled accumulator of each box ``repeats`` times; seconds per call."""
    ranks = d.Ranks.join("cpu")
    times: dict[int, list[float]] = {}
    try:
        for box in boxes:
            acc = HalfSetAccumulator(box, 1.0)
            acc.grids.fill_(1.0)
            times[box] = []
            for _ in range(repeats):
                torch.distributed.barrier()  # both ranks start together: the time is the transfer, not a wait
                start = time.perf_counter()
                d.all_reduce_accumulator(acc, ranks)
                times[box].append(time.perf_counter() - start)
            del acc
    finally:
        ranks.leave()
    return times


def reconstruct_pair(n: int, box: int, apix: float, snr: float, seed: int, workdir: Path) -> dict:
    """Simulate one set, reconstruct it with --nproc 1 then --nproc 2; wall and stage times, map difference."""
    session = workdir / f"session_n{n}_b{box}_snr{snr:g}_seed{seed}"
    if not (session / "particles.star").exists():
        subprocess.run([str(SCRIPT), "simulate", "--out", str(session), "--n", str(n), "--box", str(box), "--apix",
                        str(apix), "--snr", str(snr), "--ctf", "--seed", str(seed)], check=True, capture_output=True)
    runs = {}
    for nproc in (1, 2):
        out = workdir / f"recon_nproc{nproc}"
        settings = ReconstructSettings(device="cpu", nproc=nproc)
        start = time.perf_counter()
        result = reconstruct_on_ranks(session / "particles.star", out, settings)
        wall = time.perf_counter() - start
        assert result is not None
        runs[nproc] = {"wall_seconds": round(wall, 2), "total_seconds": round(result.total_seconds, 2),
                       "pose_seconds": round(result.pose_seconds, 2), "insert_seconds": round(result.insert_seconds, 2),
                       "refine_seconds": round(result.refine_seconds, 2),
                       "ab_initio_seconds": round(result.ab_initio_seconds, 2), "refine_modes": result.refine_modes,
                       "allreduces": result.allreduces, "allreduce_seconds": round(result.allreduce_seconds, 3),
                       "allreduce_bytes": result.allreduce_bytes,
                       "resolution_angstrom": round(result.resolution_angstrom, 2)}
        print(f"--nproc {nproc}: {wall:.1f} s wall ({result.total_seconds:.1f} s in the job): posing "
              f"{result.pose_seconds:.1f} s, inserting {result.insert_seconds:.1f} s, refinement "
              f"{result.refine_seconds:.1f} s ({', '.join(result.refine_modes)}; ab initio "
              f"{result.ab_initio_seconds:.1f} s), {result.allreduces} all-reduces in {result.allreduce_seconds:.2f} s;"
              f" {result.resolution_angstrom:.2f} Å", flush=True)
    one = mrcfile.read(workdir / "recon_nproc1" / "volume.mrc").astype(np.float64)
    two = mrcfile.read(workdir / "recon_nproc2" / "volume.mrc").astype(np.float64)
    difference = float(np.abs(one - two).max() / one.std())
    print(f"max |map(--nproc 2) - map(--nproc 1)| = {difference:.2e} x the map's std")
    return {"particles": n, "box": box, "apix": apix, "snr": snr, "seed": seed, "ctf": True,
            "settings": "reconstruct defaults (network poses, 4 refinement rounds, refine box 64), --device cpu",
            "runs": {f"nproc_{k}": v for k, v in runs.items()}, "map_max_abs_difference_over_std": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--apix", type=float, default=2.0)
    parser.add_argument("--snr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1000000005)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the simulated set and maps here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
          f"2 gloo ranks on this machine, {_available_bytes() / 2**30:.1f} GiB available")
    sizes = {box: d.allreduce_bytes(box) for box in args.boxes}
    # both ranks' grids, gloo's buffer of the same size on each, and a margin
    fits = [box for box in args.boxes if 3 * 2 * sizes[box] < _available_bytes()]
    times = d.launch(2, time_allreduce, fits, args.repeats) if fits else {0: {}}
    figures = {"boxes": []}
    print(f"{'box':>5} {'MiB per all-reduce':>19} {'seconds (median)':>17} {'GB/s':>6}")
    for box in args.boxes:
        measured = times[0].get(box)
        median = float(np.median(measured)) if measured else None
        row = {"box": box, "bytes": sizes[box], "mib": round(sizes[box] / 2**20, 1),
               "seconds_median": None if median is None else round(median, 4),
               "seconds_each": None if measured is None else [round(t, 4) for t in measured],
               "not_measured": None if measured else f"two ranks' grids ({2 * sizes[box] / 2**30:.1f} GiB) and gloo's "
                                                     "buffers do not fit in the memory available"}
        figures["boxes"].append(row)
        seconds = f"{median:17.4f}" if median is not None else f"{'not measured':>17}"
        rate = f"{sizes[box] / median / 1e9:6.2f}" if median else "     -"
        print(f"{box:>5} {sizes[box] / 2**20:>19.1f} {seconds} {rate}")
    figures["how_often"] = ("once per map: 1 after posing, 1 per refinement round (best and local), 1 for ab "
                            "initio's map when it runs; the default network job with ab initio: 1 + 4 + 1 = 6")
    print(figures["how_often"])
    if args.reconstruct:
        with tempfile.TemporaryDirectory() as scratch:
            workdir = args.workdir or Path(scratch)
            workdir.mkdir(parents=True, exist_ok=True)
            figures["reconstruct"] = reconstruct_pair(args.n, args.box, args.apix, args.snr, args.seed, workdir)
    figures["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "processor": platform.processor()}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

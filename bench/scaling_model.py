"""docs/scaling.md's throughput model, from measured per-particle costs and all-reduce sizes, against measured runs.

A benchmark script, not a test. It reads the per-particle costs of ``bench/bench_stage_costs.py``
(``--costs``, measured on the same kind of particles as the run to predict) and the all-reduce
figures and measured ``reconstruct --nproc 1/2`` runs of ``bench/bench_allreduce.py``
(``--allreduce``), and prints:

1. **The offline job** (``reconstruct``, default network job: posing, a ``best`` round, ab initio,
   3 ``local`` rounds, 5 back-projections; docs/scaling.md) predicted for 1 and 2 ranks on the
   measuring machine, beside the measured wall times, and the relative error (target: within 25 %).
   ``T(N) = launch(N) + [n c_net + B n c_ins + n (c_best + L c_local)] / S(N) + T_ab + M t_ar(N)``:
   the shared work divided by the speed-up ``S(N)`` of N ranks over the cores they share
   (``min(N, cores) / cores`` of one process that uses every core already: 1 on this 2-core
   machine), ab initio on rank 0 alone (``T_ab = bootstrap + (n - seed) c_ab_add + (passes - 1) n
   c_ab_repose``), ``M`` all-reduces of ``t_ar`` each (0 with one rank), ``launch`` the measured
   start of the workers (0 with one rank). Then the same with the per-particle costs taken from the
   measured 1-rank run itself (its 1-rank row is the calibration, its 2-rank row the prediction).
2. **Projections** for 8 GPUs and 4 nodes x 8 GPUs of a 1,000,000-particle job at box 128 and
   256: per-GPU per-particle costs are *not measured* (no GPU was lent), so they are the CPU costs
   times a factor ``--gpu-factor`` (one GPU's time per particle over 2 CPU cores'), and the
   all-reduce a ring over ``--nvlink-gbs`` GB/s within a node and ``--network-gbs`` between nodes.
   What the model says is the shape: the serial share (ab initio on rank 0, rank 0's maps) and
   the all-reduces against the work that divides.
3. **A live session** (``watch --nproc``, docs/scaling.md "Live: watch --nproc") predicted for 1 and
   2 ranks against ``bench/bench_watch_ranks.py``'s measured runs (``--live``, run with
   ``--no-refine``: the stream's own work). N ranks on C cores, each with C // N torch threads and
   the per-particle costs measured at that many threads (``--costs-threads``: ``bench_stage_costs.py
   --threads 1``): each rank reads, poses and inserts n / N particles, rank 0 also makes the maps
   (one per ``publish_particles`` and a last one), and every rank spends ``t_reduce`` of each
   ``SYNC_SECONDS`` in the sync:
   ``T(N) = (n / N (c_read + c_net + c_ins) + M c_map) / (1 - t_reduce / SYNC)``, compared with the
   measured steady rates (10 to 90 % of the particles in the map): their mean per rank count, and each
   run (they vary by ±15 % on this VM).

    python bench/scaling_model.py
    python bench/scaling_model.py --costs bench/results/stage_costs_b64_snr1.json --gpu-factor 0.02
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SEED_PARTICLES = 1000  # ab initio's seed set (AbInitioSettings().seed_particles)
AB_INITIO_PASSES = 2  # engine.policy.AB_INITIO_PASSES
LOCAL_ROUNDS = 3  # the default job after ab initio: 4 rounds - the best probe
BACKPROJECTIONS = 5  # after posing, after best, after each local round (ab initio's map comes with it)
ALLREDUCES = 6  # one per map: posing, best, ab initio, 3 local


def offline_seconds(n: int, costs: dict, speedup: float, allreduce_s: float, launch_s: float) -> dict[str, float]:
    """The default network job's predicted wall time (s), by part: the work every rank shares (divided by
    ``speedup``), what rank 0 does alone (ab initio, the maps), ``ALLREDUCES`` all-reduces of ``allreduce_s``
    and the workers' start ``launch_s``."""
    ms = 1e-3
    shared = n * ms * (costs["network_ms"] + BACKPROJECTIONS * costs["insert_ms"] + costs["best_ms"]
                       + LOCAL_ROUNDS * costs["local_ms"])
    ab = (costs["ab_initio_bootstrap_s"] + max(0, n - SEED_PARTICLES) * ms * costs["ab_initio_add_ms"]
          + (AB_INITIO_PASSES - 1) * n * ms * costs["ab_initio_repose_ms"])
    parts = {"shared": shared / speedup, "ab_initio_rank0": ab, "maps_rank0": ALLREDUCES * costs["map_s"],
             "allreduce": ALLREDUCES * allreduce_s, "launch": launch_s}
    parts["total"] = sum(parts.values())
    return parts


SYNC_SECONDS = 2.0  # daemon.rank_sync.SYNC_SECONDS


def live_seconds(n: int, ranks: int, costs: dict, maps: int, reduce_s: float) -> dict[str, float]:
    """A live burst of ``n`` particles on ``ranks`` ranks, without refinement (module docstring, 3.): the slowest
    rank's (rank 0's) time by part, ``costs`` at the threads each rank has."""
    ms = 1e-3
    parts = {"read_pose_insert": n / ranks * ms * (costs["read_ms"] + costs["network_ms"] + costs["insert_ms"]),
             "maps_rank0": maps * costs["map_s"]}
    busy = sum(parts.values())
    parts["syncs"] = busy / (1 - reduce_s / SYNC_SECONDS) - busy if ranks > 1 else 0.0
    parts["total"] = busy + parts["syncs"]
    return parts


def ring_seconds(bytes_: int, ranks: int, gbs: float) -> float:
    """A ring all-reduce of ``bytes_`` over ``ranks`` at ``gbs`` GB/s per link (latency left out)."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * bytes_ / (gbs * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", type=Path, default=RESULTS / "stage_costs_b64_snr1.json")
    parser.add_argument("--costs-128", type=Path, default=RESULTS / "stage_costs_b128.json")
    parser.add_argument("--allreduce", type=Path, default=RESULTS / "bench_allreduce_cpu.json")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--live", type=Path, nargs="+", default=[RESULTS / "watch_ranks_b128_norefine.json",
                                                                  RESULTS / "watch_ranks_b128_norefine_repeat.json"],
                        help="bench_watch_ranks.py's runs (--no-refine, same settings) to predict")
    parser.add_argument("--costs-threads", type=Path, default=RESULTS / "stage_costs_b128_1thread.json",
                        help="bench_stage_costs.py --threads 1 (one rank of 2 on 2 cores)")
    parser.add_argument("--publish-particles", type=int, default=2000, help="the daemon's default")
    parser.add_argument("--launch-seconds", type=float, default=2.6, help="measured start of the workers")
    parser.add_argument("--gpu-factor", type=float, default=0.02,
                        help="assumed time per particle on one GPU over 2 CPU cores' (not measured)")
    parser.add_argument("--nvlink-gbs", type=float, default=150.0)
    parser.add_argument("--network-gbs", type=float, default=25.0)
    args = parser.parse_args()
    costs = json.loads(args.costs.read_text())["costs"]
    allreduce = json.loads(args.allreduce.read_text())
    runs = allreduce["reconstruct"]["runs"]
    n = allreduce["reconstruct"]["particles"]
    box = allreduce["reconstruct"]["box"]
    t_ar = next(b["seconds_median"] for b in allreduce["boxes"] if b["box"] == box)
    print(f"# offline: {n} particles at box {box}, costs from {args.costs.name}, {args.cores} cores")
    print(f"{'ranks':>5} {'predicted s':>12} {'measured s':>11} {'error':>7}   parts (s)")
    for ranks in (1, 2):  # N ranks on the same cores as one process that uses them all: no speed-up
        speedup = max(1.0, ranks / args.cores)
        parts = offline_seconds(n, costs, speedup, t_ar if ranks > 1 else 0.0,
                                args.launch_seconds if ranks > 1 else 0.0)
        measured = runs[f"nproc_{ranks}"]["wall_seconds"]
        error = parts["total"] / measured - 1
        shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
        print(f"{ranks:>5} {parts['total']:>12.1f} {measured:>11.1f} {100 * error:>+6.0f}%   {shown}")

    # the same model with its per-particle costs taken from the measured 1-rank run's own stage times (the
    # matching costs depend on the band each round runs at, and ab initio's on how many random starts it needs;
    # bench_stage_costs measures both at one band and one seed): the 1-rank row is then the calibration and the
    # 2-rank row the prediction
    one = runs["nproc_1"]
    shared_1 = one["wall_seconds"] - one["ab_initio_seconds"]
    print(f"# calibrated on the 1-rank run: shared {shared_1:.1f} s, ab initio on rank 0 "
          f"{one['ab_initio_seconds']:.1f} s")
    for ranks in (1, 2):
        speedup = max(1.0, ranks / args.cores)
        total = (shared_1 / speedup + one["ab_initio_seconds"] + (ALLREDUCES * t_ar + args.launch_seconds
                                                                  if ranks > 1 else 0.0))
        measured = runs[f"nproc_{ranks}"]["wall_seconds"]
        print(f"{ranks:>5} {total:>12.1f} {measured:>11.1f} {100 * (total / measured - 1):>+6.0f}%")

    if all(path.exists() for path in args.live) and args.costs_threads.exists():
        files = [json.loads(path.read_text()) for path in args.live]
        live = files[0]
        by_threads = {args.cores: json.loads(args.costs_128.read_text())["costs"],
                      1: json.loads(args.costs_threads.read_text())["costs"]}
        reduce_s = next(b["seconds_median"] for b in allreduce["boxes"] if b["box"] == live["settings"]["box"])
        n_live = live["settings"]["n"]
        maps = -(-n_live // args.publish_particles) + 1
        print(f"\n# live burst: {n_live} particles at box {live['settings']['box']}, --no-refine, {maps} maps, "
              f"a reduce of {reduce_s:.3f} s every {SYNC_SECONDS:.0f} s")
        print(f"{'ranks':>5} {'predicted p/s':>14} {'measured p/s (mean)':>20} {'error':>7}   runs; parts (s)")
        runs_by_ranks: dict[int, list[float]] = {}
        for each in files:
            for run in each["runs"]:
                runs_by_ranks.setdefault(run["nproc"], []).append(run["steady_rate"])
        for ranks, rates in sorted(runs_by_ranks.items()):
            parts = live_seconds(n_live, ranks, by_threads[max(1, args.cores // ranks)], maps, reduce_s)
            predicted = n_live / parts["total"]
            mean = sum(rates) / len(rates)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
            each_run = " / ".join(f"{rate:.1f} ({100 * (predicted / rate - 1):+.0f}%)" for rate in rates)
            print(f"{ranks:>5} {predicted:>14.1f} {mean:>20.1f} {100 * (predicted / mean - 1):>+6.0f}%   "
                  f"{each_run}; {shown}")

    big = json.loads(args.costs_128.read_text())["costs"]
    print(f"\n# projection: 1,000,000 particles, GPU per-particle cost = {args.gpu_factor} x 2 CPU cores' "
          f"(assumed), ring all-reduce {args.nvlink_gbs} GB/s in a node, {args.network_gbs} GB/s between nodes")
    print(f"{'box':>4} {'GPUs':>5} {'hours':>7} {'speed-up':>9} {'serial share':>13} {'all-reduce share':>17}")
    bytes_by_box = {b["box"]: b["bytes"] for b in allreduce["boxes"]}
    for box_ in (128, 256):
        scale = (box_ / 128) ** 3  # insertion and maps grow with the grid; matching runs at the working box
        gpu = {k: v * args.gpu_factor for k, v in big.items()}
        gpu["insert_ms"] *= scale
        gpu["map_s"] = big["map_s"] * scale * args.gpu_factor
        one = None
        for ranks, nodes in ((1, 1), (8, 1), (32, 4)):
            t_ar = ring_seconds(bytes_by_box[box_], ranks, args.nvlink_gbs if nodes == 1 else args.network_gbs)
            parts = offline_seconds(1_000_000, gpu, float(ranks), t_ar, 0.0)  # one GPU per rank
            one = one or parts["total"]
            serial = (parts["ab_initio_rank0"] + parts["maps_rank0"]) / parts["total"]
            print(f"{box_:>4} {ranks:>5} {parts['total'] / 3600:>7.2f} {one / parts['total']:>9.1f} "
                  f"{serial:>13.2f} {parts['allreduce'] / parts['total']:>17.4f}")

if __name__ == "__main__":
    main()

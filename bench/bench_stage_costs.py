"""Per-particle cost of each step the daemon runs on a particle, at one box, on this machine.

A benchmark, not a test: the figures docs/scaling.md's throughput model is built from. One
procedural molecule (held out, seed 1,000,000,007) is simulated at ``--box`` px, ``--apix``
Å, SNR ``--snr`` with a CTF; the steps are timed on ``--n`` particles (each after one
warm-up call), in this process's torch threads:

- **read**: reading the images from an ``.mrcs`` stack in the page cache the way the daemon's reader
  does (:meth:`~cryofastar.recon.io.source.ParticleSource.chunks` of 512, the pixel checks included) and
  their fingerprints (:func:`~cryofastar.daemon.fingerprints.image_fingerprints`), per particle;
- **network**: a 128-view forward pass + pose solve of the shipped network at its model box
  (:class:`~cryofastar.engine.posing.NetworkPoser`, reference chosen first), per particle;
- **insert** / **remove**: :class:`~cryofastar.recon.HalfSetAccumulator` ``add`` / ``remove``
  (nearest, the daemon's default), with CTF;
- **map**: one full-box map set from the grids (two half maps, the full map, the FSC), per map;
- **reference**: building :class:`~cryofastar.recon.refinement.RefinementReference` from it, per map;
- **local**, **global**, **coarse**, **best**: :meth:`RefinementReference.match` at the daemon's
  working box (``--refine-box``, 64), against the true map;
- **ab initio add** / **re-pose**: the streaming ab initio's per-particle steps after a bootstrap
  on ``--seed-particles`` particles (its bootstrap time is printed too, per bootstrap).

    python bench/bench_stage_costs.py                       # box 128, 512 particles
    python bench/bench_stage_costs.py --box 64 --json costs64.json
    python bench/bench_stage_costs.py --threads 1 --no-ab-initio   # one rank's costs when 2 share 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import mrcfile
import torch
from cryofastar.daemon.fingerprints import image_fingerprints
from cryofastar.engine.posing import NetworkPoser
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ab_initio import AbInitioSettings, run_ab_initio
from cryofastar.recon.io import ParticleSource
from cryofastar.recon.map_set import map_set
from cryofastar.recon.refinement import RefinementReference, RefineSettings, images_to_working_box
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles


def timed(fn, n: int) -> float:  # noqa: ANN001 - a benchmark helper
    """Seconds per item of ``fn()`` over ``n`` items (one call)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=512, help="particles each step is timed on")
    parser.add_argument("--refine-box", type=int, default=64)
    parser.add_argument("--seed-particles", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; one rank of N on C cores has C // N)")
    parser.add_argument("--ab-initio", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the ab initio's bootstrap and steps (about 100 s at box 128)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, box, apix = args.n, args.box, args.apix
    total = max(2 * n, args.seed_particles + n)
    volume = atoms_to_volume(procedural_molecule(1_000_000_007), box, apix)
    sim = simulate_particles(volume, total, apix, args.snr, torch.Generator().manual_seed(0), ctf=CtfRange())
    images, rotations, origins, ctf = sim.images, sim.rotations, sim.origins_angstrom, sim.ctf
    halves = 1 + torch.arange(total) % 2
    costs: dict[str, float] = {}
    at = torch.arange(n)

    with tempfile.TemporaryDirectory(prefix="cryofastar-costs-") as folder:
        stack = Path(folder) / "particles.mrcs"
        with mrcfile.new(stack) as mrc:
            mrc.set_data(images[:n].numpy().astype("float32"))
            mrc.set_image_stack()
            mrc.voxel_size = apix

        def read() -> None:
            for chunk in ParticleSource.from_stack(stack).chunks(512):
                image_fingerprints(chunk.images)

        read()  # warm-up (and the page cache)
        costs["read_ms"] = 1e3 * timed(read, n)

    poser = NetworkPoser.load(None, torch.device("cpu"))
    poser.choose_reference(images[:64])
    poser.pose(images[:128], apix)  # warm-up
    costs["network_ms"] = 1e3 * timed(lambda: poser.pose(images[at], apix), n)

    acc = HalfSetAccumulator(box, apix, interpolation="nearest")
    acc.add(images[:8], rotations[:8], origins[:8], halves[:8], ctf[torch.arange(8)])  # warm-up
    costs["insert_ms"] = 1e3 * timed(lambda: acc.add(images[at], rotations[at], origins[at], halves[at], ctf[at]), n)
    costs["remove_ms"] = 1e3 * timed(lambda: acc.remove(images[at], rotations[at], origins[at], halves[at], ctf[at]),
                                     n)
    acc.add(images, rotations, origins, halves, ctf)
    maps = None

    def build() -> None:
        nonlocal maps
        maps = map_set(acc)

    costs["map_s"] = timed(build, 1)
    settings = RefineSettings(working_box=args.refine_box)
    reference = None

    def make_reference() -> None:
        nonlocal reference
        reference = RefinementReference(maps.half_volumes, apix, maps.resolution_angstrom, settings)

    costs["reference_s"] = timed(make_reference, 1)
    other = torch.arange(n, 2 * n)
    reference.match(images[other[:32]], halves[other[:32]], rotations[other[:32]], origins[other[:32]], "local",
                    ctf[other[:32]])  # warm-up: slicers built
    for mode in ("local", "global", "coarse", "best"):
        start = None if mode in ("global", "coarse") else rotations[other]
        t0 = time.perf_counter()
        reference.match(images[other], halves[other], start, origins[other], mode, ctf[other])
        costs[f"{mode}_ms"] = 1e3 * (time.perf_counter() - t0) / n

    if args.ab_initio:
        small = images_to_working_box(images, min(args.refine_box, box))
        apix_work = apix * box / small.shape[-1]
        seed = torch.arange(args.seed_particles)
        t0 = time.perf_counter()
        result = run_ab_initio(small[seed], halves[seed], apix_work, passes=1, ctf=ctf[seed],
                               settings=AbInitioSettings(interpolation="nearest"), seed=0)
        costs["ab_initio_bootstrap_s"] = time.perf_counter() - t0
        new = torch.arange(args.seed_particles, args.seed_particles + n)
        costs["ab_initio_add_ms"] = 1e3 * timed(lambda: result.ab_initio.add(small[new], halves[new], ctf[new]), n)
        costs["ab_initio_repose_ms"] = 1e3 * timed(lambda: result.ab_initio.repose(
            small[seed[:n]], halves[seed[:n]], result.poses[seed[:n]], ctf[seed[:n]]), n)

    figures = {"box": box, "apix": apix, "snr": args.snr, "particles": n, "refine_box": args.refine_box,
               "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "costs": costs}
    print(f"# box {box} px at {apix} Å, SNR {args.snr} with CTF, {n} particles per step, "
          f"{torch.get_num_threads()} torch threads, working box {args.refine_box}")
    for name, value in costs.items():
        unit = name.rsplit("_", 1)[1]
        print(f"{name[: -len(unit) - 1]:28s} {value:9.2f} {'ms per particle' if unit == 'ms' else 's'}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()

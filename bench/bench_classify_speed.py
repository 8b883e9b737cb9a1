"""The 2D classifier's own speed: new particles aligned and added per second, at box 64 and 128.

In memory (no files, no daemon): a procedural molecule's particles (SNR 0.1, CTF), the first
1,000 start the classes (the random start), then ``--timed`` more are timed through
``StreamingClassifier.add`` with the search radius at its cap (the slowest case).
``--threads`` sets torch's threads (1 shows one core's rate; the daemon's 2D lane shares
the machine with the 3D lane). Prints one line per box.

    python bench/bench_classify_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from cryofastar.recon.classify2d import ClassifierSettings, StreamingClassifier
from cryofastar.recon.classify2d.classifier import MAX_SEARCH_RADIUS
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles


def measure(box: int, classes: int, timed: int, seed: int) -> float:
    """New particles per second at ``box`` (pixel size ``128 / box`` Å)."""
    apix = 128.0 / box
    atoms = procedural_molecule(seed)
    volume = atoms_to_volume(atoms, box, apix)
    n = 1000 + timed
    sim = simulate_particles(volume, n, apix, 0.1, torch.Generator().manual_seed(seed), ctf=CtfRange())
    settings = ClassifierSettings(n_classes=classes, diameter_angstrom=2 * atoms.radius_angstrom() + 10,
                                  max_shift_px=max(5, round(0.08 * box)), init_particles=1000)
    clf = StreamingClassifier(settings, box, apix)
    clf.add(sim.images[:1000], sim.ctf[torch.arange(1000)])
    clf.r_max = min(MAX_SEARCH_RADIUS, box // 2 - 1)
    start = time.perf_counter()
    clf.add(sim.images[1000:], sim.ctf[torch.arange(1000, n)])
    return timed / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", default="64,128", help="comma-separated boxes (px)")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--timed", type=int, default=500, help="particles timed after the random start")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for box in (int(b) for b in args.boxes.split(",")):
        rate = measure(box, args.classes, args.timed, args.seed)
        print(f"box {box}: {rate:.0f} new particles/s ({args.classes} classes, {args.threads} thread(s))")


if __name__ == "__main__":
    main()

"""Milestones M0-M2 of the geometric decoder on held-out molecules, with chance beside each figure.

* **M0** (no training): classical common lines through the decoder's own code, clean
  SO(3)-uniform views, 9 per set: median rotation error (target < 10°).
* **M1**: common lines found within +-2 rays (both rays, either orientation) over all view
  pairs more than 10° from parallel, SNR 1 (target >= 45 %; raw correlation beside it).
* **M2**: median rotation error of 32-view sets at SNR 1 (target < 20°).

Views are made by the real-space simulator (torch-fourier-slice projections, white noise at
the simulator's SNR, no CTF, no shifts) and resampled on rays (:mod:`cryofastar.model.geometric_evaluation`),
not by the ray simulator training uses. Molecules: procedural seeds from ``EVAL_SEED_START``
and, with ``--structures``, evaluation structures (biopython / pdb2pqr test data), never trained on.

    .venv/bin/python bench/bench_geometric.py --weights RUN/best.safetensors --json bench/results/geometric.json
    .venv/bin/python bench/bench_geometric.py            # the classical decoder only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cryofastar.model.geometric_decoder import GeometricDecoder
from cryofastar.model.geometric_evaluation import held_out_sets, line_accuracy, pose_accuracy
from cryofastar.model.geometric_weights import GeometricConfig, load_decoder
from cryofastar.model.ray_encoder import ClassicalRayEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="a trained decoder (train's best.safetensors)")
    parser.add_argument("--molecules", type=int, default=16, help="held-out procedural molecules")
    parser.add_argument("--structures", type=int, default=8, help="held-out evaluation structures (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    structures = []
    if args.structures:
        from cryofastar.datasets import fetch_structures

        paths = fetch_structures("eval")
        structures = paths[:: max(1, len(paths) // args.structures)][: args.structures]
    config = GeometricConfig()
    decoders = {"classical": GeometricDecoder(ClassicalRayEncoder(), config.n_rays, anchors=config.anchors,
                                              matching="hard")}
    if args.weights is not None:
        decoders["learned"], config = load_decoder(args.weights)
    grid = dict(box=config.box, n_rays=config.n_rays, n_radii=config.n_radii,
                max_radius_fraction=config.max_radius_fraction, structures=structures)
    record: dict[str, object] = {"weights": str(args.weights), "molecules": args.molecules,
                                 "structures": [p.stem for p in structures]}
    t = time.perf_counter()
    clean9 = held_out_sets(args.molecules, 9, None, seed=1, **grid)
    snr1_8 = held_out_sets(args.molecules, 8, 1.0, seed=2, **grid)
    snr1_32 = held_out_sets(args.molecules, 32, 1.0, seed=3, **grid)
    print(f"simulated {len(clean9)} molecules x 3 sets in {time.perf_counter() - t:.0f} s")
    for name, decoder in decoders.items():
        m0 = pose_accuracy(decoder, clean9)
        m1 = line_accuracy(decoder, snr1_8)
        m2 = pose_accuracy(decoder, snr1_32)
        record[name] = {"M0_clean_9_views": m0, "M1_lines_snr1": m1, "M2_snr1_32_views": m2}
        print(f"{name:9s}  M0 clean, 9 views: median {m0['median']:.1f}° (chance {m0['chance_median']:.0f}°)   "
              f"M1 SNR 1 lines within 2 rays: {100 * m1['found']:.1f}% of {m1['pairs']} pairs "
              f"(chance {100 * m1['chance']:.1f}%)   M2 SNR 1, 32 views: median {m2['median']:.1f}° "
              f"(chance {m2['chance_median']:.0f}°), {100 * m2['fraction_within_10']:.0f}% within 10°")
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

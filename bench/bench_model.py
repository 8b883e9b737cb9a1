"""Speed of one forward pass + pose solve of the network (the figure the issue names).

Times ``views`` images at the model box through the network and the confidence-weighted
Kabsch solver (median of ``--repeats`` after a warm-up), on the CPU (all its threads)
and, when one is present, on the GPU (bf16 autocast, as in training, and fp32).

    python bench/bench_model.py                      # shipped weights, 32 and 128 views
    python bench/bench_model.py --weights run/best.safetensors --views 128 --sets 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from cryofastar.model.kabsch import fpm_to_poses
from cryofastar.model.weights import DEFAULT_WEIGHTS, load_model


def time_pass(model, images: torch.Tensor, repeats: int, autocast: bool) -> float:
    """Median seconds of forward + pose solve for `(S, V, B, B)` images."""
    device = images.device
    times = []
    for k in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            fpm, confidence = model(images)
            fpm_to_poses(fpm.float(), confidence.float(), model.planar_coordinates, model.config.box)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--views", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--sets", type=int, default=1, help="sets per forward call (GPU batching)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        model = load_model(args.weights, device)
        label = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        for views in args.views:
            images = torch.randn(args.sets, views, model.config.box, model.config.box, device=device)
            modes = [False, True] if device.type == "cuda" else [False]
            for autocast in modes:
                seconds = time_pass(model, images, args.repeats, autocast)
                n = args.sets * views
                print(f"{label:<28} {'bf16' if autocast else 'fp32'}  {args.sets} x {views:>3} views: "
                      f"{seconds:.3f} s per call, {1000 * seconds / n:.2f} ms per particle, "
                      f"{n / seconds:,.0f} particles/s")


if __name__ == "__main__":
    main()

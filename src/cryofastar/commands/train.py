"""``cryofastar-stream train``: train the pose network on particles simulated on the fly."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cryofastar.model.network import ModelConfig
from cryofastar.model.train import TrainSettings, ValidationResult, train
from cryofastar.recon.device import resolve_device

__all__ = ["MODEL_SIZES", "main"]

MODEL_SIZES: dict[str, ModelConfig] = {
    "small": ModelConfig(),
    "base": ModelConfig(n_lines=64, n_radii=16, dim=256, heads=8, enc_depth=8, dec_depth=4),
}
"""Named sizes: ``small`` (~1.9 M parameters, trains and runs on a CPU), ``base`` for a GPU."""


def _structures(use_real: bool) -> list[Path]:
    if not use_real:
        return []
    from cryofastar.datasets import fetch_structures

    return fetch_structures("train")


def main(out: Path, steps: int, size: str, images_per_step: int, device: str, resume: bool,
         init_weights: Path | None, use_real: bool, time_limit_minutes: float | None, seed: int,
         lr: float, bank_size: int, progress: bool, start_stage: str | None = None) -> ValidationResult | None:
    """Run :func:`cryofastar.model.train.train` with settings from the command line."""
    if size not in MODEL_SIZES:
        raise ValueError(f"--size must be one of {', '.join(MODEL_SIZES)}, got {size!r}")
    if steps < 1 or images_per_step < 3 or bank_size < 1:
        raise ValueError("--steps must be >= 1, --images-per-step >= 3 and --bank-size >= 1")
    settings = TrainSettings(steps=steps, images_per_step=images_per_step, seed=seed, lr=lr, bank_size=bank_size,
                             time_limit_s=None if time_limit_minutes is None else 60.0 * time_limit_minutes,
                             model=MODEL_SIZES[size].to_dict())
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    logging.getLogger("cryofastar").info("training on %s", dev)
    return train(out, settings, dev, _structures(use_real), resume=resume, init_weights=init_weights,
                 progress=progress, start_stage=start_stage)

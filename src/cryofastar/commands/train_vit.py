"""``cryofastar-stream train-vit``: train the first (ViT / FPM) pose network on particles simulated on the fly.

This is the network ``--poses-from network`` loads; it stays at chance on unseen molecules
(docs/model-card.md). ``cryofastar-stream train`` trains the geometric decoder.

The options are the fields of :class:`~cryofastar.model.train.TrainRun` and
:class:`~cryofastar.model.train.TrainSettings`; the run is
:func:`~cryofastar.model.train.run_training`, with the real structures of
model/TRAINING_DATA.md (:func:`~cryofastar.datasets.fetch_structures`) unless
``--procedural-only``.
"""

from __future__ import annotations

import typer

from cryofastar.model.train import TrainRun, TrainSettings, run_training
from cryofastar.options import settings_command

__all__ = ["train_vit"]


@settings_command(TrainRun, TrainSettings)
def train_vit(run: TrainRun, settings: TrainSettings) -> None:
    """Train the first (ViT/FPM) pose network that --poses-from network uses (curriculum, checkpoints, resume)."""
    structures = []
    if run.real_structures:
        from cryofastar.datasets import fetch_structures

        structures = fetch_structures("train")
    val = run_training(run, settings, structures)
    if val is not None:
        typer.echo(f"validation: median {val.median_degrees:.1f}° (identity {val.identity_median_degrees:.1f}°), "
                   f"shift {val.shift_error_px:.2f} px")
    typer.echo(f"weights: {run.out / 'best.safetensors'} (last: {run.out / 'latest.safetensors'})")

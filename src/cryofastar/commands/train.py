"""``cryofastar-stream train``: train the geometric decoder (common lines, issue 22) within a time budget.

Example usage::

    cryofastar-stream train --out RUN --budget-min 8 --device cuda

The options are the fields of :class:`~cryofastar.model.geometric_training.GeometricTrainRun` and
:class:`~cryofastar.model.geometric_training.GeometricTrainSettings`; the run is
:func:`~cryofastar.model.geometric_training.train_decoder`, with the real structures of
model/TRAINING_DATA.md (:func:`~cryofastar.datasets.fetch_structures`) unless ``--procedural-only``.
Every ``--log-seconds`` it prints and logs a line and writes ``latest.safetensors`` (and
``best.safetensors`` when validation improved), so a run cut short still leaves weights.
"""

from __future__ import annotations

import typer

from cryofastar.model.geometric_training import GeometricTrainRun, GeometricTrainSettings, train_decoder
from cryofastar.options import settings_command
from cryofastar.recon.device import resolve_device

__all__ = ["train"]


@settings_command(GeometricTrainRun, GeometricTrainSettings)
def train(run: GeometricTrainRun, settings: GeometricTrainSettings) -> None:
    """Train the geometric decoder on views simulated on the fly, within --budget-min minutes."""
    structures = []
    if run.real_structures:
        from cryofastar.datasets import fetch_structures

        structures = fetch_structures("train")

    def report(record: dict) -> None:
        typer.echo(f"step {record['step']} ({record['minutes']} min, {record['views_seen']} views): loss "
                   f"{record['loss']:.3f}, common lines found at SNR 1 (validation) "
                   f"{100 * record['val_lines_found_snr1']:.1f}%")

    result = train_decoder(run.out, settings, device=resolve_device(run.device), structures=structures,
                           report=report)
    typer.echo(f"weights: {result.best} (best validation), {result.latest} (last)")

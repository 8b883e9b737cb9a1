"""Pose accuracy of predicted poses against true poses of the same particles.

Rows of the two STAR files are matched by image: the stack file each rlnImageName
resolves to and the index in it (so ``1@../session/a.mrcs`` written beside a
reconstruction matches ``000001@a.mrcs`` in the session's own STAR file). Poses are
compared after the one global rotation / handedness that best maps the predicted frame
onto the true one (:mod:`cryofastar.model.evaluation`), next to the
same figures for SO(3)-uniform random poses (chance level).

Shift errors are measured after removing the map's global translation by default: a map
found ab initio may sit off-centre by a vector ``t`` (px, in the true map's frame), which
moves every particle's image by ``(A t)[:2]`` without making its poses any worse.
``t`` is fitted to all matched particles
(:func:`~cryofastar.model.evaluation.fit_map_translation`) and reported; with fewer than
``MIN_PARTICLES_TO_FIT_TRANSLATION`` particles it is not fitted (three unknowns would
absorb real errors), and ``fit_translation=False`` (``--raw-shifts``) compares the shifts
as written.

Example usage::

    cryofastar-stream evaluate predicted.star session/particles.star --json pose_accuracy.json
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofastar.model.evaluation import Alignment, PoseErrors, apply_alignment_to_rotations, chance_level, pose_errors
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.io import ParticleSource, ParticleTable, image_keys, read_particles
from cryofastar.recon.io.atomic import atomic_path

from .reconstruct import NETWORK_COLUMNS

CONFIDENCE_COLUMN = "rlnCryofastarConfidence"
# Offset of the chance-level generator's seed: `simulate --seed S` draws its true poses from a
# generator seeded with S, so the chance poses must not come from the same stream.
_CHANCE_SEED_OFFSET = 0x0C4A7CE
# Fewest matched particles for which the map translation (3 unknowns, 2 equations per particle,
# refitted on the best half) is fitted; below it shift errors are compared as written.
MIN_PARTICLES_TO_FIT_TRANSLATION = 20


@dataclass
class EvaluateResult:
    """Matching counts and the figures of one evaluation."""

    n_matched: int
    only_in_pred: int
    only_in_truth: int
    predicted: PoseErrors
    chance: PoseErrors
    has_confidence: bool = False
    confidence_spearman: float | None = None
    network: PoseErrors | None = None
    translation_fitted: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures."""
        return {
            "n_matched": self.n_matched,
            "only_in_pred": self.only_in_pred,
            "only_in_truth": self.only_in_truth,
            "predicted": self.predicted.summary(),
            "network": None if self.network is None else self.network.summary(),
            "chance": self.chance.summary(),
            "confidence_spearman": self.confidence_spearman,
            "shift_errors": ("after removing each set's fitted map translation (map_translation_px)"
                             if self.translation_fitted else "as written"),
        }


def network_poses(table: ParticleTable) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The network's own poses that ``reconstruct`` keeps beside the refined ones (NETWORK_COLUMNS).

    Returns `(n, 3, 3)` float64 RELION matrices and `(n, 2)` float64 shifts in px, in the
    table's row order; ``None`` if the table has no such columns.
    """
    if not set(NETWORK_COLUMNS) <= set(table.particles.columns):
        return None
    values = torch.from_numpy(table.particles[list(NETWORK_COLUMNS)].to_numpy(np.float64))
    return euler_to_matrix(values[:, 0], values[:, 1], values[:, 2]), values[:, 3:] / table.apix


def _has_origins(table: ParticleTable) -> bool:
    columns = set(table.particles.columns)
    return {"rlnOriginXAngst", "rlnOriginYAngst"} <= columns or {"rlnOriginX", "rlnOriginY"} <= columns


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    value = pd.Series(a).corr(pd.Series(b), method="spearman")
    return None if value is None or not math.isfinite(value) else float(value)


def main(pred: Path, truth: Path, json_out: Path | None = None, apix: float | None = None,
         seed: int = 0, fit_translation: bool = True) -> EvaluateResult:
    """Match, align, measure; write ``json_out`` if given. Bad input raises ValueError / ParticleFileError.

    ``fit_translation`` removes each pose set's fitted map translation before measuring its
    shift errors (the module's docstring); the chance level is measured the same way.
    """
    pred_table = read_particles(pred, apix=apix)
    true_table = read_particles(truth, apix=apix)
    pred_keys, true_keys = image_keys(pred_table), image_keys(true_table)
    common = pred_keys.intersection(true_keys, sort=False)
    if len(common) == 0:
        raise ValueError(f"no rlnImageName of {pred} appears in {truth}: nothing to compare")
    pred_rows = pred_keys.get_indexer(common)
    true_rows = true_keys.get_indexer(common)
    pred_rot = pred_table.rotations()[pred_rows]
    true_rot = true_table.rotations()[true_rows]
    pred_shift = true_shift = None
    if _has_origins(pred_table):
        pred_shift = pred_table.origins_angstrom()[pred_rows] / pred_table.apix
        true_shift = true_table.origins_angstrom()[true_rows] / true_table.apix
    fit_translation = fit_translation and true_shift is not None and len(common) >= MIN_PARTICLES_TO_FIT_TRANSLATION
    predicted = pose_errors(pred_rot, true_rot, pred_shift, true_shift, fit_translation=fit_translation)
    network = None
    kept = network_poses(pred_table)  # reconstruct --refine kept the network's poses
    if kept is not None:
        net_rot, net_shift = kept[0][pred_rows], kept[1][pred_rows]
        network = pose_errors(net_rot, true_rot, None if true_shift is None else net_shift, true_shift,
                              fit_translation=fit_translation)
    chance = chance_level(true_rot, torch.Generator().manual_seed(_CHANCE_SEED_OFFSET + seed), pred_shift, true_shift,
                          fit_translation=fit_translation)
    spearman = None
    has_confidence = CONFIDENCE_COLUMN in pred_table.particles.columns
    if has_confidence:
        confidence = pd.to_numeric(pred_table.particles[CONFIDENCE_COLUMN], errors="coerce").to_numpy(np.float64)
        spearman = _spearman(confidence[pred_rows], predicted.geodesic_degrees.numpy())
    result = EvaluateResult(len(common), len(pred_keys) - len(common), len(true_keys) - len(common),
                            predicted, chance, has_confidence, spearman, network, fit_translation)
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def map_in_true_frame(pred: Path, alignment: Alignment, interpolation: str = "nearest",
                      device: str | torch.device = "cpu", chunk: int = 2048) -> tuple[torch.Tensor, float]:
    """Back-project a predicted particle set with its poses moved into the true frame.

    An ab initio map lives in its own frame; with the global rotation and hand that
    :func:`main` fits (``result.predicted.alignment``) the map is rebuilt in the true frame,
    so it can be compared with the true map
    (:func:`~cryofastar.recon.map_alignment.resolution_vs_reference` also fixes its centre).

    Images with NaN or Inf pixels are left out (one warning line names them).

    Returns
    -------
    volume, apix: tuple[torch.Tensor, float]
        `(B, B, B)` map [z, y, x] and its pixel size (Å).
    """
    source, _ = ParticleSource.from_star(pred).finite(chunk)
    table = source.table
    rotations = apply_alignment_to_rotations(table.rotations(), alignment)
    origins, halves = table.origins_angstrom(), source.half_sets
    acc = HalfSetAccumulator(table.box, table.apix, interpolation=interpolation, device=device)
    for first in range(0, len(table), chunk):
        rows = np.arange(first, min(len(table), first + chunk))
        acc.add(source.images(rows).all_images(), rotations[rows], origins[rows], halves[rows])
    return acc.volume(), table.apix


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _translation_text(errors: PoseErrors) -> str:
    t = errors.map_translation_px
    return "n/a" if t is None else "(" + ", ".join(f"{v:+.2f}" for v in t.tolist()) + ")"


def format_table(result: EvaluateResult) -> str:
    """The figures as an aligned text table: metric | predicted | [network before refinement |] random poses."""
    sets = [result.predicted, *([result.network] if result.network is not None else []), result.chance]

    def hand(errors: PoseErrors) -> str:
        return "mirrored" if errors.alignment.mirrored else "original"

    def row(label: str, value) -> tuple[str, ...]:  # noqa: ANN001 - a function of PoseErrors
        return (label, *(value(e) for e in sets))

    header = ("metric", "predicted", *(["network (before refinement)"] if result.network is not None else []),
              "random poses (chance)")
    rows = [
        header,
        row("particles", lambda e: str(len(e))),
        row("handedness", hand),
        row("mean ‖ΔR‖_F", lambda e: _fmt(e.frobenius_mean, 4)),
        row("median ‖ΔR‖_F", lambda e: _fmt(e.frobenius_median, 4)),
        row("median geodesic (°)", lambda e: _fmt(e.geodesic_median_degrees, 2)),
        row("mean geodesic (°)", lambda e: _fmt(e.geodesic_mean_degrees, 2)),
        row("median translation (px)", lambda e: _fmt(e.translation_median_px, 2)),
        row("mean translation (px)", lambda e: _fmt(e.translation_mean_px, 2)),
    ]
    if result.translation_fitted:
        rows.append(row("map translation removed (px)", _translation_text))
    if result.has_confidence:
        rows.append(("confidence vs geodesic (Spearman)", _fmt(result.confidence_spearman, 3),
                     *["-"] * (len(header) - 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join([f"{r[0]:<{widths[0]}}", *(f"{v:>{w}}" for v, w in zip(r[1:], widths[1:], strict=True))])
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)

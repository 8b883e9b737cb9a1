"""Pose accuracy of predicted vs true poses of the same particles (CryoFastAR paper metrics).

Poses are RELION matrices ``A`` (docs/conventions.md, "Rotations"): the particle's 2D
transform at ``k`` is the map's 3D transform at ``A.T @ k``; in real space the particle
is the projection along z of the map sampled at ``A.T @ (x, y, z)``.

Ab-initio poses are defined only up to the frame of the map they were found with:

* **Global rotation.** If the predicted map is the true one rotated about its centre,
  ``V_pred(r) = V_true(Q @ r)`` with ``Q`` in SO(3), the same image is produced by
  ``A_pred = A_true @ Q``, so ``A_true = A_pred @ G`` with ``G = Q.T``.
* **Mirror (handedness).** With ``J = diag(1, 1, -1)`` the mirrored map
  ``V_true(J @ r)`` at pose ``J @ A @ J`` gives exactly the image of ``V_true`` at ``A``,
  pixel for pixel (``J`` only flips the projection direction z). For any improper
  frame ``V_pred(r) = V_true(M @ r)``, ``det M = -1``, the pose is
  ``A_pred = J @ A_true @ M``, so ``A_true = (J @ A_pred @ J) @ G`` with
  ``G = J @ M.T`` in SO(3). In Euler angles ``J @ A(rot, tilt, psi) @ J =
  A(rot + 180, tilt, psi + 180)``.
* **Shifts** (rlnOriginX/YAngst) are in the image plane; images are unchanged by both
  operations, so shifts are compared as they are (no sign change with the mirror).
* **Global translation.** An ab-initio map may also sit off-centre: ``V_pred(r) =
  V_true(r - t)`` moves every particle's image by ``(A_true @ t)[:2]`` (its x and y
  rows; the mirror leaves those rows as they are), so each predicted shift differs from
  the true one by that much. ``pose_errors(..., fit_translation=True)`` fits the one
  ``t`` (:func:`fit_map_translation`) and removes it before measuring shift errors, as
  the FSC of such a map is measured after centring it.

:func:`global_alignment` fits the one ``(G, mirrored)`` that brings the predicted poses
closest to the true ones (orthogonal Procrustes on SO(3), trimmed, both hands tried);
:func:`pose_errors` reports per-particle errors after it, :func:`chance_level` the same
figures for uniformly random poses aligned the same way. :func:`evaluate_particle_sets`
applies them to two STAR files matched by image (``cryofastar-stream evaluate``).

Tested: ``tests/test_evaluation.py`` (the formulas above against real projections of an
asymmetric map in ``test_alignment_formulas_match_projections``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cryofastar.recon.backprojection import backproject
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.io import ParticleSource, ParticleTable, image_keys, read_particles
from cryofastar.recon.io.atomic import atomic_path
from cryofastar.recon.io.columns import CONFIDENCE_COLUMN, NETWORK_COLUMNS
from cryofastar.recon.pose_alignment import (
    Alignment,
    apply_alignment_to_rotations,
    as_rotations,
    global_alignment,
    nearest_symmetry_mates,
    symmetry_group,
)
from cryofastar.recon.rotations import geodesic_degrees, mirror_rotations, random_rotations

from cryofastar.options import argument, option

__all__ = [
    "MIN_PARTICLES_TO_FIT_TRANSLATION",
    "Alignment",
    "EvaluateResult",
    "EvaluateSettings",
    "PoseErrors",
    "apply_alignment_to_rotations",
    "chance_level",
    "evaluate_particle_sets",
    "fit_map_translation",
    "geodesic_degrees",
    "global_alignment",
    "map_in_true_frame",
    "mirror_rotations",
    "network_poses",
    "pose_errors",
]

@dataclass(frozen=True)
class PoseErrors:
    """Per-particle pose errors after global alignment.

    Attributes
    ----------
    alignment: Alignment
        The global transform used.
    frobenius: torch.Tensor
        `(n,)` float64 ``||A_pred_aligned - A_true||_F`` (not squared; 0 .. 2*sqrt(2)).
    geodesic_degrees: torch.Tensor
        `(n,)` float64 angle of ``A_pred_aligned.T @ A_true``, degrees in [0, 180].
    translation_px: torch.Tensor | None
        `(n,)` float64 Euclidean distance between predicted and true 2D shifts, pixels;
        ``None`` when no shifts were given.
    map_translation_px: torch.Tensor | None
        `(3,)` float64 ``t`` (x, y, z; pixels, true frame) removed from the predicted
        shifts before ``translation_px`` was measured; ``None`` when none was fitted.
    """

    alignment: Alignment
    frobenius: torch.Tensor
    geodesic_degrees: torch.Tensor
    translation_px: torch.Tensor | None = None
    map_translation_px: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.frobenius.numel())

    @property
    def frobenius_mean(self) -> float:
        """Mean ``||ΔR||_F``."""
        return float(self.frobenius.mean())

    @property
    def frobenius_median(self) -> float:
        """Median ``||ΔR||_F``."""
        return _median(self.frobenius)

    @property
    def geodesic_mean_degrees(self) -> float:
        """Mean geodesic error, degrees."""
        return float(self.geodesic_degrees.mean())

    @property
    def geodesic_median_degrees(self) -> float:
        """Median geodesic error, degrees."""
        return _median(self.geodesic_degrees)

    @property
    def translation_mean_px(self) -> float | None:
        """Mean translation error, pixels (``None`` without shifts)."""
        return None if self.translation_px is None else float(self.translation_px.mean())

    @property
    def translation_median_px(self) -> float | None:
        """Median translation error, pixels (``None`` without shifts)."""
        return None if self.translation_px is None else _median(self.translation_px)

    def summary(self) -> dict[str, object]:
        """The figures as plain Python values (JSON-ready)."""
        return {
            "n_particles": len(self),
            "mirrored": self.alignment.mirrored,
            "alignment_rotation": self.alignment.rotation.tolist(),
            "median_degrees_per_hand": {"original": self.alignment.median_degrees[0],
                                        "mirrored": self.alignment.median_degrees[1]},
            "frobenius_mean": self.frobenius_mean,
            "frobenius_median": self.frobenius_median,
            "geodesic_median_degrees": self.geodesic_median_degrees,
            "geodesic_mean_degrees": self.geodesic_mean_degrees,
            "translation_mean_px": self.translation_mean_px,
            "translation_median_px": self.translation_median_px,
            "map_translation_px": None if self.map_translation_px is None else self.map_translation_px.tolist(),
        }


def _median(values: torch.Tensor) -> float:
    """Median (mean of the two middle values for an even count)."""
    return float(torch.quantile(values.to(torch.float64), 0.5))


def _translation_errors(pred_shift_px: torch.Tensor | None, true_shift_px: torch.Tensor | None,
                        n: int) -> torch.Tensor | None:
    if pred_shift_px is None and true_shift_px is None:
        return None
    if pred_shift_px is None or true_shift_px is None:
        raise ValueError("give both pred_shift_px and true_shift_px, or neither")
    pred_shift = torch.as_tensor(pred_shift_px).to(torch.float64)
    true_shift = torch.as_tensor(true_shift_px).to(torch.float64)
    if pred_shift.shape != (n, 2) or true_shift.shape != (n, 2):
        raise ValueError(f"shifts must be ({n}, 2), got {tuple(pred_shift.shape)} and {tuple(true_shift.shape)}")
    return (pred_shift - true_shift).norm(dim=-1)


def fit_map_translation(
    true_rot: torch.Tensor, pred_shift_px: torch.Tensor, true_shift_px: torch.Tensor,
    keep_fraction: float = 0.5, max_refinements: int = 20,
) -> torch.Tensor:
    """The map translation ``t`` that best explains predicted minus true shifts.

    A map moved by ``t`` (``V_pred(r) = V_true(r - t)``) shows particle ``i`` moved by
    ``(A_i @ t)[:2]``, so ``pred_i - true_i = (A_i @ t)[:2]`` up to one sign for every
    particle, which ``t`` absorbs. Least squares over all particles, then refitted on the
    ``keep_fraction`` with the smallest residual until that set stops changing (at most
    ``max_refinements`` times), so particles whose pose is wrong do not pull ``t``.

    Parameters
    ----------
    true_rot: torch.Tensor
        `(n, 3, 3)` true RELION matrices.
    pred_shift_px, true_shift_px: torch.Tensor
        `(n, 2)` shifts ``(sx, sy)`` in pixels.
    keep_fraction: float
        Fraction of particles (0 < f <= 1) each refit uses.
    max_refinements: int
        Most refits after the first least-squares fit.

    Returns
    -------
    t: torch.Tensor
        `(3,)` float64 (x, y, z) in pixels, in the true frame.
    """
    rows = as_rotations(true_rot, "true_rot")[:, :2, :]  # (n, 2, 3)
    n = rows.shape[0]
    diff = (torch.as_tensor(pred_shift_px) - torch.as_tensor(true_shift_px)).to(torch.float64).reshape(n, 2)
    n_keep = min(n, max(2, math.ceil(keep_fraction * n)))
    keep = torch.ones(n, dtype=torch.bool)
    t = torch.linalg.lstsq(rows.reshape(-1, 3), diff.reshape(-1, 1)).solution[:, 0]
    for _ in range(max_refinements):
        residual = (diff - rows @ t).norm(dim=-1)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[torch.topk(residual, n_keep, largest=False).indices] = True
        if torch.equal(kept, keep):
            break
        keep = kept
        t = torch.linalg.lstsq(rows[keep].reshape(-1, 3), diff[keep].reshape(-1, 1)).solution[:, 0]
    return t


def pose_errors(
    pred_rot: torch.Tensor,
    true_rot: torch.Tensor,
    pred_shift_px: torch.Tensor | None = None,
    true_shift_px: torch.Tensor | None = None,
    alignment: Alignment | None = None,
    fit_translation: bool = False,
    symmetry: int | torch.Tensor = 1,
) -> PoseErrors:
    """Per-particle pose errors after global alignment of the predicted frame.

    Parameters
    ----------
    pred_rot, true_rot: torch.Tensor
        `(n, 3, 3)` RELION matrices of the same particles, in the same order.
    pred_shift_px, true_shift_px: torch.Tensor | None
        `(n, 2)` image shifts ``(sx, sy)`` in pixels (e.g. rlnOriginX/YAngst / apix);
        neither a global rotation nor the mirror changes them.
    alignment: Alignment | None
        Use this alignment instead of fitting one with :func:`global_alignment`.
    fit_translation: bool
        Also remove the map's global translation from the predicted shifts before
        measuring them (:func:`fit_map_translation`): for poses found ab initio, whose
        map may sit off-centre. Needs both shifts.
    symmetry: int | torch.Tensor
        Order of the true map's Cn symmetry about z (1: none), or its operators `(m, 3, 3)`:
        errors are measured to the nearest equivalent true pose ``A_true @ S_k``
        (``global_alignment``'s ``symmetry``).

    Returns
    -------
    errors: PoseErrors
        Frobenius norm ``||A_pred_aligned - A_true||_F`` (not squared), geodesic angle
        (degrees) and translation error (px) per particle, with the alignment (and the
        fitted map translation).
    """
    pred, true = as_rotations(pred_rot, "pred_rot"), as_rotations(true_rot, "true_rot")
    if alignment is None:
        alignment = global_alignment(pred, true, symmetry=symmetry)
    aligned = apply_alignment_to_rotations(pred, alignment)
    operators = symmetry_group(symmetry)
    if len(operators) > 1:
        true = nearest_symmetry_mates(aligned, true, operators)
    translation = _translation_errors(pred_shift_px, true_shift_px, pred.shape[0])
    map_translation = None
    if fit_translation and translation is not None:
        map_translation = fit_map_translation(true, pred_shift_px, true_shift_px)
        moved = true[:, :2, :] @ map_translation  # (n, 2) float64
        translation = _translation_errors(torch.as_tensor(pred_shift_px).to(torch.float64) - moved,
                                          true_shift_px, pred.shape[0])
    return PoseErrors(
        alignment=alignment,
        frobenius=torch.linalg.matrix_norm(aligned - true),
        geodesic_degrees=geodesic_degrees(aligned, true),
        translation_px=translation,
        map_translation_px=map_translation,
    )


def chance_level(
    true_rot: torch.Tensor,
    generator: torch.Generator,
    pred_shift_px: torch.Tensor | None = None,
    true_shift_px: torch.Tensor | None = None,
    fit_translation: bool = False,
) -> PoseErrors:
    """The figures of :func:`pose_errors` for poses that carry no information.

    Rotations are SO(3)-uniform (:func:`~cryofastar.recon.simulate.particles.random_rotations`)
    and aligned exactly as predictions are. For uniform poses and many particles the
    median geodesic error is about 132° (mean 126.5°) and the mean ``||ΔR||_F``
    ``16 sqrt(2) / (3 pi) ≈ 2.40``; the fit of ``G`` on noise lowers them slightly for
    small ``n``.

    Parameters
    ----------
    true_rot: torch.Tensor
        `(n, 3, 3)` true RELION matrices.
    generator: torch.Generator
        Source of the random poses (and shift permutation).
    pred_shift_px, true_shift_px: torch.Tensor | None
        `(n, 2)` shifts in pixels; if given, the chance translation error compares the
        true shifts with a random permutation of the predicted ones.
    fit_translation: bool
        Remove a fitted map translation first, as :func:`pose_errors` does, so the chance
        figure is measured the same way as the predicted one it stands beside.
    """
    true = as_rotations(true_rot, "true_rot")
    random = random_rotations(true.shape[0], generator).to(true.device)
    if pred_shift_px is not None:
        pred_shift_px = torch.as_tensor(pred_shift_px)
        pred_shift_px = pred_shift_px[torch.randperm(pred_shift_px.shape[0], generator=generator)]
    return pose_errors(random, true, pred_shift_px, true_shift_px, fit_translation=fit_translation)


# --------------------------------------------------------------------------- particle sets (STAR files)

# Offset of the chance-level generator's seed: `simulate --seed S` draws its true poses from a
# generator seeded with S, so the chance poses must not come from the same stream.
_CHANCE_SEED_OFFSET = 0x0C4A7CE
MIN_PARTICLES_TO_FIT_TRANSLATION = 20
"""Fewest matched particles for which the map translation (3 unknowns, 2 equations per particle,
refitted on the best half) is fitted; below it shift errors are compared as written."""


@dataclass
class EvaluateSettings:
    """Two particle sets to compare, and how (``cryofastar-stream evaluate``).

    Rows of the two STAR files are matched by image: the stack file each rlnImageName
    resolves to and the index in it (so ``1@../session/a.mrcs`` written beside a
    reconstruction matches ``000001@a.mrcs`` in the session's own STAR file).

    Attributes
    ----------
    pred, truth: Path
        STAR files with the predicted and the true poses of the same images.
    json_out: Path | None
        Where the figures are also written as JSON.
    apix: float | None
        Pixel size (Å) for STAR files that give none.
    seed: int
        Seed of the chance-level poses.
    fit_translation: bool
        Remove each pose set's fitted map translation (:func:`fit_map_translation`) before
        measuring shift errors, chance level alike; not below
        :data:`MIN_PARTICLES_TO_FIT_TRANSLATION` particles.
    """

    pred: Path = argument(help="Particle STAR file with predicted poses.")
    truth: Path = argument(help="Particle STAR file with the true poses of the same images.")
    json_out: Path | None = option(None, flags=("--json",), help="Also write the figures to this JSON file.")
    apix: float | None = option(None, help="Pixel size in Å for STAR files that give none.")
    seed: int = option(0, help="Random seed of the chance-level poses.")
    fit_translation: bool = option(
        True, flags=("--fit-map-translation/--raw-shifts",),
        help="Measure shift errors after removing the map's fitted global translation (an ab initio map may sit "
             "off-centre), or compare the shifts as written.")


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
    # upward import, for now: the reconstruct engine (and its column names) moves below model/ at the merge
    if not set(NETWORK_COLUMNS) <= set(table.particles.columns):
        return None
    values = torch.from_numpy(table.particles[list(NETWORK_COLUMNS)].to_numpy(np.float64, copy=True))
    return euler_to_matrix(values[:, 0], values[:, 1], values[:, 2]), values[:, 3:] / table.apix


def _has_origins(table: ParticleTable) -> bool:
    columns = set(table.particles.columns)
    return {"rlnOriginXAngst", "rlnOriginYAngst"} <= columns or {"rlnOriginX", "rlnOriginY"} <= columns


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    value = pd.Series(a).corr(pd.Series(b), method="spearman")
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate_particle_sets(settings: EvaluateSettings) -> EvaluateResult:
    """Match two particle sets by image, align, measure; write ``settings.json_out`` if given.

    Parameters
    ----------
    settings: EvaluateSettings
        The two STAR files and how to compare them.

    Returns
    -------
    EvaluateResult
        Counts, the predicted poses' errors, those of the network's own poses when the
        set keeps them (:func:`network_poses`), and the chance level.

    Raises
    ------
    ValueError
        No image in common, an image listed twice (or a :class:`~cryofastar.recon.io.ParticleFileError`).
    """
    pred_table = read_particles(settings.pred, apix=settings.apix)
    true_table = read_particles(settings.truth, apix=settings.apix)
    pred_keys, true_keys = image_keys(pred_table), image_keys(true_table)
    common = pred_keys.intersection(true_keys, sort=False)
    if len(common) == 0:
        raise ValueError(f"no rlnImageName of {settings.pred} appears in {settings.truth}: nothing to compare")
    pred_rows = pred_keys.get_indexer(common)
    true_rows = true_keys.get_indexer(common)
    pred_rot = pred_table.rotations()[pred_rows]
    true_rot = true_table.rotations()[true_rows]
    pred_shift = true_shift = None
    if _has_origins(pred_table):
        pred_shift = pred_table.origins_angstrom()[pred_rows] / pred_table.apix
        true_shift = true_table.origins_angstrom()[true_rows] / true_table.apix
    fit = settings.fit_translation and true_shift is not None and len(common) >= MIN_PARTICLES_TO_FIT_TRANSLATION
    predicted = pose_errors(pred_rot, true_rot, pred_shift, true_shift, fit_translation=fit)
    network = None
    kept = network_poses(pred_table)  # reconstruct --refine kept the network's poses
    if kept is not None:
        net_rot, net_shift = kept[0][pred_rows], kept[1][pred_rows]
        network = pose_errors(net_rot, true_rot, None if true_shift is None else net_shift, true_shift,
                              fit_translation=fit)
    chance = chance_level(true_rot, torch.Generator().manual_seed(_CHANCE_SEED_OFFSET + settings.seed), pred_shift,
                          true_shift, fit_translation=fit)
    spearman = None
    has_confidence = CONFIDENCE_COLUMN in pred_table.particles.columns
    if has_confidence:
        confidence = pd.to_numeric(pred_table.particles[CONFIDENCE_COLUMN], errors="coerce").to_numpy(np.float64)
        spearman = _spearman(confidence[pred_rows], predicted.geodesic_degrees.numpy())
    result = EvaluateResult(len(common), len(pred_keys) - len(common), len(true_keys) - len(common),
                            predicted, chance, has_confidence, spearman, network, fit)
    if settings.json_out is not None:
        with atomic_path(settings.json_out) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def map_in_true_frame(pred: Path, alignment: Alignment, interpolation: str = "nearest",
                      device: str | torch.device = "cpu", chunk: int = 2048) -> tuple[torch.Tensor, float]:
    """Back-project a predicted particle set with its poses moved into the true frame.

    An ab initio map lives in its own frame; with the global rotation and hand that
    :func:`evaluate_particle_sets` fits (``result.predicted.alignment``) the map is rebuilt
    in the true frame, so it can be compared with the true map
    (:func:`~cryofastar.recon.map_alignment.resolution_vs_known_map` also fixes its centre).

    Returns
    -------
    volume, apix: tuple[torch.Tensor, float]
        `(B, B, B)` map [z, y, x] and its pixel size (Å).

    Images with NaN or Inf pixels are left out (one warning line names them).
    """
    source, _ = ParticleSource.from_star(pred).finite(chunk)
    table = source.table
    rotations = apply_alignment_to_rotations(table.rotations(), alignment)
    acc = backproject(source, rotations, table.origins_angstrom(), batch=chunk, device=device,
                      interpolation=interpolation)
    return acc.volume(), table.apix

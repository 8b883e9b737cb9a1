"""``cryofastar-stream evaluate``: pose accuracy of predicted poses against true poses of the same particles.

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

The measuring is :func:`~cryofastar.model.evaluation.evaluate_particle_sets`
(options: the fields of :class:`~cryofastar.model.evaluation.EvaluateSettings`);
this module prints its figures.

Example usage::

    cryofastar-stream evaluate predicted.star session/particles.star --json pose_accuracy.json
"""

from __future__ import annotations

import typer

from cryofastar.model.evaluation import (
    MIN_PARTICLES_TO_FIT_TRANSLATION,
    EvaluateResult,
    EvaluateSettings,
    PoseErrors,
    evaluate_particle_sets,
)
from cryofastar.options import settings_command

__all__ = ["evaluate", "format_table"]


@settings_command(EvaluateSettings)  # ParticleFileError is a ValueError
def evaluate(settings: EvaluateSettings) -> None:
    """Pose accuracy of predicted vs true poses (after global rotation/handedness alignment), next to chance level."""
    result = evaluate_particle_sets(settings)
    typer.echo(f"matched {result.n_matched} particles by image (stack file and index) "
               f"({result.only_in_pred} only in {settings.pred.name}, {result.only_in_truth} only in "
               f"{settings.truth.name})")
    typer.echo(format_table(result))
    if result.translation_fitted:
        typer.echo("translation errors: after removing each set's fitted map translation (--raw-shifts: as written)")
    elif settings.fit_translation and result.predicted.translation_px is not None:
        typer.echo(f"translation errors: as written (fewer than {MIN_PARTICLES_TO_FIT_TRANSLATION} particles "
                   "to fit the map's translation)")
    if settings.json_out is not None:
        typer.echo(f"wrote {settings.json_out}")


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

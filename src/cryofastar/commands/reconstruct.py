"""``cryofastar-stream reconstruct``: ab initio reconstruction of a RELION particle set.

Example usage::

    cryofastar-stream reconstruct session/particles.star -o recon/
    cryofastar-stream reconstruct session/particles.star -o recon/ --no-refine           # network only
    cryofastar-stream reconstruct session/particles.star -o recon/ --poses-from map-only  # no network
    cryofastar-stream reconstruct session/particles.star -o recon/ --poses-from classes   # 2D classes, common lines
    cryofastar-stream reconstruct session/particles.star -o recon/ --nproc 2              # two processes (gloo)
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --no-python cryofastar-stream reconstruct session/particles.star -o recon/        # 8 ranks, 2 machines

The options are the fields of :class:`~cryofastar.engine.offline.ReconstructJob` and
:class:`~cryofastar.engine.offline.ReconstructSettings`; the job is
:func:`cryofastar.engine.offline.reconstruct` (steps and outputs in its module docstring).
This command adds a progress bar and prints the figures; with ``--nproc N`` (or under ``torchrun``)
:func:`cryofastar.engine.offline.reconstruct_on_ranks` runs the job on N ranks, rank 0's bar and
figures only (docs/scaling.md).
"""

from __future__ import annotations

import functools

import typer

from cryofastar.engine.distributed import RankFailed
from cryofastar.engine.offline import ReconstructJob, ReconstructResult, ReconstructSettings, reconstruct_on_ranks
from cryofastar.options import settings_command
from cryofastar.recon.fsc import resolution_text

from .progress import ProgressBar

__all__ = ["reconstruct"]


@settings_command(ReconstructJob, ReconstructSettings, errors=(ValueError, OSError, RankFailed))
def reconstruct(job: ReconstructJob, settings: ReconstructSettings) -> None:  # ParticleFileError is a ValueError
    """Ab initio: poses from the network (or the map alone), refined against the map, then the map."""
    label = {"network": "posing + inserting", "classes": "2D classification"}.get(settings.poses_from)
    if label is not None and settings.nproc > 1 and settings.poses_from == "network":
        label += " (rank 0's share)"
    bar = functools.partial(ProgressBar, label) if job.progress and label is not None else None
    result = reconstruct_on_ranks(job.particles, job.out, settings, progress=bar)
    if result is None:
        return  # a rank other than 0 under torchrun: rank 0 prints
    for line in summary(result, settings):
        typer.echo(line)


def summary(result: ReconstructResult, settings: ReconstructSettings) -> list[str]:
    """The lines the command prints: poses, refinement, the map against ``--reference``, the files written."""
    if settings.poses_from == "network":
        lines = [f"{result.n_particles} particles posed in {result.pose_seconds:.1f} s, inserted in "
                 f"{result.insert_seconds:.1f} s ({result.total_seconds:.1f} s in all); half-map FSC 0.143 "
                 f"resolution {resolution_text(result.resolution_angstrom)}; anchor disagreement "
                 f"{result.anchor_disagreement_degrees:.1f}°, {result.mirrored_passes} passes mirrored"]
    elif settings.poses_from == "classes":
        lines = [f"{result.n_particles} particles in {settings.classes} 2D classes, {result.classes_posed} posed by "
                 f"common lines: particle poses in {result.pose_seconds:.1f} s, inserted in "
                 f"{result.insert_seconds:.1f} s; half-map FSC 0.143 resolution "
                 f"{resolution_text(result.resolution_angstrom)}"]
    else:
        lines = [f"{result.n_particles} particles, no network ({result.total_seconds:.1f} s in all); half-map "
                 f"FSC 0.143 resolution {resolution_text(result.resolution_angstrom)}"]
    if result.class_poses is not None:
        c = result.class_poses
        agreement = "" if c["agreement_degrees"] is None else f" (median {c['agreement_degrees']:.1f}°)"
        lines.append(f"class poses {'trusted' if c['agree'] else 'NOT trusted: ab initio instead'}: two decoder "
                     f"starts {'agree' if c['agree'] else 'disagree'}{agreement}")
    if result.refine_modes:
        source = "class" if settings.poses_from == "classes" else "network's"
        won = "" if result.network_won_fraction is None else \
            f"; the {source} poses were the better start for {100 * result.network_won_fraction:.0f}% of particles"
        confirmed = result.confirmation
        if confirmed is not None:
            symmetric = f", up to C{confirmed['symmetry_order']}" if confirmed["symmetry_order"] > 1 else ""
            won += (f"; a random ab initio start {'agrees' if confirmed['agree'] else 'DISAGREES'} with them "
                    f"(median {confirmed['median_degrees']:.1f}°{symmetric})")
        if result.network_won_fraction is not None and "ab-initio" in result.refine_modes:
            why = "unconfirmed" if confirmed is not None and not confirmed["agree"] else "uninformative"
            won += f" ({why} {source} poses: poses from ab initio instead)"
        ab = f"; ab initio took {result.ab_initio_seconds:.1f} s" if "ab-initio" in result.refine_modes else ""
        lines.append(f"refined in {result.refine_seconds:.1f} s ({', '.join(result.refine_modes)}){won}{ab}")
    if result.ab_initio is not None:
        lines.append(f"ab initio {result.ab_initio['summary']} after {len(result.ab_initio['attempts'])} attempt(s)")
    if result.pose_precision is not None:
        lines.append(result.pose_precision["summary"])
    if result.nproc > 1:
        plural = "" if result.allreduces == 1 else "s"
        lines.append(f"{result.nproc} ranks: {result.allreduces} all-reduce{plural} of the half-set grids "
                     f"({result.allreduce_bytes / 2**20:.1f} MiB each) took {result.allreduce_seconds:.1f} s")
    if result.known_map_resolution_angstrom is not None:
        known = resolution_text(result.known_map_resolution_angstrom)
        lines.append(f"FSC 0.5 resolution against {settings.known_map}: {known} "
                     "(frames not aligned: ab initio maps are in a frame of their own)")
    return lines + [f"wrote {path}" for path in result.outputs]

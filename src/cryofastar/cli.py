"""The ``cryofastar-stream`` command line (typer): the app assembled from :mod:`cryofastar.commands`.

Each subcommand lives in its own module, ``cryofastar.commands.<name>``, as a typer
function whose options are the fields of settings dataclasses (:mod:`cryofastar.options`).
This module registers them, adds the root options (``--verbose``, ``--version``) and
the ``--watch DIR`` alias, and runs the app in :func:`main`. Bad input ends with one
``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import NoArgsIsHelpError, UsageError

from cryofastar import __version__
from cryofastar.commands import backproject, dashboard, demo, evaluate, simulate, subscribe, train, watch
from cryofastar.options import fail as _fail
from cryofastar.recon.io import ParticleFileError

app = typer.Typer(
    name="cryofastar-stream",
    help="Live cryo-EM 3D reconstruction beside the microscope.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryofastar-stream {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (INFO).")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# the order of `cryofastar-stream --help`
app.command()(simulate.simulate)
app.command()(backproject.backproject)
app.command()(evaluate.evaluate)
app.command()(train.train)


@app.command()
def reconstruct(
    particles: Annotated[Path, typer.Argument(help="RELION 3.1 (or 3.0) particle STAR file; poses in it are ignored.")],
    outdir: Annotated[Path, typer.Option("-o", "--out", help="Output directory: particles.star, volume.mrc, volume_half1/2.mrc, volume_fsc.tsv.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    views: Annotated[int, typer.Option(help="Views per forward pass (reference and anchors included).")] = 128,
    weights: Annotated[Path | None, typer.Option(help="Network weights (safetensors); default: the shipped weights.")] = None,
    apix: Annotated[float | None, typer.Option(help="Pixel size in Å if the STAR file gives none.")] = None,
    use_ctf: Annotated[bool, typer.Option("--ctf/--no-ctf", help="Use the CTF columns in back-projection when present (poses never need them).")] = True,
    reference: Annotated[Path | None, typer.Option(help="Known map (MRC, same box): also report the FSC-0.5 resolution against it (after no alignment).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the choice of reference candidates and for ab initio's random start.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    poses_from: Annotated[str, typer.Option(help="network: the CryoFastAR network's poses start refinement (ab initio replaces them if the first round finds the network uninformative); map-only: starting poses from map-only ab initio (no network).")] = "network",
    refine: Annotated[bool, typer.Option("--refine/--no-refine", help="Refine poses by projection matching against the half maps (docs/refinement.md); --no-refine keeps the network's poses.")] = True,
    refine_rounds: Annotated[int, typer.Option(help="Rounds of refinement (with a network the first is a best-of-local-and-global probe, the others local), each followed by a fresh back-projection; ab initio, when it runs, comes on top.")] = 4,
    refine_box: Annotated[int, typer.Option(help="Working box in px for refinement (particles and maps Fourier-cropped to it).")] = 64,
) -> None:
    """Ab initio: poses from the network (or the map alone), refined against the map, then the map."""
    from cryofastar.commands import reconstruct as command

    try:
        result = command.main(particles, outdir, device, views, weights, apix, use_ctf, reference=reference,
                              progress=progress, seed=seed, poses_from=poses_from, refine=refine,
                              refine_rounds=refine_rounds, refine_box=refine_box)
    except (ParticleFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    if poses_from == "network":
        typer.echo(f"{result.n_particles} particles posed in {result.pose_seconds:.1f} s, inserted in "
                   f"{result.insert_seconds:.1f} s ({result.total_seconds:.1f} s in all); half-map FSC 0.143 "
                   f"resolution {result.resolution_angstrom:.2f} Å; anchor disagreement "
                   f"{result.anchor_disagreement_degrees:.1f}°, {result.mirrored_passes} passes mirrored")
    else:
        typer.echo(f"{result.n_particles} particles, no network ({result.total_seconds:.1f} s in all); half-map "
                   f"FSC 0.143 resolution {result.resolution_angstrom:.2f} Å")
    if result.refine_modes:
        won = "" if result.network_won_fraction is None else \
            f"; the network's poses were the better start for {100 * result.network_won_fraction:.0f}% of particles"
        if result.network_won_fraction is not None and "ab-initio" in result.refine_modes:
            won += " (uninformative network: poses from ab initio instead)"
        ab = f"; ab initio took {result.ab_initio_seconds:.1f} s" if "ab-initio" in result.refine_modes else ""
        typer.echo(f"refined in {result.refine_seconds:.1f} s ({', '.join(result.refine_modes)}){won}{ab}")
    if result.reference_resolution_angstrom is not None:
        typer.echo(f"FSC 0.5 resolution against {reference}: {result.reference_resolution_angstrom:.2f} Å "
                   "(frames not aligned: ab initio maps are in a frame of their own)")
    for path in result.outputs:
        typer.echo(f"wrote {path}")


app.command()(watch.watch)
app.command()(subscribe.subscribe)
app.command()(dashboard.dashboard)
app.command()(demo.demo)


def _watch_alias(argv: list[str]) -> list[str]:
    """``--watch DIR ...`` / ``--watch=DIR ...`` anywhere before a subcommand -> ``watch DIR ...``."""
    for i, arg in enumerate(argv):
        if arg == "--watch" and i + 1 < len(argv):
            return [*argv[:i], "watch", argv[i + 1], *argv[i + 2 :]]
        if arg.startswith("--watch="):
            return [*argv[:i], "watch", arg.split("=", 1)[1], *argv[i + 1 :]]
        if not arg.startswith("-"):
            break
    return argv


def main() -> None:
    """Console-script entry point: usage errors too end in one ``error:`` line, status 2."""
    try:
        code = app(args=_watch_alias(sys.argv[1:]), standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc))
        code = 0
    except UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        code = 2
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)

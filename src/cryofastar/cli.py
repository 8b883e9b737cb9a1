"""The ``cryofastar-stream`` command line (typer): one subcommand per module in
:mod:`cryofastar.commands`. Bad input ends with one ``error:`` line and exit
status 2, never a traceback."""

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
from cryofastar.recon.io import ParticleFileError

app = typer.Typer(
    name="cryofastar-stream",
    help="Live cryo-EM 3D reconstruction beside the microscope.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


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


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Output directory for stacks, particles.star, reference.mrc.")],
    structure: Annotated[Path | None, typer.Option(help="PDB/mmCIF structure; default: a procedurally generated protein-like molecule.")] = None,
    n: Annotated[int, typer.Option("--n", help="Number of particles.")] = 2000,
    box: Annotated[int, typer.Option(help="Box size in pixels (even).")] = 64,
    apix: Annotated[float, typer.Option(help="Pixel size in Å.")] = 2.0,
    snr: Annotated[float | None, typer.Option(help="Signal-to-noise ratio (variance of clean images / noise variance); omit with --no-noise.")] = 0.1,
    no_noise: Annotated[bool, typer.Option("--no-noise", help="Write noise-free particles.")] = False,
    ctf: Annotated[bool, typer.Option("--ctf/--no-ctf", help="Apply a CTF (RELION formula) and write its parameters.")] = False,
    per_stack: Annotated[int, typer.Option(help="Particles per .mrcs stack.")] = 500,
    rate: Annotated[float | None, typer.Option(help="Live session: emit stacks at this many particles per second.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (molecule, poses, noise).")] = 0,
    max_shift: Annotated[float, typer.Option(help="Largest particle displacement per axis, pixels.")] = 4.0,
    defocus_min: Annotated[float, typer.Option(help="Smallest defocus, µm (underfocus positive).")] = 0.8,
    defocus_max: Annotated[float, typer.Option(help="Largest defocus, µm.")] = 2.5,
) -> None:
    """Simulate a microscope session as a RELION 3.1 particle set with its true poses."""
    from cryofastar.commands import simulate as command

    try:
        star = command.main(out, structure, n, box, apix, None if no_noise else snr, ctf, per_stack,
                            rate, seed, max_shift, defocus_min, defocus_max)
    except (ParticleFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {n} particles to {star} (true map: {star.parent / 'reference.mrc'})")


@app.command()
def backproject(
    particles: Annotated[Path, typer.Argument(help="RELION 3.1 (or 3.0) particle STAR file with poses.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output map (.mrc).")],
    half_maps: Annotated[bool, typer.Option("--half-maps", help="Also write MAP_half1.mrc and MAP_half2.mrc.")] = False,
    interpolation: Annotated[str, typer.Option(help="Insertion kernel: trilinear (accurate) or nearest (~8x faster).")] = "trilinear",
    oversampling: Annotated[int, typer.Option(help="Fourier grid oversampling (RELION padding factor).")] = 2,
    batch: Annotated[int, typer.Option(help="Particles inserted per step.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    apix: Annotated[float | None, typer.Option(help="Pixel size in Å if the STAR file gives none.")] = None,
    use_ctf: Annotated[bool, typer.Option("--ctf/--no-ctf", help="Use the CTF columns when present (Wiener-style insertion).")] = True,
    reference: Annotated[Path | None, typer.Option(help="Known map (MRC, same box): also report the FSC-0.5 resolution against it.")] = None,
) -> None:
    """Reconstruct a map from the poses in a particle STAR file; print the half-map FSC resolution.

    Writes MAP.mrc (both half sets), MAP_half1/2.mrc with --half-maps, and MAP_fsc.tsv
    (per shell: resolution in Å, half-map FSC, and the FSC against --reference if given).
    """
    from cryofastar.commands import backproject as command

    if interpolation not in ("trilinear", "nearest"):
        raise _fail(f"--interpolation must be trilinear or nearest, got {interpolation!r}")
    try:
        result = command.main(particles, output, half_maps, interpolation, oversampling, batch,  # type: ignore[arg-type]
                              device, apix, use_ctf, reference)
    except (ParticleFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{result.n_particles} particles (half sets {result.half_counts[0]}/{result.half_counts[1]}) "
        f"in {result.seconds:.1f} s; half-map FSC 0.143 resolution {result.resolution_angstrom:.2f} Å"
    )
    if result.reference_resolution_angstrom is not None:
        typer.echo(f"FSC 0.5 resolution against {reference}: {result.reference_resolution_angstrom:.2f} Å")
    for path in result.outputs:
        typer.echo(f"wrote {path}")


def main() -> None:
    """Console-script entry point: usage errors too end in one ``error:`` line, status 2."""
    try:
        code = app(standalone_mode=False)
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

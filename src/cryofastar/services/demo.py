"""Run a simulated microscope session with the daemon on it, and show it live (``cryofastar-stream demo``).

A simulator thread writes particle stacks of a procedurally generated molecule (from
the evaluation seed range, never trained on) into ``OUT/session/`` at ``--rate``
particles per second, the way acquisition software does (temporary name, then rename).
The daemon (:mod:`cryofastar.daemon.pipeline`) watches that directory, exactly as
``cryofastar-stream --watch`` would, and writes its outputs to ``OUT/cryofastar/``.
A live terminal table shows particles, rate, resolution, refinement and queues. After
the last particle the daemon goes on refining (re-posing against the improving map)
until it has converged or ``--polish`` seconds have passed, as it would between
bursts of a real session. At the end the poses are compared with the true ones (median
error after one global alignment, as ``cryofastar-stream evaluate`` does) and the map,
rebuilt in the true frame, with the true map (FSC 0.5), and the output paths are printed.

The live web dashboard (``cryofastar-stream dashboard``, docs/monitoring.md) runs
beside it: its URL is printed first (port ``--dashboard-port``, 8080, or a free port if
that one is taken) and opened in the browser when the machine has a display.

:class:`~cryofastar.daemon.settings.DemoSettings` is what can be set, :func:`run_demo` runs it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryofastar.daemon.pipeline import Daemon
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.model.evaluation import EvaluateSettings, evaluate_particle_sets, map_in_true_frame
from cryofastar.model.training_data import EVAL_SEED_START
from cryofastar.monitoring.dashboard_process import DashboardProcess, connectable
from cryofastar.recon.io import read_volume
from cryofastar.recon.map_alignment import resolution_vs_known_map
from cryofastar.recon.simulate.potential import atoms_to_volume
from cryofastar.recon.simulate.procedural import procedural_molecule
from cryofastar.recon.simulate.session import write_session
from cryofastar.services.settings import DemoSettings

logger = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo produced."""

    directory: Path
    particles_in_map: int
    resolution_angstrom: float
    fsc_true_map_angstrom: float
    seconds: float
    pose_error_degrees: float = float("nan")
    chance_error_degrees: float = float("nan")


def _table(daemon: Daemon, written: int, n: int, started: float, dashboard: str | None):  # noqa: ANN202 - rich
    from rich.table import Table

    s = daemon.status()
    res = s["resolution_angstrom"]
    queues = s["queues"]
    table = Table(title="cryofastar-stream demo", show_header=False, min_width=60)
    table.add_row("elapsed", f"{time.monotonic() - started:.0f} s")
    table.add_row("particles written by the microscope", f"{written} / {n}")
    excluded = s["classification"].get("excluded", 0)
    table.add_row("particles in the map", str(s["particles_in_map"])
                  + (f" (+{excluded} taken out as 2D junk)" if excluded else ""))
    table.add_row("throughput", f"{s['particles_per_second']:.0f} particles/s")
    table.add_row("resolution (half-map FSC 0.143)", "—" if res is None else f"{res:.1f} Å")
    table.add_row("refinement", _refinement_line(s))
    table.add_row("queues (files / chunks / posed)", f"{queues['files']} / {queues['chunks']} / {queues['posed']}")
    table.add_row("rejected files", str(s["files_rejected"]))
    table.add_row("outputs", str(daemon.out))
    table.add_row("ZeroMQ", daemon.address or "—")
    if daemon.metrics_url:
        table.add_row("metrics", daemon.metrics_url)
    if dashboard:
        table.add_row("live dashboard", dashboard)
    return table


def _refinement_line(status: dict) -> str:
    r = status["refinement"]
    phase = {"off": "off", "waiting": "waiting for enough particles", "probe": "probing the network",
             "ab-initio": "map-only ab initio", "local": "local refinement"}.get(r["phase"], r["phase"])
    return f"{phase}; {status['particles_refined']} refined, {status['particles_reposed']} re-posed"


def run_demo(settings: DemoSettings, echo: Callable[[str], object] = print) -> DemoResult:
    """Run the demo (see the module docstring) and return its figures.

    Parameters
    ----------
    settings: DemoSettings
        Session, endpoints, display.
    echo: Callable[[str], object]
        Prints a line (the dashboard's URL, progress without ``live``, the final figures).

    Returns
    -------
    DemoResult
        Particles, resolutions, pose errors and time.

    Raises
    ------
    RuntimeError
        The simulated microscope or the pipeline failed.
    """
    s = settings
    started = time.monotonic()
    directory = Path(s.out) if s.out is not None else Path(tempfile.mkdtemp(prefix="cryofastar-demo-"))
    session, outputs = directory / "session", directory / "cryofastar"
    session.mkdir(parents=True, exist_ok=True)
    molecule_seed = EVAL_SEED_START + s.seed
    volume = atoms_to_volume(procedural_molecule(molecule_seed), s.box, s.apix)
    echo(f"demo in {directory}: {s.n} particles of procedural molecule {molecule_seed}, box {s.box} px at "
         f"{s.apix} Å/px, SNR {s.snr}, {s.rate:.0f} particles/s")
    daemon = Daemon(DaemonSettings(watch=session, out=outputs, zmq=s.zmq, metrics_port=s.metrics_port,
                                   device=s.device, settle_seconds=0.5, flush_seconds=2.0, publish_seconds=3.0,
                                   checkpoint_seconds=30.0, classify=s.classify))
    written = [0]
    failure: list[BaseException] = []

    def microscope() -> None:
        try:
            write_session(session, volume, s.apix, s.n, s.snr, s.seed, per_stack=s.per_stack, rate=s.rate,
                          metadata={"molecule": f"procedural(seed={molecule_seed})"},
                          on_stack=lambda _path, count: written.__setitem__(0, written[0] + count))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    daemon.start()
    dashboard = None
    try:
        if s.dashboard_port is not None:
            dashboard = _start_dashboard(connectable(daemon.address), s.dashboard_port, echo)
            echo(f"live dashboard: {dashboard.url}  (open it in a browser; it works offline)")
            if s.browser or (s.browser is None and _has_display()):
                _open_browser(dashboard.url)
        simulator = threading.Thread(target=microscope, name="demo-microscope", daemon=True)
        simulator.start()
        _follow(daemon, simulator, written, s.n, started, s.live, echo, s.polish, dashboard and dashboard.url)
    finally:
        daemon.stop()
        if dashboard is not None:
            dashboard.stop()
    if failure:
        raise RuntimeError(f"the simulated microscope failed: {failure[0]}")
    if daemon.errors:
        raise RuntimeError(f"the pipeline failed: {daemon.errors[0]}")
    particles, resolution = daemon.particles_in_map, daemon.resolution_angstrom
    excluded = daemon.particles_accounted - particles
    seconds = time.monotonic() - started
    truth, _ = read_volume(session / "reference.mrc")
    errors = evaluate_particle_sets(EvaluateSettings(outputs / "particles.star", session / "particles.star"))
    aligned, _ = map_in_true_frame(outputs / "particles.star", errors.predicted.alignment, device=daemon.device)
    true_fsc = resolution_vs_known_map(aligned, truth, s.apix, 0.5)
    junk = f" ({excluded} taken out as 2D junk)" if excluded > 0 else ""
    echo(f"done in {seconds:.0f} s: {particles} particles in the map{junk}; half-map FSC 0.143: {resolution:.1f} Å")
    echo(f"against the truth: median pose error {errors.predicted.geodesic_median_degrees:.1f}° (random poses: "
         f"{errors.chance.geodesic_median_degrees:.0f}°); FSC 0.5 of the map (in the true frame) against the true "
         f"map: {true_fsc:.1f} Å")
    echo(f"map: {outputs / 'volume.mrc'}  poses: {outputs / 'particles.star'}  true map: {session / 'reference.mrc'}")
    return DemoResult(directory, particles, resolution, true_fsc, seconds,
                      errors.predicted.geodesic_median_degrees, errors.chance.geodesic_median_degrees)


def _start_dashboard(connect: str, port: int, echo) -> DashboardProcess:  # noqa: ANN001
    """The dashboard on ``port``, or on a free port if that one is taken."""
    try:
        return DashboardProcess(connect, port)
    except OSError as exc:
        if port == 0:
            raise
        echo(f"note: {exc}; using a free port instead")
        return DashboardProcess(connect, 0)


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        webbrowser.open_new_tab(url)
    except webbrowser.Error as exc:  # no browser: the printed URL is enough
        logger.info("could not open a browser: %s", exc)


def _follow(daemon: Daemon, simulator: threading.Thread, written: list[int], n: int, started: float, live: bool,
            echo, polish: float, dashboard: str | None = None) -> None:  # noqa: ANN001
    """Show progress until the microscope is done, the daemon has taken everything and refinement settled."""
    taken_at: list[float] = []

    def finished() -> bool:
        if not taken_at:
            if not (not simulator.is_alive() and daemon.wait_idle(0.2)
                    and bool(daemon.errors or daemon.particles_accounted >= written[0])):
                return False
            taken_at.append(time.monotonic())
        phase = daemon.refinement_phase
        settled = phase in ("off", "waiting") or (phase == "local" and daemon.refinement_converged)
        return bool(daemon.errors) or settled or time.monotonic() - taken_at[0] >= polish

    if live:
        from rich.live import Live

        with Live(_table(daemon, written[0], n, started, dashboard), refresh_per_second=4) as view:
            while not finished():
                time.sleep(0.25)
                view.update(_table(daemon, written[0], n, started, dashboard))
        return
    last = 0.0
    while not finished():
        time.sleep(0.25)
        if time.monotonic() - last >= 5:
            s = daemon.status()
            res = s["resolution_angstrom"]
            echo(f"{time.monotonic() - started:5.0f} s  written {written[0]}/{n}  in map {s['particles_in_map']}  "
                 f"{s['particles_per_second']:.0f}/s  resolution {'—' if res is None else f'{res:.1f} Å'}  "
                 f"refinement: {_refinement_line(s)}")
            last = time.monotonic()

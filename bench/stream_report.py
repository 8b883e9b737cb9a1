"""The printed report of bench/bench_stream.py: the setup, the figures, the ratios to the bare rate, the
daemon's stage latencies, and the dashboard-cost table."""

from __future__ import annotations

import argparse
import math

from stream_daemon import STAGES

TARGET_RATIO = 0.90


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def print_setup(hw: dict, args: argparse.Namespace, sim: dict, daemon: dict) -> None:
    """The three ``#`` lines: the machine, the simulated session, the daemon's settings.

    Parameters
    ----------
    hw : dict
        The hardware facts.
    args : argparse.Namespace
        bench_stream.py's arguments.
    sim : dict
        ``apix`` and ``seconds`` of the simulation.
    daemon : dict
        The daemon run's figures (its ``settings``).
    """
    gpu = f", GPU {hw['gpu']}" if "gpu" in hw else ""
    print(f"# {hw['cpu']}, {hw['cpus']} cpus ({hw['cpus_usable']} usable), torch {hw['torch']} with "
          f"{hw['torch_threads']} threads, device {hw['device']}{gpu}, load average {fmt(hw['load_average_1min'])}")
    s = daemon["settings"]
    print(f"# session: {args.n} particles, box {args.box} px at {sim['apix']:.2f} Å, SNR {args.snr}, "
          f"stacks of {args.per_stack}, seed {args.seed}; simulated in {sim['seconds']:.1f} s (not timed below)")
    print(f"# daemon: batch {s['batch']}, anchors {s['anchors']}, interpolation {s['interpolation']}, settle "
          f"{s['settle_seconds']} s, flush {s['flush_seconds']} s, map every {s['publish_particles']} particles "
          f"or {s['publish_seconds']} s, checkpoint every {s['checkpoint_seconds']} s, read chunk {s['read_chunk']}, "
          f"stacks placed {f'at {args.rate:g} particles/s' if args.rate else 'all at once'}")


def figure_rows(daemon: dict, bare: dict, mem: dict) -> list[tuple[str, str, str]]:
    """The rows of the figure table: (figure, value, note).

    Parameters
    ----------
    daemon : dict
        The daemon run's figures.
    bare : dict
        The bare stage's figures.
    mem : dict
        Memory after each stage (``simulation``, ``daemon``, ``bare``).

    Returns
    -------
    list of tuple
        One (name, formatted value, note) per row.
    """
    rate = f"{daemon['window_particles']} in {daemon['window_seconds']:.1f} s"
    steady = f"{daemon['steady_particles']} in {daemon['steady_window_seconds']:.1f} s"
    rows = [
        ("bare: crop + pose, whole set in one call (particles/s)", fmt(bare["rate"], ".1f"), ""),
        ("bare: pose only, whole set in one call (particles/s)", fmt(bare["pose_only_rate"], ".1f"), ""),
        ("bare: crop + pose, one call per stack (particles/s)", fmt(bare["per_stack_rate"], ".1f"), ""),
        ("bare: reference selection, once per session (s)", fmt(bare["reference_seconds"]),
         f"{bare['reference_candidates']} candidates"),
        ("daemon: sustained, first -> last accumulation (p/s)", fmt(daemon["sustained_rate"], ".1f"), rate),
        ("daemon: steady, first pass posed -> all in map (p/s)", fmt(daemon["steady_rate"], ".1f"), steady),
        ("daemon: end to end, first stack -> all in map (p/s)", fmt(daemon["end_to_end_rate"], ".1f"),
         f"{daemon['particles_in_map']} in {daemon['run_seconds']:.1f} s"),
        ("daemon: its own status rate at the end (p/s)", fmt(daemon["daemon_reported_rate"], ".1f"), ""),
        ("daemon: start-up, model load + bind (s)", fmt(daemon["startup_seconds"]), ""),
        ("daemon: first stack -> first pass posed (s)", fmt(daemon["first_posed_seconds"]),
         f"{daemon['first_posed_count']} particles"),
        ("daemon: first stack -> first particle in map (s)", fmt(daemon["first_particle_seconds"]), ""),
        ("daemon: first stack -> first published map (s)", fmt(daemon["first_map_seconds"]),
         "at stop" if daemon["first_map_at_stop"] else f"{daemon['first_map_particles']} particles"),
        ("daemon: most particles posed but not yet in the map", f"{daemon['max_posed_not_in_map']}", ""),
        ("daemon: longest pause of the map's count (s)", fmt(daemon["longest_pause_seconds"]),
         f"from {daemon['longest_pause_began_seconds']:.1f} s; target <= 10"),
        ("daemon: refinement phases (s: phase[+background])",
         " ".join(f"{t:.0f}:{ph}{'+' + bg if bg else ''}" for t, ph, bg in daemon["refinement_phases"]), ""),
        ("daemon: stop, final map + checkpoint (s)", fmt(daemon["stop_seconds"]), ""),
        *([("daemon: refinement caught up after the last particle (s)", fmt(daemon["polish_seconds"]),
            f"converged {daemon['polish_converged']}, phase {daemon['polish_phase']}, refined on arrival "
            f"{daemon['particles_refined']}, re-posed {daemon['particles_reposed']}")] if "polish_seconds" in daemon
          else []),
        ("peak RSS after simulation (MiB)", fmt(mem["simulation"]["peak_rss_mib"], ".0f"), ""),
        ("peak RSS after daemon run (MiB)", fmt(mem["daemon"]["peak_rss_mib"], ".0f"), ""),
        ("peak RSS after bare stage (MiB)", fmt(mem["bare"]["peak_rss_mib"], ".0f"), ""),
    ]
    if "gpu_peak_allocated_mib" in mem["daemon"]:
        rows.append(("GPU peak allocated, daemon run (MiB)", fmt(mem["daemon"]["gpu_peak_allocated_mib"], ".0f"), ""))
        rows.append(("GPU peak allocated, bare stage (MiB)", fmt(mem["bare"]["gpu_peak_allocated_mib"], ".0f"), ""))
    return rows


def print_ratios(args: argparse.Namespace, daemon: dict, bare: dict) -> None:
    """The steady and sustained daemon rates over the bare rate, against the target, and the burst note.

    Parameters
    ----------
    args : argparse.Namespace
        bench_stream.py's arguments (``rate``).
    daemon : dict
        The daemon run's figures.
    bare : dict
        The bare stage's figures.
    """
    for label, key in (("ratio steady / bare", "steady_rate"), ("ratio sustained / bare", "sustained_rate")):
        ratio = daemon[key] / bare["rate"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        if args.rate:
            verdict = "n/a: --rate makes the run input-bound"
        print(f"{label:<56} {ratio:>10.2f}   target ≥ {TARGET_RATIO:.2f}: model-bound ({verdict})")
    if daemon["sustained_rate"] > 1.2 * daemon["steady_rate"]:
        print("note: the map grew in bursts (the accumulator lagged the poser), so the first -> last accumulation "
              "window is too short to be a rate; the steady figure is the one to compare")


def print_counts(daemon: dict, bare: dict) -> None:
    """One line of the daemon's counts (particles, rejections, passes, maps) and one of the bare stage's.

    Parameters
    ----------
    daemon : dict
        The daemon run's figures.
    bare : dict
        The bare stage's figures.
    """
    print(f"daemon: {daemon['particles_in_map']} of {daemon['particles_expected']} particles in the map "
          f"({daemon['finished']}); {daemon['particles_rejected']} particles and {daemon['files_rejected']} files "
          f"rejected; {daemon['forward_passes_in_window']:.0f} forward passes; {daemon['maps_in_window']:.0f} maps "
          f"before stop, {daemon['maps_received']} distinct maps received")
    print(f"bare: {bare['particles']} particles, model box {bare['model_box']}, {bare['views']} views "
          f"({bare['anchors']} anchors, {bare['new_particles_per_pass']} new per pass, {bare['sets_per_pass']} "
          f"set(s) per forward call); crop {bare['crop_seconds']:.2f} s, pose {bare['pose_seconds']:.2f} s, "
          f"per-stack {bare['per_stack_seconds']:.2f} s")


def print_stage_table(daemon: dict) -> None:
    """The daemon's stage latencies in the window and at stop.

    Parameters
    ----------
    daemon : dict
        The daemon run's figures.
    """
    run = daemon["run_seconds"]
    print(f"{'stage latency':<13} {'items':>6} {'total s':>9} {'mean ms':>9} {'% of run':>9} "
          f"{'at stop':>8} {'stop s':>8}")
    for stage in STAGES:
        w, st = daemon["stages_in_window"][stage], daemon["stages_at_stop"][stage]
        mean = 1000 * w["seconds"] / w["count"] if w["count"] else math.nan
        share = 100 * w["seconds"] / run if run > 0 else math.nan
        print(f"{stage:<13} {w['count']:>6.0f} {w['seconds']:>9.2f} {fmt(mean, '.1f'):>9} {fmt(share, '.0f'):>9} "
              f"{st['count']:>8.0f} {st['seconds']:>8.2f}")
    print("(run: first stack placed -> all in the map; items: read = files, pose = poser calls (reference selection "
          "in the first), accumulate = passes; on a CPU pose and accumulate times include waiting for the shared "
          "compute lock)")


def report(hw: dict, args: argparse.Namespace, sim: dict, daemon: dict, bare: dict, mem: dict) -> None:
    """Print the report of one benchmark run (the first daemon run against the bare stage).

    Parameters
    ----------
    hw : dict
        The hardware facts.
    args : argparse.Namespace
        bench_stream.py's arguments.
    sim : dict
        ``apix`` and ``seconds`` of the simulation.
    daemon : dict
        The daemon run's figures.
    bare : dict
        The bare stage's figures.
    mem : dict
        Memory after each stage.
    """
    print_setup(hw, args, sim, daemon)
    print()
    print(f"{'figure':<56} {'value':>10}")
    for name, value, note in figure_rows(daemon, bare, mem):
        print(f"{name:<56} {value:>10}   {note}".rstrip())
    print_ratios(args, daemon, bare)
    print()
    print_counts(daemon, bare)
    print()
    print_stage_table(daemon)


def dashboard_report(runs: list[dict]) -> None:
    """Daemon rates per dashboard mode, runs in the order they ran (alternating), and each mode's mean."""
    print()
    print(f"{'dashboard':<10} {'steady p/s per run':<34} {'mean':>8} {'vs none':>8}   end-to-end p/s per run")
    by_mode: dict[str, list[dict]] = {}
    for run in runs:
        by_mode.setdefault(run["dashboard"]["mode"], []).append(run)
    base = None
    if "none" in by_mode:
        base = sum(r["steady_rate"] for r in by_mode["none"]) / len(by_mode["none"])
    for mode, group in by_mode.items():
        steady = [r["steady_rate"] for r in group]
        mean = sum(steady) / len(steady)
        # no steady rate without a dashboard (a run too short to reach one): nothing to compare with
        versus = "" if not base or mode == "none" else f"{100 * (mean / base - 1):+.0f} %"
        ends = ", ".join(f"{r['end_to_end_rate']:.1f}" for r in group)
        print(f"{mode:<10} {', '.join(f'{v:.1f}' for v in steady):<34} {mean:>8.1f} {versus:>8}   {ends}")
        shown = [r["dashboard"].get("page_map_particles") for r in group if r["dashboard"].get("page_map_particles")
                 is not None]
        if shown:
            print(f"{'':<10} the page showed {', '.join(map(str, shown))} particles in its map at the end")


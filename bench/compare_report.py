"""The report of bench/compare_peers.py: the lines printed while a cell runs, the docs/benchmarks.md tables
from the merged JSON, and the figure (drawn by bench/plot_peers.py with the peer environment's matplotlib)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peer_cryodrgn import HERE, PEER_VENV, PEERS  # noqa: E402 - a sibling module


def score_row(r: dict) -> str:
    return (f"mean ‖ΔR‖_F {r['frobenius_mean']:.3f}, median {r['geodesic_median_deg']:.1f}°, "
            f"shift {_f(r.get('translation_median_px'), 2)} px, FSC 0.5 {_f(r.get('fsc05_angstrom'), 1)} Å, "
            f"0.143 {_f(r.get('fsc0143_angstrom'), 1)} Å")


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _dropped_text(got: dict) -> str:
    """Why a peer has no row of figures in a cell: the probe's lower bound was past the cap."""
    probe, cap = got["probe"], got["cap_s"]
    bound, estimate = probe["first_poses_lower_bound_s"], probe["first_poses_estimate_s"]
    return f"dropped, first poses not before ≈{bound:.0f} s (probe; estimate ≈{estimate:.0f} s) > {cap:.0f} s cap"


def peer_line(got: dict, ours: dict) -> str:
    if got["failure"]:
        return f"FAILED after {got['wall_s']:.0f} s ({got['failure']}); command: {got['command']}"
    state = "finished" if got["finished"] else f"stopped at the {got['cap_s']:.0f} s cap"
    parts = [f"{state} after {got['wall_s']:.0f} s, {len(got['checkpoints'])} epochs with poses"]
    if got["final"]:
        parts.append(f"last: {score_row(got['final'])}")
    for key, b in got["at_budget"].items():
        reached = f"{b['geodesic_median_deg']:.1f}° (epoch {b['epoch']})" if "epoch" in b else "no poses yet"
        when = f"{b['budget_s']:.0f} s" if b["within_cap"] else f"{b['budget_s']:.0f} s is beyond the cap; at the cap"
        parts.append(f"{key} ({when}): {reached}")
    match = got["time_to_match_s"]
    parts.append(f"our error ({ours['geodesic_median_deg']:.1f}°) reached after "
                 + (f"{match:.0f} s = {match / ours['wall_s']:.1f}× our wall time" if match is not None
                    else "never within the cap"))
    return "\n      ".join(parts)



# ---------------------------------------------------------------------------- report
def markdown_tables(results: dict) -> str:
    """The docs/benchmarks.md tables, from the merged JSON."""
    lines = ["| cell | method | wall time | mean ‖ΔR‖_F | median error | shift error | FSC 0.5 | FSC 0.143 |",
             "|---|---|---|---|---|---|---|---|"]
    budget_lines = ["| cell | our wall time | peer | ×1 | ×10 | ×100 | reaches our error after | peer cap |",
                    "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["cells"].items(), key=lambda kv: (kv[1]["box"], -kv[1]["snr"], kv[1]["n"])):
        rows = [("true poses (ceiling)", "–", r["true_poses"]), ("random poses (floor)", "–", r["random_poses"]),
                ("**cryofastar-stream**", f"**{r['cryofastar']['wall_s']:.0f} s**", r["cryofastar"])]
        network = r["cryofastar"].get("network_poses")
        if network:
            rows.append(("cryofastar network poses alone (before refinement)",
                         f"{network['pose_s']:.0f} s of the run", network))
        for peer, got in r["peers"].items():
            if got["final"]:
                state = "" if got["finished"] else f" (stopped at cap, epoch {got['final']['epoch']})"
                rows.append((f"{PEERS[peer]}{state}", f"{got['final']['t_s']:.0f} s", got["final"]))
            elif got.get("dropped"):
                rows.append((f"{PEERS[peer]}: {_dropped_text(got)}", "–", None))
            elif got.get("failure"):
                rows.append((f"{PEERS[peer]}: failed ({got['failure']})", f"{got['wall_s']:.0f} s", None))
            else:
                rows.append((f"{PEERS[peer]}: no poses within {got['cap_s']:.0f} s", f"{got['wall_s']:.0f} s", None))
        for method, wall, s in rows:
            if s is None:
                lines.append(f"| {name} | {method} | {wall} | – | – | – | – | – |")
                continue
            lines.append(f"| {name} | {method} | {wall} | {s['frobenius_mean']:.3f} | {s['geodesic_median_deg']:.1f}° "
                         f"| {_f(s.get('translation_median_px'), 2)} px | {_f(s.get('fsc05_angstrom'), 1)} Å "
                         f"| {_f(s.get('fsc0143_angstrom'), 1)} Å |")
        ours = r["cryofastar"]
        for peer, got in r["peers"].items():
            if got.get("failure"):
                continue
            if got.get("dropped"):
                bound = got["probe"]["first_poses_lower_bound_s"]
                columns = (f"no poses | no poses | no poses | first poses not before ≈{bound:.0f} s (probe, "
                           f"≥{bound / ours['wall_s']:.0f}×)")
                budget_lines.append(f"| {name} | {ours['wall_s']:.0f} s ({ours['geodesic_median_deg']:.1f}°) | "
                                    f"{PEERS[peer]} | {columns} | {got['cap_s']:.0f} s |")
                continue
            cells = []
            for key in ("x1", "x10", "x100"):
                b = got["at_budget"][key]
                reached = (f"{b['geodesic_median_deg']:.1f}° / {b['frobenius_mean']:.2f}" if "epoch" in b
                           else "no poses yet")
                cells.append(reached if b["within_cap"] else f"beyond the cap; at the cap: {reached}")
            match = got["time_to_match_s"]
            reach = (f"{match:.0f} s ({match / ours['wall_s']:.0f}×)" if match is not None
                     else f"not within {got['cap_s']:.0f} s (>{got['cap_s'] / ours['wall_s']:.0f}×)")
            budget_lines.append(f"| {name} | {ours['wall_s']:.0f} s ({ours['geodesic_median_deg']:.1f}°) | "
                                f"{PEERS[peer]} | {' | '.join(cells)} | {reach} | {got['cap_s']:.0f} s |")
    return "\n".join(lines) + "\n\n" + "\n".join(budget_lines) + "\n"


def draw_figure(json_path: Path, figure: Path) -> None:
    """Error against wall time (bench/plot_peers.py, with the peer environment's matplotlib)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"no figure: {python} is missing (a run with the peer creates it)")
        return
    subprocess.run([str(python), str(HERE / "plot_peers.py"), str(json_path), str(figure)], check=True)
    print(f"figure: {figure}")


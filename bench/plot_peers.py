"""Draw bench/compare_peers.py's results: pose error against wall time, one panel per grid cell.

Runs with the peer environment's python (bench/.venv-cryodrgn has matplotlib; the project
does not depend on it):

    bench/.venv-cryodrgn/bin/python bench/plot_peers.py \
        bench/results/compare_peers_cpu.json docs/images/compare_peers.png

Each panel: the peer's median geodesic error after each epoch against the wall time when that
epoch's poses were written; cryofastar-stream's one point; the true-pose ceiling (0°) and the
random-pose floor as horizontal lines; ×1, ×10, ×100 our wall time as vertical lines.
"""

from __future__ import annotations

import json
import math
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"abinit_homo_old": "tab:orange", "abinit": "tab:green"}


def main(json_path: str, png_path: str) -> None:
    with open(json_path) as fh:
        results = json.load(fh)
    cells = sorted(results["cells"].values(), key=lambda r: (r["box"], -r["snr"], r["n"]))
    if not cells:
        raise SystemExit(f"error: {json_path} has no cells")
    columns = min(2, len(cells))
    rows = math.ceil(len(cells) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, cells, strict=False):
        ours = r["cryofastar"]
        times = [ours["wall_s"]]
        for peer, got in r["peers"].items():
            if got.get("dropped"):
                bound = got["probe"]["first_poses_lower_bound_s"]  # past the cap: why it was dropped
                text = (f"{got['label']}: no poses within the {got['cap_s'] / 3600:.3g} h cap\n"
                        f"(probe: first poses not before ≈{bound / 3600:.1f} h)")
                ax.text(0.03, 0.55, text, transform=ax.transAxes, fontsize=8, color=COLOURS.get(peer, "tab:red"))
                ax.axvline(got["cap_s"], color=COLOURS.get(peer, "tab:red"), lw=0.8, ls=":")
                times.append(got["cap_s"])
            if got.get("failure") or got.get("dropped"):
                continue
            pts = got["checkpoints"]
            if pts:
                ax.plot([p["t_s"] for p in pts], [p["geodesic_median_deg"] for p in pts], "o-",
                        color=COLOURS.get(peer, "tab:red"), ms=3, label=f"{got['label']}, per epoch")
                times += [p["t_s"] for p in pts]
            end = got["wall_s"]
            times.append(end)
            ax.axvline(end, color=COLOURS.get(peer, "tab:red"), lw=0.8, ls=":",
                       label=f"{got['label']} {'finished' if got['finished'] else 'stopped (cap)'}")
        ax.plot([ours["wall_s"]], [ours["geodesic_median_deg"]], "*", color="tab:blue", ms=14,
                label="cryofastar-stream reconstruct")
        for factor, style in ((10, "--"), (100, "-.")):
            t = factor * ours["wall_s"]
            if t <= max(times) * 1.5:
                ax.axvline(t, color="tab:blue", lw=0.6, ls=style, alpha=0.6, label=f"×{factor} our wall time")
        ax.axhline(r["random_poses"]["geodesic_median_deg"], color="grey", ls="--", lw=1, label="random poses (floor)")
        ax.axhline(r["true_poses"]["geodesic_median_deg"], color="black", lw=1, label="true poses (ceiling)")
        ax.set_xscale("log")
        ax.set_xlim(min(times) / 2, max(times) * 2)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(-3, 140)
        ax.set_xlabel("wall time (s, 2 CPU cores)" if not results["machine"].get("gpu") else "wall time (s)")
        ax.set_ylabel("median rotation error (°, after global alignment)")
        ax.set_title(f"box {r['box']}, SNR {r['snr']:g}, {r['n']:,} particles")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right", bbox_to_anchor=(1, 0.04))
    fig.suptitle("Pose error against wall time on the same particles (held-out molecule)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} RESULTS.json FIGURE.png")
    main(sys.argv[1], sys.argv[2])

"""Ab initio reconstruction of a RELION particle set: network poses or map-only ab initio, refinement, maps.

Example usage::

    cryofastar-stream reconstruct session/particles.star -o recon/
    cryofastar-stream reconstruct session/particles.star -o recon/ --no-refine           # network only
    cryofastar-stream reconstruct session/particles.star -o recon/ --poses-from map-only  # no network

The job itself is :func:`cryofastar.engine.offline.reconstruct` (steps and outputs in its
module docstring); this command adds a progress bar.
"""

from __future__ import annotations

from pathlib import Path

from cryofastar.engine.offline import ReconstructResult, ReconstructSettings, reconstruct

__all__ = ["main"]


def main(particles: Path, outdir: Path, device: str = "auto", views: int = 128, weights: Path | None = None,
         apix: float | None = None, use_ctf: bool = True, chunk: int = 2048, candidates: int = 64,
         reference: Path | None = None, progress: bool = False, seed: int = 0, poses_from: str = "network",
         refine: bool = True, refine_rounds: int = 4, refine_box: int = 64) -> ReconstructResult:
    """Run the offline job with a progress bar (if ``progress``) and return its figures."""
    settings = ReconstructSettings(device=device, views=views, weights=weights, apix=apix, use_ctf=use_ctf,
                                   chunk=chunk, candidates=candidates, reference=reference, seed=seed,
                                   poses_from=poses_from, refine=refine, refine_rounds=refine_rounds,
                                   refine_box=refine_box)
    if not progress or poses_from != "network":
        return reconstruct(particles, outdir, settings)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("posing + inserting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("reconstruct", total=None)
        return reconstruct(particles, outdir, settings,
                           progress=lambda k, n: bar.update(task, advance=k, total=n))

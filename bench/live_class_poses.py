"""Pose the 2D class set a daemon session left (bench/stream_ab_initio.py --keep DIR) and score it against the truth.

The daemon takes the first settled class set of its 2D lane; this looks at the last one it wrote
(``DIR/<molecule>/watch/cryofastar/classes``): the class poses' two-start verdict with the shipped and the
classical decoder, and the particle poses through their classes against the session's true poses
(median geodesic error after one global alignment and hand).

    .venv/bin/python bench/stream_ab_initio.py --molecules 1GBT --poses-from classes --keep /tmp/keep
    .venv/bin/python bench/live_class_poses.py 1GBT /tmp/keep/1GBT
"""

import sys
from pathlib import Path

import numpy as np
import starfile
import torch
from cryofastar.engine.class_posing import ClassPoser, ClassViews
from cryofastar.model.evaluation import pose_errors
from cryofastar.recon.io import read_images

sys.path.insert(0, str(Path(__file__).parent))
from panel_molecules import MOLECULES, clean_set  # noqa: E402


def main() -> None:
    name, root, per_stack = sys.argv[1], Path(sys.argv[2]), 200  # stream_ab_initio.py's default --per-stack
    molecule = next(m for m in MOLECULES if m.name == name)
    cs = clean_set(molecule, 64, True, 10_000)
    folder = root / "watch" / "cryofastar" / "classes"
    averages = torch.as_tensor(read_images(folder / "class_averages.mrcs"))
    classes = starfile.read(folder / "classes.star")
    classes = classes if not isinstance(classes, dict) else list(classes.values())[-1]
    counts = torch.tensor(classes["rlnCryofastarParticleCount"].to_numpy(np.float64))
    junk = torch.tensor(classes["rlnCryofastarJunk"].to_numpy() > 0)
    particles = starfile.read(folder / "particles.star")["particles"]
    names = particles["rlnImageName"]
    stack = names.str.extract(r"particles_(\d{4})\.mrcs")[0].astype(int).to_numpy() - 1  # write_session's names
    index = names.str.split("@").str[0].astype(int).to_numpy()
    truth = cs.rotations[torch.as_tensor(stack * per_stack + index - 1)]
    columns = {c: particles[c].to_numpy() for c in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst",
                                                      "rlnOriginYAngst")}
    views = ClassViews.from_columns(averages, counts, junk, columns)
    for weights in ("shipped", "classical"):
        result = ClassPoser.load(weights).pose_particles(views)
        error = pose_errors(result.rotations, truth).geodesic_median_degrees
        print(f"{name} {weights}: {result.summary()}; particle poses {error:.1f}° from the truth")


if __name__ == "__main__":
    main()

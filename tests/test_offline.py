"""The offline job (engine.offline), in process: settings, outputs and the one writer of each file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import starfile
import torch
from cryofastar.engine.offline import ReconstructSettings, reconstruct
from cryofastar.recon.io import read_particles, read_volume
from cryofastar.recon.io.columns import CONFIDENCE_COLUMN, NETWORK_COLUMNS
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.session import write_session

BOX, APIX, N = 48, 3.0, 150


@pytest.fixture(scope="module")
def star(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("session")
    truth = atoms_to_volume(procedural_molecule(1000000003), BOX, APIX)
    return write_session(out, truth, APIX, N, snr=1.0, seed=2, per_stack=60)


def test_network_poses_without_refinement_write_every_output(star: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    settings = ReconstructSettings(device="cpu", views=32, refine=False, chunk=64)
    result = reconstruct(star, tmp_path, settings, progress=lambda k, n: calls.append((k, n)))
    assert result.n_particles == N and result.refine_modes == [] and result.network_won_fraction is None
    assert sum(k for k, _ in calls) == N and {n for _, n in calls} == {N}  # every particle reported once
    assert [p.name for p in result.outputs] == ["particles.star", "volume.mrc", "volume_half1.mrc",
                                                 "volume_half2.mrc", "volume_fsc.tsv"]
    particles = starfile.read(tmp_path / "particles.star")["particles"]
    assert len(particles) == N and set(NETWORK_COLUMNS) <= set(particles.columns)
    assert bool((particles[CONFIDENCE_COLUMN] > 1).all())
    row = particles.index[particles["rlnImageName"] == particles["rlnImageName"].iloc[result.reference_row]][0]
    assert particles.loc[row, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].abs().max() < 1e-6  # the reference
    volume, apix = read_volume(tmp_path / "volume.mrc")
    assert volume.shape == (BOX, BOX, BOX) and apix == pytest.approx(APIX)
    header = (tmp_path / "volume_fsc.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["shell", "resolution_angstrom", "fsc_half_maps"]


def test_class_poses_pose_every_particle_through_its_class(star: Path, tmp_path: Path) -> None:
    """--poses-from classes without refinement: 2D classes, their common-line poses, each particle through its
    class: Rz(psi) A_c, one A_c per class (accuracy: bench/ab_initio_panel.py --poses-from classes; 150
    particles in 8 classes are far too few for good class averages)."""
    settings = ReconstructSettings(device="cpu", poses_from="classes", classes=8, refine=False)
    result = reconstruct(star, tmp_path, settings)
    assert result.n_particles == N and 2 <= result.classes_posed <= 8 and result.refine_modes == []
    assert result.class_poses["classes_posed"] == result.classes_posed and result.class_poses["agree"] in (True, False)
    particles = starfile.read(tmp_path / "particles.star")["particles"]
    assert set(NETWORK_COLUMNS) | {"rlnClassNumber"} <= set(particles.columns)
    assert particles["rlnClassNumber"].between(1, 8).all()
    rotations = read_particles(tmp_path / "particles.star").rotations()
    directions = rotations[:, 2, :]  # A.T @ e_z: Rz(psi) leaves it alone, so every member has its class's
    numbers = torch.tensor(particles["rlnClassNumber"].to_numpy(copy=True))
    firsts = []
    for number in numbers.unique():
        members = directions[numbers == number]
        assert torch.allclose(members, members[0].expand_as(members), atol=1e-6)
        firsts.append(members[0])
    assert len(firsts) >= 2 and not torch.allclose(firsts[0], firsts[1], atol=1e-3)  # classes posed apart


@pytest.mark.parametrize(("change", "message"), [
    ({"views": 2}, "--views must be at least 3"),
    ({"poses_from": "magic"}, "--poses-from must be network, map-only or classes"),
    ({"poses_from": "classes", "classes": 1}, "--classes must be at least 2"),
    ({"poses_from": "map-only", "refine": False}, "needs refinement"),
    ({"refine_rounds": 0}, "--refine-rounds must be at least 1"),
    ({"refine_box": 8}, "--refine-box must be 16..512 px"),
])
def test_impossible_settings_are_refused_before_any_work(star: Path, tmp_path: Path, change: dict,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):  # refused when the settings are made
        dataclasses.replace(ReconstructSettings(device="cpu"), **change)
    settings = ReconstructSettings(device="cpu")
    for name, value in change.items():  # and by the job itself, should they be changed afterwards
        setattr(settings, name, value)
    with pytest.raises(ValueError, match=message):
        reconstruct(star, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()

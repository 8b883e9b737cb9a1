"""The progress bar of the offline commands (``reconstruct``, ``classify``): a rich bar, shown from the first update."""

from __future__ import annotations

__all__ = ["ProgressBar"]


class ProgressBar:
    """A callable ``bar(advance, total)`` for the engine's offline jobs; :meth:`stop` closes it.

    Parameters
    ----------
    label: str
        The text before the bar.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None

    def __call__(self, advance: int, total: int) -> None:
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._task = self._bar.add_task(self.label, total=total)
            self._bar.start()
        self._bar.update(self._task, advance=advance, total=total)

    def stop(self) -> None:
        """Close the bar (if it was ever shown)."""
        if self._bar is not None:
            self._bar.stop()

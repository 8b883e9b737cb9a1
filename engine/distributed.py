"""A job's ranks: the processes that share one offline reconstruction over ``torch.distributed``.

One idea only: who works on which particles, and how their partial results meet. It knows
no daemon and no command line (docs/scaling.md, "Offline: reconstruct --nproc").

- :class:`Ranks` (frozen): this process's rank, the world size, the backend and the device.
  :meth:`Ranks.single` is the one-process case, so that the offline job's code paths are the
  same with and without distribution (every collective below is then a no-op);
  :meth:`Ranks.join` joins the group from the environment ``torchrun`` (or :func:`launch`)
  sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` (``init_method="env://"``). Backend ``nccl`` on CUDA (device
  ``cuda:LOCAL_RANK``), ``gloo`` on CPUs (torch intra-op threads: usable cores // local
  world size, at least 1).
- :func:`launch`: ``N`` local worker processes with torch's own launcher
  (``torch.distributed.launcher.api.elastic_launch``: c10d rendezvous on 127.0.0.1 and a
  free port, no restarts), so that the same code runs under ``torchrun`` on several
  machines. A worker that raises or dies ends the launch with :class:`RankFailed` naming the
  rank and its exception (or signal): the launcher watches its workers and stops the others
  at once.
- **Collective timeout**: every collective of a group :meth:`Ranks.join` made gives up after
  :data:`COLLECTIVE_TIMEOUT_SECONDS` (environment :data:`TIMEOUT_ENV` overrides it), so a
  rank whose peer vanished without its launcher noticing (another machine) fails instead of
  hanging. It must exceed the longest step rank 0 runs alone while the others wait (map-only
  ab initio, 2D classification: docs/scaling.md); during such a step a CPU rank 0 takes every
  core of its machine (:func:`alone`: the others wait idle in a collective).
- The split: rows ``0..n-1`` cut into whole units (:func:`units`: e.g. the network's forward
  passes), dealt round-robin (:func:`deal`: unit ``k`` to rank ``k % world``).
- The meeting points: :func:`all_reduce_accumulator` sums a
  :class:`~cryofastar.recon.HalfSetAccumulator`'s grids and particle counts in place on every
  rank; :func:`gather_rows` brings per-row arrays (poses `(n, 3, 3)`, origins `(n, 2)`,
  scores, spreads, images) back into row order on every rank or on rank 0;
  :func:`broadcast` and :func:`gather_objects` carry small Python objects;
  :func:`allreduce_bytes` is what one all-reduce moves for a box, from a real accumulator's
  tensors.
- A live session (``watch --nproc``, docs/scaling.md "Live: watch --nproc"): :func:`owners` says
  which rank takes each particle as files arrive (no rank waits for another to decide), and
  :func:`reduce_accumulator` adds the other ranks' new contributions to rank 0's grids
  (:func:`reduce_tensors`, which also adds their 2D class sums).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from cryofastar.recon import HalfSetAccumulator

logger = logging.getLogger(__name__)

__all__ = ["COLLECTIVE_TIMEOUT_SECONDS", "TIMEOUT_ENV", "RankFailed", "Ranks", "all_reduce_accumulator",
           "accumulator_tensors", "allreduce_bytes", "alone", "broadcast", "check_processes", "cpu_threads", "deal",
           "gather_objects", "gather_rows", "in_torchrun_environment", "launch", "owners", "reduce_accumulator",
           "reduce_tensors", "units", "worker_logging"]

COLLECTIVE_TIMEOUT_SECONDS = 3600.0
"""How long a collective waits for the other ranks before it fails (s): longer than any step rank 0 runs alone."""
TIMEOUT_ENV = "CRYOFASTAR_COLLECTIVE_TIMEOUT_S"
"""Environment variable overriding :data:`COLLECTIVE_TIMEOUT_SECONDS` (seconds)."""
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """A worker of :func:`launch` raised or died; the message names its rank and its exception or signal."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job of ``world`` processes.

    Attributes
    ----------
    rank: int
        Global rank, ``0..world-1``; rank 0 owns the outputs.
    world: int
        Processes in the job (all machines).
    backend: str | None
        ``"nccl"`` (CUDA), ``"gloo"`` (CPU); ``None`` for one process without a group.
    device: torch.device
        Where this rank computes (``cuda:LOCAL_RANK`` with NCCL).
    local_rank: int
        Rank among the processes of this machine.
    local_world: int
        Processes on this machine.
    """

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Ranks:
        """One process, no group: every collective of this module returns its input."""
        return cls(device=torch.device(device))

    @property
    def root(self) -> bool:
        """Whether this is rank 0 (it writes the outputs and prints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to talk to."""
        return self.world > 1

    @classmethod
    def join(cls, device: str = "auto", timeout_seconds: float | None = None) -> Ranks:
        """Join the process group the environment describes (``torchrun``'s variables, ``env://``).

        Parameters
        ----------
        device: str
            ``auto`` (CUDA when this machine has a GPU per local rank, else CPU), ``cpu`` or ``cuda``.
        timeout_seconds: float | None
            Collective timeout (s); ``None``: :data:`TIMEOUT_ENV` if set, else :data:`COLLECTIVE_TIMEOUT_SECONDS`.

        Raises
        ------
        ValueError
            ``cuda`` asked for with fewer GPUs than local ranks, or the variables missing.
        """
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(f"not started by torchrun or launch(): {', '.join(missing)} not set")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        check_processes(local_world, device)
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.device_count() >= local_world)
        if use_cuda:
            where = torch.device("cuda", local_rank)
            torch.cuda.set_device(where)
        else:
            where = torch.device("cpu")
            torch.set_num_threads(cpu_threads(local_world))
        backend = "nccl" if use_cuda else "gloo"
        seconds = timeout_seconds if timeout_seconds is not None else float(
            os.environ.get(TIMEOUT_ENV, COLLECTIVE_TIMEOUT_SECONDS))
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=seconds))
        logger.info("rank %d of %d (%s on %s, %d threads)", rank, world, backend, where, torch.get_num_threads())
        return cls(rank, world, backend, where, local_rank, local_world)

    def leave(self) -> None:
        """Leave the group (nothing for :meth:`single`)."""
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def worker_logging(log_level: int | None) -> None:
    """Logging of one rank's process: ``log_level`` the launching process's (a fresh worker of :func:`launch`;
    ``None``: as configured already, e.g. under ``torchrun``); ranks other than 0 say only warnings and errors
    (rank 0 speaks for the job). Reads ``RANK`` (the launcher's or torchrun's; 0 when unset)."""
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


def in_torchrun_environment() -> bool:
    """Whether this process was started as one rank of a group (``torchrun`` or :func:`launch` set its variables)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def check_processes(nproc: int, device: str) -> None:
    """Raise ValueError (one line, naming the options) when ``nproc`` local processes cannot run on ``device``.

    ``--device cuda`` needs one visible GPU per local process.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if device == "cuda" and nproc > 1 and torch.cuda.device_count() < nproc:
        raise ValueError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs (one per process), "
                         f"{torch.cuda.device_count()} visible")


def cpu_threads(local_world: int) -> int:
    """Torch intra-op threads of one CPU rank: the usable cores shared by the ``local_world`` ranks, at least 1."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world))


@contextlib.contextmanager
def alone(ranks: Ranks) -> Iterator[None]:
    """A step rank 0 runs by itself while the other ranks wait in a collective: on a CPU, rank 0 uses every usable
    core of its machine meanwhile (its own share's threads are restored afterwards). Nothing on a GPU, with one
    process, or on the other ranks."""
    if not (ranks.distributed and ranks.root and ranks.device.type == "cpu"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _launcher_quiet() -> Iterator[None]:
    """The launcher's own log lines (a worker's traceback, the others' SIGTERM) only at ``--verbose``: the
    failure comes back as one :class:`RankFailed` message instead."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    names = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


def launch(nproc: int, entrypoint: Callable[..., Any], *args: Any,
           signals: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT") -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc`` local worker processes that form one group; return each rank's value.

    Torch's own launcher (``elastic_launch``, spawn start method, c10d rendezvous on 127.0.0.1 and a free
    port, ``max_restarts=0``) sets every worker's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT``; the entrypoint joins with :meth:`Ranks.join`, exactly as under ``torchrun``.

    Parameters
    ----------
    nproc: int
        Worker processes (>= 1).
    entrypoint: Callable
        A module-level function (the workers import it by name); its arguments and return value are pickled.
    *args: Any
        Its arguments.
    signals: str
        The signals of this process on which the launcher ends every worker at once (then waits up to 30 s
        for them before SIGKILL); the others are left to the caller's handlers (``watch --nproc``).

    Returns
    -------
    dict[int, Any]
        Rank -> the value its entrypoint returned.

    Raises
    ------
    RankFailed
        A worker raised or was killed: the message names the first rank that failed and its exception
        (``ValueError: ...``) or signal; the launcher has stopped the other workers.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="cryofastar-ranks-") as logs:  # the workers' error files, then gone
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                              run_id=f"cryofastar-{uuid.uuid4().hex[:12]}", rdzv_backend="c10d",
                              rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, monitor_interval=0.1,
                              logs_specs=DefaultLogsSpecs(log_dir=logs), signals_to_handle=signals)
        try:
            with _launcher_quiet():
                return elastic_launch(config, entrypoint)(*args)
        except ChildFailedError as exc:
            raise RankFailed(_describe(exc.failures, nproc)) from None


_CONSEQUENCES = ("gloo", "nccl", "connection closed", "connection reset", "distbackenderror", "timed out")
"""Words of a collective's error: a rank that failed *because* a peer died (reported after the peer)."""


def _describe(failures: dict[int, Any], nproc: int) -> str:
    """One line: the rank that failed first and its exception or signal, then any other rank's.

    A failure the launcher saw at the same moment as a collective's error on another rank comes first (the
    launcher's timestamps are whole seconds: the dead peer is the cause, the broken collective the consequence).
    """
    def text(failure: Any) -> str:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        lines = str(message).strip().splitlines()
        return lines[-1] if lines else "no error recorded"

    def order(rank: int) -> tuple[int, bool, int]:
        return failures[rank].timestamp, any(word in text(failures[rank]).lower() for word in _CONSEQUENCES), rank

    first, *others = sorted(failures, key=order)
    line = f"rank {first} of {nproc} failed (exit code {failures[first].exitcode}): {text(failures[first])}"
    return "; ".join([line, *(f"then rank {rank}: {text(failures[rank])}" for rank in others)])


# ---------------------------------------------------------------------- the split
def units(rows: np.ndarray, size: int, first: int | None = None) -> list[np.ndarray]:
    """Consecutive blocks of ``rows``: the first of ``first`` rows (default ``size``), then ``size`` each.

    The last block may be shorter; no block is empty. ``rows`` `(m,)` int64, in the order work runs.
    """
    if size < 1 or (first is not None and first < 1):
        raise ValueError(f"unit sizes must be at least 1, got {size} and {first}")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    head = min(len(rows), size if first is None else first)
    blocks = [rows[:head]] if head else []
    blocks += [rows[start : start + size] for start in range(head, len(rows), size)]
    return blocks


def deal(blocks: Sequence[np.ndarray], rank: int, world: int) -> np.ndarray:
    """The rows of rank ``rank`` of ``world``: units ``rank, rank + world, ...`` of ``blocks``, concatenated in order.

    Every row of ``blocks`` goes to exactly one rank; two ranks' row counts differ by at most one unit.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    mine = list(blocks[rank::world])
    return np.concatenate(mine).astype(np.int64) if mine else np.empty(0, dtype=np.int64)


SHARE_BLOCK = 16
"""Consecutive images of a stack a live session's rank takes together (:func:`owners`)."""


def owners(stacks: np.ndarray, indices: np.ndarray, world: int, block: int = SHARE_BLOCK) -> np.ndarray:
    """`(n,)` int64: the rank of ``world`` that takes each particle of a live session.

    A stack's images go in blocks of ``block`` consecutive indices to the ranks in turn, starting at a rank
    fixed by the stack's path (its CRC-32), so that many small stacks spread over the ranks too. The rule
    depends on the particle alone (``stacks`` `(n,)` str paths, ``indices`` `(n,)` 1-based): every rank
    decides it for every file without asking, in whatever order the files reach it, and a restart with
    another number of ranks still takes every particle once (what the journal holds is skipped first).
    """
    if world < 1 or block < 1:
        raise ValueError(f"world and block must be at least 1, got {world} and {block}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    stacks = np.asarray(stacks).reshape(-1)
    if world == 1:
        return np.zeros(len(indices), dtype=np.int64)
    names, inverse = np.unique(stacks.astype(str), return_inverse=True)  # one CRC per stack, not per particle
    start = np.array([zlib.crc32(name.encode("utf-8", "surrogateescape")) for name in names], dtype=np.int64)
    return (start[inverse.reshape(-1)] + (indices - 1) // block) % world


# ---------------------------------------------------------------------- meeting points
def accumulator_tensors(acc: HalfSetAccumulator) -> list[torch.Tensor]:
    """The tensors of ``acc`` an all-reduce sums: ``grids`` `(2, N+2, N+2, N//2+2, 3)` float32 and
    ``particle_counts`` `(2,)` int64 (``N`` = oversampling x box; :mod:`cryofastar.recon.insertion`)."""
    return [acc.grids, acc.particle_counts]


def all_reduce_accumulator(acc: HalfSetAccumulator, ranks: Ranks) -> HalfSetAccumulator:
    """Sum ``acc`` over the ranks, in place: afterwards every rank holds the grids of every rank's particles.

    The grids hold only sums (:mod:`cryofastar.recon.accumulator`), so the result is the accumulator one
    process would have built from all the particles, up to float32 rounding (the order of the sums).
    Returns ``acc``. One process: unchanged.
    """
    if not ranks.distributed:
        return acc
    for tensor in accumulator_tensors(acc):
        if tensor.device == ranks.device or ranks.backend == "gloo":
            dist.all_reduce(tensor)
        else:  # NCCL reduces CUDA tensors only (the particle counts live on the CPU)
            moved = tensor.to(ranks.device)
            dist.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
    return acc


def reduce_accumulator(acc: HalfSetAccumulator, ranks: Ranks) -> HalfSetAccumulator:
    """Add every other rank's ``acc`` to rank 0's, in place (a live session: the others hold what they inserted
    since the last call; they zero theirs afterwards, since a reduce may use them as scratch space).

    Rank 0's grids then hold its own particles and the others', exactly as if it had inserted them all (up to
    float32 rounding: the order of the sums). Returns ``acc``. One process: unchanged.
    """
    reduce_tensors(accumulator_tensors(acc), ranks)
    return acc


def reduce_tensors(tensors: Sequence[torch.Tensor], ranks: Ranks) -> None:
    """Add every other rank's ``tensors`` to rank 0's, in place (the same shapes and dtypes on every rank; complex
    ones are summed as their real and imaginary parts). The others' may be used as scratch space: they zero or
    drop theirs afterwards. One process: nothing happens."""
    if not ranks.distributed:
        return
    for tensor in tensors:
        flat = torch.view_as_real(tensor) if tensor.is_complex() else tensor
        if tensor.device == ranks.device or ranks.backend == "gloo":
            dist.reduce(flat, dst=0)
        else:  # NCCL reduces CUDA tensors only (the particle counts, the 2D class sums live on the CPU)
            moved = flat.to(ranks.device)
            dist.reduce(moved, dst=0)
            if ranks.root:
                flat.copy_(moved.to(flat.device))


def allreduce_bytes(box: int, oversampling: int = 2) -> int:
    """Bytes one :func:`all_reduce_accumulator` sums for particles of ``box`` px (per rank, each way).

    Read from a real :class:`~cryofastar.recon.HalfSetAccumulator` of that box, built on the ``meta``
    device (shapes without memory), so the figure follows the accumulator's layout.
    """
    acc = HalfSetAccumulator(box, 1.0, oversampling=oversampling, device="meta")
    return sum(tensor.numel() * tensor.element_size() for tensor in accumulator_tensors(acc))


def broadcast(ranks: Ranks, value: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``value`` on every rank (the others pass anything, e.g. ``None``)."""
    if not ranks.distributed:
        return value
    box = [value if ranks.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def gather_rows(ranks: Ranks, rows: np.ndarray, values: torch.Tensor, root_only: bool = False) -> torch.Tensor | None:
    """Per-row values of every rank, in ascending row order (``0..n-1`` when the ranks' rows cover the set).

    Parameters
    ----------
    ranks: Ranks
        The job's ranks.
    rows: np.ndarray
        `(m,)` int64 rows this rank holds (any order; no row on two ranks).
    values: torch.Tensor
        `(m, ...)` their values (CPU), e.g. poses `(m, 3, 3)`, origins `(m, 2)`, scores `(m,)`, images
        `(m, W, W)`.
    root_only: bool
        Only rank 0 receives (e.g. images for a step rank 0 runs alone); the others get ``None``.

    Returns
    -------
    torch.Tensor | None
        `(M, ...)` the values of the union of every rank's rows (``M`` rows), ascending.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) != len(values):
        raise ValueError(f"{len(values)} values for {len(rows)} rows")
    if not ranks.distributed:
        order = np.argsort(rows, kind="stable")
        return values if np.array_equal(order, np.arange(len(rows))) else values[torch.as_tensor(order)]
    mine = (rows, values.detach().cpu())
    if root_only:
        parts: list[Any] | None = [None] * ranks.world if ranks.root else None
        dist.gather_object(mine, parts, dst=0)
        if not ranks.root:
            return None
    else:
        parts = gather_objects(ranks, mine)
    assert parts is not None
    every = np.concatenate([part[0] for part in parts])
    order = torch.as_tensor(np.argsort(every, kind="stable"))
    return torch.cat([part[1] for part in parts])[order]

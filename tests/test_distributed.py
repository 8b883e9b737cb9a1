"""engine.distributed: the split rule, the meeting points, and real 2-rank gloo groups started by torch's own
launcher (no mocks; the workers are tests/distributed_helpers.py)."""

from __future__ import annotations

import time
from pathlib import Path

import distributed_helpers as helpers
import numpy as np
import pytest
import torch
from cryofastar.engine import distributed as d
from cryofastar.engine.offline import _pass_units
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.rotations import geodesic_degrees
from cryofastar.recon.simulate import CtfRange, atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.session import write_session


@pytest.mark.parametrize(("n", "size", "first", "world"), [
    (1000, 119, 127, 2), (1000, 119, 127, 3), (300, 23, 31, 4), (5, 119, 127, 2), (0, 10, None, 2), (64, 8, None, 8),
    (65, 8, None, 8),
])
def test_shares_are_disjoint_cover_every_row_and_differ_by_at_most_one_unit(n: int, size: int, first: int | None,
                                                                           world: int) -> None:
    blocks = d.units(np.arange(n), size, first)
    assert all(len(block) >= 1 for block in blocks)
    assert [len(block) for block in blocks[1:-1]] == [size] * max(0, len(blocks) - 2)  # whole units
    if blocks:
        assert len(blocks[0]) == min(n, size if first is None else first)
    shares = [d.deal(blocks, rank, world) for rank in range(world)]
    every = np.concatenate(shares)
    assert len(every) == len(set(every.tolist())) == n  # disjoint, nothing lost
    assert np.array_equal(np.sort(every), np.arange(n))  # every row
    for rank, share in enumerate(shares):  # round-robin by unit, in order
        mine = blocks[rank::world]
        assert np.array_equal(share, np.concatenate(mine) if mine else np.empty(0, dtype=np.int64))
    largest = max((len(block) for block in blocks), default=0)
    assert max(map(len, shares)) - min(map(len, shares)) <= largest  # balance: one unit at most


def test_the_network_units_are_its_passes_with_the_reference_last() -> None:
    blocks = _pass_units(300, 17, views=32, anchors=8)
    assert [len(b) for b in blocks] == [31, *[23] * 11, 15, 1] and blocks[-1].tolist() == [17]
    assert 17 not in np.concatenate(blocks[:-1]) and len(np.concatenate(blocks)) == 300


def test_one_process_collectives_return_their_input() -> None:
    ranks = d.Ranks.single()
    assert ranks.root and not ranks.distributed and ranks.backend is None
    values = torch.arange(5.0) * 10
    assert d.gather_rows(ranks, np.array([3, 0, 4, 1, 2]), values).tolist() == [10.0, 30.0, 40.0, 0.0, 20.0]
    same = torch.arange(4.0)
    assert d.gather_rows(ranks, np.arange(4), same) is same  # in order already: no copy
    assert d.broadcast(ranks, {"a": 1}) == {"a": 1} and d.gather_objects(ranks, 7) == [7]
    acc = HalfSetAccumulator(16, 2.0)
    assert d.all_reduce_accumulator(acc, ranks) is acc and acc.n_particles == 0
    ranks.leave()  # nothing to leave


def test_allreduce_bytes_are_the_accumulators_tensors() -> None:
    acc = HalfSetAccumulator(32, 1.0)
    assert d.allreduce_bytes(32) == acc.grids.numel() * 4 + 2 * 8
    assert d.allreduce_bytes(64) == 2 * 130 * 130 * 66 * 3 * 4 + 16  # (2, N+2, N+2, N/2+2, 3) float32, N = 128
    assert 1.6e9 < d.allreduce_bytes(256) < 1.7e9  # box 256: 1.6 GB per all-reduce
    assert d.allreduce_bytes(64, oversampling=1) < d.allreduce_bytes(64) / 7


def test_impossible_process_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="--nproc must be at least 1"):
        d.check_processes(0, "cpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="--nproc 2 with --device cuda needs 2 GPUs"):
            d.check_processes(2, "cuda")
    d.check_processes(2, "cpu")
    d.check_processes(2, "auto")  # auto falls back to the CPU without a GPU per process
    assert d.cpu_threads(2) >= 1 and d.cpu_threads(10_000) == 1


def test_two_gloo_ranks_sum_to_the_accumulator_of_every_particle() -> None:
    n = 150
    results = d.launch(2, helpers.accumulate_share, n, 16)
    images, rotations, origins, halves, ctf = helpers.particles(n)
    one = HalfSetAccumulator(helpers.BOX, helpers.APIX)
    one.add(images, rotations, origins, halves, ctf)
    assert sorted(results) == [0, 1]
    assert np.array_equal(np.sort(np.concatenate([results[r]["rows"] for r in (0, 1)])), np.arange(n))
    scale = float(one.grids.abs().max())
    for rank in (0, 1):
        got = results[rank]
        assert got["rank"] == rank and got["world"] == 2 and got["backend"] == "gloo"
        assert got["threads"] == d.cpu_threads(2)  # back to its share of the cores after alone()
        assert got["alone"] == (d.cpu_threads(1) if rank == 0 else d.cpu_threads(2))
        assert torch.equal(got["counts"], one.particle_counts)
        assert float((got["grids"] - one.grids).abs().max()) <= 1e-5 * scale  # float32 sums, another order
        assert torch.equal(got["gathered"], rotations)  # back in row order, on every rank
        assert got["broadcast"] == {"from": 0}
    assert torch.equal(results[0]["to_root"], origins) and results[1]["to_root"] is None
    assert torch.equal(results[0]["grids"], results[1]["grids"])  # every rank holds the same sum


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_launch_with_its_rank_and_error(how: str) -> None:
    started = time.monotonic()
    expected = r"ValueError: the stack of rank 1's share is unreadable" if how == "raise" else r"(Signal 9|SIGKILL)"
    with pytest.raises(d.RankFailed, match=rf"^rank 1 of 2 failed \(exit code -?\d+\): .*{expected}"):
        d.launch(2, helpers.fail_on_rank, 1, how)
    assert time.monotonic() - started < 60  # the launcher stopped rank 0, waiting in its all-reduce: no hang


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    truth = atoms_to_volume(procedural_molecule(1000000003), helpers.BOX, helpers.APIX)
    return write_session(tmp_path_factory.mktemp("session"), truth, helpers.APIX, 200, snr=1.0, seed=3, per_stack=60,
                         ctf=CtfRange())


def test_a_refinement_round_on_two_ranks_is_the_one_process_round(session: Path) -> None:
    """Back-projection of shares + all-reduce, a local round of each share against the same half maps (the CTF
    delocalisation fitted on one process's first batch, which spans both ranks' shares), poses gathered."""
    one = helpers.refine_round(session, chunk=64, views=32)
    two = d.launch(2, helpers.refine_round, session, 64, 32)
    assert two[1] is None and one["allreduces"] == 0
    two = two[0]
    assert two["allreduces"] == 2 and two["share"] < 200
    assert float(geodesic_degrees(one["rotations"], two["rotations"]).max()) < 1e-3
    assert float((one["origins"] - two["origins"]).abs().max()) < 1e-4
    assert torch.allclose(one["scores"], two["scores"], atol=1e-5)
    assert float((one["volume"] - two["volume"]).abs().max()) <= 1e-4 * float(one["volume"].std())

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


# ---------------------------------------------------------------------- a live session's split and meeting (watch)
def _stacks(count: int, per_stack: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` stacks of `per_stack` particles each: (stacks, 1-based indices), stack by stack."""
    names = np.array([f"/session/Particles/mic_{i:05d}_particles.mrcs" for i in range(count)])
    return np.repeat(names, per_stack), np.tile(np.arange(1, per_stack + 1), count)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_owners_give_each_particle_one_rank_whatever_else_is_in_the_call(world: int) -> None:
    stacks, indices = _stacks(40, 37)
    ranks = d.owners(stacks, indices, world)
    assert ranks.shape == (len(indices),) and ranks.dtype == np.int64
    assert set(ranks.tolist()) == set(range(world))  # every rank has a share, none outside 0..world-1
    if world == 1:
        assert not ranks.any()
    order = np.random.default_rng(0).permutation(len(indices))
    assert np.array_equal(d.owners(stacks[order], indices[order], world), ranks[order])  # any order
    some = order[:50]  # a few particles of a few stacks, alone in the call
    assert np.array_equal(d.owners(stacks[some], indices[some], world), ranks[some])
    for row in (0, 500, len(indices) - 1):  # one at a time, path given as a list of str
        assert d.owners([str(stacks[row])], [indices[row]], world).tolist() == [ranks[row]]
    assert d.owners(np.array([], dtype=str), np.array([], dtype=np.int64), world).shape == (0,)


@pytest.mark.parametrize(("world", "block"), [(2, d.SHARE_BLOCK), (3, d.SHARE_BLOCK), (4, 5)])
def test_owners_deal_blocks_of_a_stack_to_the_ranks_in_turn(world: int, block: int) -> None:
    stacks, indices = _stacks(6, 10 * block + 3)
    ranks = d.owners(stacks, indices, world, block)
    for stack in np.unique(stacks):
        mine, at = ranks[stacks == stack], indices[stacks == stack]
        blocks = (at - 1) // block
        first = mine[0]
        for k in np.unique(blocks):
            assert set(mine[blocks == k].tolist()) == {(first + k) % world}  # one rank per block, then the next


def test_owners_share_a_session_evenly() -> None:
    for count, per_stack in ((200, 50), (1500, 4)):  # large stacks; stacks smaller than a block (their paths decide)
        stacks, indices = _stacks(count, per_stack)
        shares = np.bincount(d.owners(stacks, indices, 3), minlength=3)
        third = len(indices) / 3
        assert np.abs(shares - third).max() <= 0.1 * third, (count, per_stack, shares)


@pytest.mark.parametrize(("world", "block"), [(0, 16), (-1, 16), (2, 0)])
def test_owners_refuse_an_impossible_world_or_block(world: int, block: int) -> None:
    with pytest.raises(ValueError, match="world and block must be at least 1"):
        d.owners(np.array(["a.mrcs"]), np.array([1]), world, block)


def test_reduce_accumulator_adds_the_other_ranks_grids_to_rank_zeros() -> None:
    n = 60
    results = d.launch(2, helpers.reduce_share, n)
    images, rotations, origins, halves, ctf = helpers.particles(n)
    one = HalfSetAccumulator(helpers.BOX, helpers.APIX)
    one.add(images, rotations, origins, halves, ctf)
    alone = HalfSetAccumulator(helpers.BOX, helpers.APIX)
    alone.add(images[::2], rotations[::2], origins[::2], halves[::2], ctf[::2])
    root = results[0]
    assert root["same"] and results[1]["same"]
    assert torch.equal(root["counts"], one.particle_counts)
    assert float((root["grids"] - one.grids).abs().max()) <= 1e-5 * float(one.grids.abs().max())
    assert float((root["grids"] - alone.grids).abs().max()) > 0.1 * float(one.grids.abs().max())  # rank 1's added


def test_reduce_accumulator_of_one_process_is_its_input() -> None:
    images, rotations, origins, halves, ctf = helpers.particles(8)
    acc = HalfSetAccumulator(helpers.BOX, helpers.APIX)
    acc.add(images, rotations, origins, halves, ctf)
    grids, counts = acc.grids.clone(), acc.particle_counts.clone()
    assert d.reduce_accumulator(acc, d.Ranks.single()) is acc
    assert torch.equal(acc.grids, grids) and torch.equal(acc.particle_counts, counts)

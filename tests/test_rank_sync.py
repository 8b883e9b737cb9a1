"""daemon.rank_sync: the meetings of a live session's ranks, over real 2-rank gloo groups started by
``engine.distributed.launch`` (no mocks; the workers are tests/distributed_helpers.py)."""

from __future__ import annotations

import distributed_helpers as helpers
import numpy as np
import pytest
import torch
from cryofastar.daemon.rank_sync import Command, Handover, RanksLost
from cryofastar.engine import distributed as d
from cryofastar.engine.streaming_refiner import RankPolicy
from cryofastar.recon import HalfSetAccumulator


def test_a_handover_counts_its_particles_and_adds_to_its_counters() -> None:
    handover = Handover()
    assert handover.particles == 0 and handover.counts == {} and handover.waiting == 0
    handover.chunks += [helpers.inserted_chunk(torch.arange(5), 8), helpers.inserted_chunk(torch.arange(5, 8), 8)]
    assert handover.particles == 8 and [len(chunk) for chunk in handover.chunks] == [5, 3]
    handover.count("particles_posed", 5)
    handover.count("particles_posed", 3)
    handover.count("particles_rejected", 0)
    assert handover.counts == {"particles_posed": 8, "particles_rejected": 0}
    assert Handover().counts == {} and Handover().chunks == []  # no state shared between handovers


def test_rank_zero_leads_syncs_and_takes_the_other_ranks_rows_and_grids() -> None:
    n = 40
    results = d.launch(2, helpers.sync_session, n)
    root, other = results[0], results[1]

    # collective 1: every command arrives whole, in order
    start, sent = other["commands"][0], helpers.start_command()
    assert [c.op for c in other["commands"]] == ["start", "sync", "sync", "stop"]
    assert start.policy == RankPolicy(True, "own", "coarse", 3) and start.geometry == sent.geometry
    assert start.frame == {"views": 16} and start.reference[1:] == sent.reference[1:]
    assert torch.equal(start.reference[0], sent.reference[0])
    assert start.journal.keys() == sent.journal.keys()
    assert all(np.array_equal(start.journal[k], sent.journal[k]) for k in sent.journal)
    assert other["commands"][1].policy == RankPolicy(False, "coarse", "coarse", 4)
    assert other["commands"][1].journal is None and other["commands"][2].policy == RankPolicy()

    # collective 2: rank 1's handover, as it sent it
    assert len(root["first"]) == 1
    got, odd = root["first"][0], torch.arange(1, n, 2)
    want = helpers.inserted_chunk(odd, n)
    assert got.particles == len(odd) and len(got.chunks) == 1 and got.waiting == 7
    assert got.counts == {"particles_ingested": len(odd), "particles_posed": len(odd)}
    assert got.rejections == [("/session/b.star", "box 32 px")]
    chunk = got.chunks[0]
    assert np.array_equal(chunk.stacks, want.stacks) and np.array_equal(chunk.indices, odd.numpy() + 1)
    assert np.array_equal(chunk.fingerprints, want.fingerprints) and chunk.origin == want.origin
    for name in ("half_sets", "rotations", "origins", "confidence"):
        assert torch.equal(getattr(chunk, name), getattr(want, name)), name
    assert torch.equal(chunk.ctf.defocus_u_angstrom, want.ctf.defocus_u_angstrom)
    assert chunk.optics == {"rlnVoltage": 300.0} and chunk.scores is None and chunk.version == 0

    # collective 3: rank 0's grids hold both ranks' particles; rank 1's are zeroed
    images, rotations, origins, halves, ctf = helpers.particles(n)
    every = HalfSetAccumulator(helpers.BOX, helpers.APIX)
    every.add(images, rotations, origins, halves, ctf)
    assert torch.equal(root["counts"], every.particle_counts)
    assert float((root["grids"] - every.grids).abs().max()) <= 1e-5 * float(every.grids.abs().max())
    assert other["zeroed"]

    # a sync without particles adds no grids (rank 1's hold some, unnamed by its handover: neither side reduces);
    # the stop needs no grids when nobody has particles
    assert root["unchanged"] and other["kept"]
    assert [(h.particles, h.waiting) for h in root["second"]] == [(0, 3)]
    assert [(h.particles, h.waiting, h.counts) for h in root["last"]] == [(0, 0, {})]


@pytest.mark.parametrize(("how", "torn"), [("leave", False), ("torn", True)])
def test_a_rank_that_leaves_during_a_sync_is_reported_to_rank_zero(how: str, torn: bool) -> None:
    """Rank 1 leaves the group (its entrypoint returns): rank 0's ``lead`` raises RanksLost at once, from the broken
    connection, not after the collective timeout; ``torn`` only when the grids were being added."""
    timeout = 30.0
    results = d.launch(2, helpers.lose_rank, how, timeout)
    assert results[1] == {"caught": None, "seconds": 0.0}
    caught = results[0]["caught"]
    assert caught is not None, "lead() returned although rank 1 was gone"
    assert caught[0] is torn
    assert caught[1].startswith("another rank stopped answering (")
    assert results[0]["seconds"] < timeout / 2


def test_a_rank_waiting_for_a_command_learns_that_rank_zero_is_gone() -> None:
    timeout = 30.0
    results = d.launch(2, helpers.lose_rank, "root", timeout)
    caught = results[1]["caught"]
    assert caught is not None and caught[0] is False and caught[1].startswith("another rank stopped answering (")
    assert results[1]["seconds"] < timeout / 2


def test_a_sync_command_defaults_to_the_initial_policy_and_sends_nothing_else() -> None:
    command = Command("sync")
    assert command.policy == RankPolicy(False, "own", "own", 0)
    assert (command.reference, command.frame, command.geometry, command.journal) == (None, None, None, None)
    assert RanksLost("gone").torn is False and RanksLost("gone", torn=True).torn is True


def test_particles_another_rank_classifies_reach_rank_zeros_classes_as_its_own() -> None:
    """Rank 0's 2D classes travel in a command; rank 1 aligns particles against them as a follower and hands over
    its rows, its class sums by the reduce: rank 0's classes become those of classifying every particle itself."""
    results = d.launch(2, helpers.classes_sync, 80, 40)
    root, other = results[0], results[1]
    assert root["taken"] == list(range(80, 120)) and root["indices"] == list(range(81, 121))
    assert root["num"] < 1e-9 and root["classes"]
    assert other["zeroed"]

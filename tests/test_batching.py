"""How the poser gathers chunks of particles into forward calls (daemon.batching), on real stacks."""

from __future__ import annotations

import pytest
import torch
from cryofastar.daemon.batching import PassGatherer, take_particles
from cryofastar.daemon.ingest import plan_particle_file
from cryofastar.daemon.journal import IngestJournal
from cryofastar.recon.io import ParticleChunk, write_stack


def _chunks(tmp_path, sizes: list[int]) -> list[ParticleChunk]:
    """One chunk per stack of ``sizes[i]`` random 16-px images, read back from disk."""
    out = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"s{i}.mrcs"
        write_stack(path, torch.randn(n, 16, 16, generator=torch.Generator().manual_seed(i)), 2.0)
        out.append(next(plan_particle_file(path, tmp_path, None, IngestJournal())[0].chunks()))
    return out


def test_chunks_split_and_batches_take_whole_passes(tmp_path):
    chunks = _chunks(tmp_path, [5, 4])
    head, rest = take_particles(chunks, 7)
    assert [len(c) for c in head] == [5, 2] and [len(c) for c in rest] == [2]
    assert rest[0].indices.tolist() == [3, 4] and torch.equal(rest[0].images, chunks[1].images[2:])
    assert take_particles(chunks, 9)[1] == [] and take_particles(chunks, 0)[0] == []


def test_full_calls_go_at_once_and_the_remainder_waits_for_more(tmp_path):
    gather = PassGatherer(flush_seconds=5.0)
    assert gather.next_call(unit=4, wanted=4, whole_calls=True, now=0.0) == [] and gather.timeout(0.0) is None
    for chunk in _chunks(tmp_path, [3, 7]):
        gather.add(chunk, now=0.0)
    assert gather.waiting == 10
    call = gather.next_call(unit=4, wanted=4, whole_calls=True, now=1.0)
    assert sum(len(c) for c in call) == 8 and gather.waiting == 2  # two whole calls; 2 particles wait
    gather.restart_clock(now=2.0)
    assert gather.next_call(unit=4, wanted=4, whole_calls=True, now=3.0) == []  # not enough, not due
    assert gather.timeout(now=3.0) == pytest.approx(4.0)  # flush 5 s after the call ended at 2.0
    assert not gather.due(now=6.9) and gather.due(now=7.0)
    last = gather.next_call(unit=4, wanted=4, whole_calls=True, now=7.0)  # due: a partial call
    assert [c.indices.tolist() for c in last] == [[6, 7]] and gather.waiting == 0
    gather.restart_clock(now=7.5)
    assert gather.timeout(now=8.0) is None and not gather.due(now=100.0)


def test_before_the_reference_everything_goes_once_enough_candidates_wait(tmp_path):
    gather = PassGatherer(flush_seconds=5.0)
    small, big = _chunks(tmp_path, [3, 6])
    gather.add(small, now=0.0)
    assert gather.next_call(unit=4, wanted=8, whole_calls=False, now=1.0) == []
    gather.add(big, now=1.0)
    call = gather.next_call(unit=4, wanted=8, whole_calls=False, now=1.0)
    assert sum(len(c) for c in call) == 9 and gather.waiting == 0  # not cut to whole calls


def test_stopping_flushes_what_waits(tmp_path):
    gather = PassGatherer(flush_seconds=5.0)
    gather.add(_chunks(tmp_path, [3])[0], now=0.0)
    assert gather.next_call(unit=4, wanted=4, whole_calls=True, now=0.1) == []
    assert sum(len(c) for c in gather.next_call(unit=4, wanted=4, whole_calls=True, flush=True, now=0.1)) == 3

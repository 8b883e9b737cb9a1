"""Half-set assignment (cryofastar.recon.half_sets) for stack names as os.listdir gives them."""

from __future__ import annotations

import os

import numpy as np
import torch
from cryofastar.recon.half_sets import half_sets_for_particles, half_sets_for_stack


def test_a_name_with_a_byte_that_is_not_utf8_hashes_its_bytes(tmp_path):
    """Issue 20: os.listdir gives byte 0xff as a lone surrogate; name.encode() raised UnicodeEncodeError."""
    raw = b"mic_\xff.mrcs"
    (tmp_path / os.fsdecode(raw)).write_bytes(b"x")
    [listed] = os.listdir(tmp_path)  # the name as the watcher sees it
    indices = torch.arange(1, 201)
    halves = half_sets_for_stack(str(tmp_path / listed), indices)
    assert set(halves.tolist()) == {1, 2} and 60 < int((halves == 1).sum()) < 140
    torch.testing.assert_close(halves, half_sets_for_stack(listed, indices), rtol=0, atol=0)  # the name only
    # the same bytes read as Latin-1 are another name, and a valid UTF-8 name hashes as before
    assert not torch.equal(halves, half_sets_for_stack(raw.decode("latin-1"), indices))
    assert half_sets_for_stack("mic_é.mrcs", indices).tolist() == half_sets_for_stack(
        os.fsdecode("mic_é.mrcs".encode()), indices).tolist()
    stacks = np.array([listed, "other.mrcs", listed])
    assert half_sets_for_particles(stacks, np.array([1, 1, 2])).tolist() == [halves[0], *half_sets_for_stack(
        "other.mrcs", torch.tensor([1])).tolist(), halves[1]]

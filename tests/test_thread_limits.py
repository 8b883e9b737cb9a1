"""daemon.thread_limits: a limit on torch's threads that holds for the calling thread only."""

from __future__ import annotations

import threading

import pytest
import torch
from cryofastar.daemon.thread_limits import limit_this_thread


def test_the_limit_holds_in_its_thread_and_nowhere_else() -> None:
    before = torch.get_num_threads()
    seen: dict[str, object] = {}

    def lane() -> None:
        seen["set"] = limit_this_thread(1)
        seen["threads"] = torch.get_num_threads()
        seen["fft"] = torch.fft.fft2(torch.ones(4, 32, 32)).abs().sum().item()  # MKL runs under the limit

    worker = threading.Thread(target=lane)
    worker.start()
    worker.join()
    if not seen["set"]:
        pytest.skip("this torch build has no per-thread limit (the daemon then runs without one)")
    assert seen["threads"] == 1
    assert seen["fft"] == pytest.approx(4 * 32 * 32)
    assert torch.get_num_threads() == before  # the caller's threads are untouched


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        limit_this_thread(0)

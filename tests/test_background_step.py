"""One computation at a time beside the owner's thread (engine.background_step), with real threads."""

from __future__ import annotations

import threading

import pytest
from cryofastar.engine.background_step import BackgroundStep


def test_the_result_is_taken_by_the_owner_once_done_and_the_step_is_free_again() -> None:
    step: BackgroundStep[int] = BackgroundStep("test")
    gate = threading.Event()
    step.start("sum", lambda: gate.wait(10) and sum(range(10)))
    assert step.busy and step.label == "sum" and not step.done()
    with pytest.raises(RuntimeError, match="still running"):
        step.start("other", lambda: 0)  # one at a time
    with pytest.raises(RuntimeError, match="nothing finished"):
        step.take()
    gate.set()
    assert step.wait(10) and step.done()
    assert step.take() == 45 and not step.busy
    step.start("next", lambda: 1)
    assert step.wait(10) and step.take() == 1


def test_what_the_computation_raised_is_raised_to_the_owner() -> None:
    step: BackgroundStep[None] = BackgroundStep("test")

    def fail() -> None:
        raise ValueError("no particles")

    step.start("failing", fail)
    assert step.wait(10)
    with pytest.raises(ValueError, match="no particles"):
        step.take()
    assert not step.busy


def test_a_computation_asked_to_stop_ends_at_its_next_check_and_its_outcome_is_dropped() -> None:
    step: BackgroundStep[int] = BackgroundStep("test")
    passes = []

    def long_run() -> int:
        while True:  # a long computation that checks between its steps
            step.check()
            passes.append(1)
            threading.Event().wait(0.01)

    step.start("long", long_run)
    assert step.cancel(timeout=10) and not step.busy and passes
    assert step.cancel(timeout=1)  # nothing running: nothing to stop
    step.start("next", lambda: 2)  # free again, and the new one is not cancelled
    assert step.wait(10) and step.take() == 2


def test_a_computation_that_does_not_check_in_time_is_reported() -> None:
    step: BackgroundStep[None] = BackgroundStep("test")
    gate = threading.Event()
    step.start("deaf", lambda: gate.wait(10) and None)
    assert not step.cancel(timeout=0.1) and step.busy
    gate.set()
    assert step.wait(10)

"""When the accumulator publishes the map and checkpoints (daemon.schedule), on explicit clocks."""

from __future__ import annotations

from cryofastar.daemon.schedule import OutputSchedule


def _schedule(**kw) -> OutputSchedule:
    return OutputSchedule(**{"publish_seconds": 10.0, "publish_particles": 100, "checkpoint_seconds": 60.0,
                             "particles_in_map": 0, "now": 0.0, **kw})


def test_the_first_map_goes_out_at_once_then_by_time_or_particles():
    s = _schedule()
    assert not s.map_due(0, 0, first=True, wants_reference=False, now=0.0)  # nothing in the map
    assert s.map_due(20, 20, first=True, wants_reference=False, now=1.0)
    s.map_published(20, 20, now=1.0)
    assert not s.changed(20) and not s.map_due(20, 20, first=False, wants_reference=True, now=99.0)  # unchanged
    assert not s.map_due(60, 60, first=False, wants_reference=False, now=5.0)
    assert s.map_due(60, 60, first=False, wants_reference=False, now=11.0)  # 10 s since the last map
    assert s.map_due(120, 120, first=False, wants_reference=False, now=2.0)  # 100 particles since it
    assert s.map_due(21, 21, first=False, wants_reference=True, now=2.0)  # refinement asks for a reference


def test_re_posed_particles_change_the_map_without_new_particles():
    s = _schedule()
    s.map_published(50, 50, now=0.0)
    assert s.changed(51) and s.map_due(50, 51, first=False, wants_reference=False, now=10.0)


def test_the_map_clock_starts_with_the_first_particles_not_at_start_up():
    s = _schedule(publish_particles=10**6)
    s.particles_arrived(has_map=False, now=50.0)
    assert not s.map_due(5, 5, first=False, wants_reference=False, now=55.0)
    assert s.map_due(5, 5, first=False, wants_reference=False, now=60.0)
    resumed = _schedule(particles_in_map=30, publish_particles=10**6)  # a resumed session keeps its clock
    resumed.particles_arrived(has_map=False, now=50.0)
    assert resumed.map_due(31, 1, first=False, wants_reference=False, now=50.0)


def test_checkpoints_every_period():
    s = _schedule()
    assert not s.checkpoint_due(59.9) and s.checkpoint_due(60.0)
    s.checkpoint_written(61.0)
    assert not s.checkpoint_due(120.0) and s.checkpoint_due(121.0)

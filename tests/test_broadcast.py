"""The session's ZeroMQ messages (daemon.broadcast) over a real PUB/SUB pair on 127.0.0.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryofastar.daemon.broadcast import HISTORY_ROWS, SessionBroadcast, particle_id
from cryofastar.daemon.publisher import Publisher
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import PosesMessage, StatusMessage, VolumeMessage
from cryofastar.recon.euler import euler_to_matrix
from test_publisher import ANY_PORT, is_ping, receive_matching, wait_connected


def test_particle_ids_name_stacks_relative_to_the_watched_directory(tmp_path):
    watch = tmp_path / "watch"
    inside = str((watch / "grid1" / "a.mrcs").resolve())
    assert particle_id(watch, inside, 7) == "000007@grid1/a.mrcs"
    assert particle_id(watch, "/elsewhere/b.mrcs", 12) == "000012@/elsewhere/b.mrcs"


def test_poses_go_out_as_relion_angles_with_particle_ids(tmp_path):
    watch = tmp_path / "watch"
    angles = torch.tensor([[10.0, 20.0, 30.0], [-120.0, 75.0, 5.0]], dtype=torch.float64)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    origins = torch.tensor([[1.5, -2.0], [0.0, 3.25]], dtype=torch.float64)
    stacks = np.array([str((watch / "a.mrcs").resolve())] * 2, dtype=object)
    with Publisher(ANY_PORT, republish_seconds=None) as publisher, Subscriber(publisher.address) as subscriber:
        broadcast = SessionBroadcast(publisher, watch)
        assert broadcast.address == publisher.address
        wait_connected(publisher, subscriber)
        broadcast.poses(stacks, np.array([3, 4]), torch.tensor([1, 2]), rotations, origins,
                        torch.tensor([0.9, 0.25]), batch=6)
        message = receive_matching(subscriber, lambda m: not is_ping(m))
    assert isinstance(message, PosesMessage) and message.batch == 6 and message.half_sets == [1, 2]
    assert message.particle_ids == ["000003@a.mrcs", "000004@a.mrcs"]
    np.testing.assert_allclose(message.poses[:, :3], angles.numpy(), atol=1e-3)
    np.testing.assert_allclose(message.poses[:, 3:5], origins.numpy())
    np.testing.assert_allclose(message.poses[:, 5], [0.9, 0.25])


@pytest.mark.parametrize("resolution", [6.5, math.inf])
def test_a_map_goes_out_with_its_fsc_shells_and_recent_history(tmp_path, resolution):
    box, apix = 12, 2.0
    volume = torch.randn(box, box, box, generator=torch.Generator().manual_seed(0))
    fsc = torch.linspace(1.0, 0.0, box // 2 + 1)
    history = [(1700000000.0 + i, 10 * i, 20.0 - 0.01 * i) for i in range(HISTORY_ROWS + 5)]
    with Publisher(ANY_PORT, republish_seconds=None) as publisher, Subscriber(publisher.address) as subscriber:
        wait_connected(publisher, subscriber)
        SessionBroadcast(publisher, tmp_path).volume(volume, apix, 1234, resolution, fsc, history)
        message = receive_matching(subscriber, lambda m: not is_ping(m))
    assert isinstance(message, VolumeMessage) and message.particles == 1234 and message.apix == apix
    assert message.resolution_angstrom == (None if resolution == math.inf else resolution)
    np.testing.assert_array_equal(message.volume, volume.numpy())
    np.testing.assert_allclose(message.fsc, fsc.numpy())
    np.testing.assert_allclose(message.fsc_resolution_angstrom[1:], box * apix / np.arange(1, box // 2 + 1), rtol=1e-6)
    assert message.history.shape == (HISTORY_ROWS, 3) and message.history[0, 1] == 50  # the last rows only


def test_status_goes_out_until_the_broadcast_is_closed(tmp_path):
    publisher = Publisher(ANY_PORT, republish_seconds=None)
    broadcast = SessionBroadcast(publisher, tmp_path)
    with Subscriber(publisher.address, topics=("status",)) as subscriber:
        wait_connected(publisher, subscriber)
        broadcast.status({"particles_in_map": 5})
        message = receive_matching(subscriber, lambda m: not is_ping(m))
        assert isinstance(message, StatusMessage) and message.status == {"particles_in_map": 5}
        broadcast.close()
        assert broadcast.closed
        sent = publisher.sent["status"]
        broadcast.status({"particles_in_map": 6})  # after close: nothing, and no error
        assert publisher.sent["status"] == sent and subscriber.receive(0.3) is None

"""Where a session's poses come from (daemon.pose_source); the settings object is never rewritten."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cryofastar.daemon.pipeline import Daemon
from cryofastar.daemon.pose_source import load_network
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.model import weights


def _settings(tmp_path, **kw) -> DaemonSettings:
    (tmp_path / "watch").mkdir(exist_ok=True)
    return DaemonSettings(watch=tmp_path / "watch", out=tmp_path / "out", metrics_port=None, **kw)


def test_map_only_loads_no_network(tmp_path):
    assert load_network(_settings(tmp_path, poses_from="map-only"), torch.device("cpu")) == (None, "map-only")


def test_the_shipped_weights_pose_network_sessions(tmp_path):
    model, source = load_network(_settings(tmp_path), torch.device("cpu"))
    assert source == "network" and model is not None and model.config.box > 0


def test_weights_the_user_named_must_load(tmp_path):
    with pytest.raises(ValueError, match="weights file not found"):
        load_network(_settings(tmp_path, weights=tmp_path / "none.safetensors"), torch.device("cpu"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_network(_settings(tmp_path, weights=tmp_path / "junk.safetensors"), torch.device("cpu"))


def test_unloadable_shipped_weights_fall_back_to_map_only_without_touching_the_settings(tmp_path, monkeypatch,
                                                                                       caplog):
    broken = tmp_path / "cryofastar-small.safetensors"
    broken.write_bytes(b"a truncated download")
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS", broken)  # the shipped file, as a broken install leaves it
    settings = _settings(tmp_path)
    given = dataclasses.asdict(settings)
    assert load_network(settings, torch.device("cpu")) == (None, "map-only")
    assert "poses come from the map only" in caplog.text
    daemon = Daemon(settings)
    assert daemon.poses_from == "map-only" and daemon.status()["pose_source"] == "map-only"
    assert daemon.refiner.poses_from == "map-only"  # refinement works from the map alone
    assert daemon.status()["model"] is None and daemon.status()["model_box"] is None
    assert settings.poses_from == "network" and dataclasses.asdict(settings) == given  # as the user gave them

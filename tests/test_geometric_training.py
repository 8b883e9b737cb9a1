"""model.geometric_training: a short CPU run leaves loadable weights and a log, as a cut-short GPU run would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cryofastar.engine.class_posing import ClassPoser
from cryofastar.model.geometric_training import GeometricTrainSettings, train_decoder
from cryofastar.model.geometric_weights import GeometricConfig, build_decoder, load_decoder, save_decoder
from cryofastar.model.weights import DEFAULT_WEIGHTS, WeightsError

SMALL = GeometricConfig(n_rays=48, n_radii=12, width=16, depth=1, features=8, anchors=3)


def test_a_short_run_writes_weights_and_a_log_every_period(tmp_path):
    settings = GeometricTrainSettings(budget_minutes=0.3, log_seconds=5, views=5, sets=2, bank_size=2,
                                      validation_molecules=1, refresh_every=2)
    result = train_decoder(tmp_path, settings, SMALL)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(records) >= 2 and records[-1]["final"] and not records[0]["final"]
    assert records[-1]["step"] == result.steps > 0 and result.views_seen == result.steps * 10
    assert all(np.isfinite(r["loss"]) and 0 <= r["val_lines_found_snr1"] <= 1 for r in records)
    for path in (result.latest, result.best):
        assert path.stat().st_size < 16 * 2**20
        decoder, config = load_decoder(path)
        assert config == SMALL and not decoder.training
    poser = ClassPoser.load(result.latest)  # the offline job and the daemon load it the same way
    assert poser.config == SMALL


def test_weights_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    decoder = build_decoder(SMALL)
    save_decoder(decoder, SMALL, tmp_path / "w.safetensors", {"training": {"step": 3}})
    loaded, config = load_decoder(tmp_path / "w.safetensors")
    assert config == SMALL
    for name, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    with pytest.raises(WeightsError, match="not geometric decoder weights"):
        load_decoder(DEFAULT_WEIGHTS)  # the ViT network's
    with pytest.raises(WeightsError, match="not found"):
        load_decoder(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_decoder(tmp_path / "junk.safetensors")
    save_decoder(build_decoder(GeometricConfig(n_rays=48, n_radii=12, width=8, depth=1, features=8)), SMALL,
                 tmp_path / "mismatch.safetensors")
    with pytest.raises(WeightsError, match="do not fit"):
        load_decoder(tmp_path / "mismatch.safetensors")

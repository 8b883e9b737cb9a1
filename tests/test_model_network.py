"""The network, weights files, reference selection, the session frame and training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cryofastar.model import blocks
from cryofastar.model.curriculum import Stage
from cryofastar.model.fpm import fourier_planar_map, mirror_fpm, origins_to_tau, relative_rotations
from cryofastar.model.network import CryoFastAR, ModelConfig
from cryofastar.model.reference import select_reference
from cryofastar.model.session_frame import SessionFrame
from cryofastar.model.train import TrainSettings, train
from cryofastar.model.weights import WeightsError, load_model, read_metadata, save_weights, warm_start
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from safetensors.torch import save_file

TINY = ModelConfig(box=32, n_lines=8, n_radii=4, bands=2, dim=32, heads=2, enc_depth=1, dec_depth=1)


def test_forward_shapes_and_positive_confidence():
    model = CryoFastAR(TINY).eval()
    with torch.no_grad():
        fpm, conf = model(torch.randn(2, 5, 32, 32))
    assert fpm.shape == (2, 5, 8, 4, 3)
    assert conf.shape == (2, 5, 8, 4)
    assert bool((conf > 1).all())


def test_bad_inputs_are_refused():
    model = CryoFastAR(TINY)
    with pytest.raises(ValueError, match="at least one other view"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="box"):
        model(torch.randn(1, 3, 64, 64))


def test_attention_cost_is_linear_in_the_number_of_views(monkeypatch):
    """Count query-key products of every attention call: no N x N attention across views."""
    model = CryoFastAR(TINY).eval()
    products: list[int] = []
    key_lengths: list[int] = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        products.append(q.shape[0] * q.shape[2] * k.shape[2])
        key_lengths.append(k.shape[2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", counting)
    totals = {}
    for views in (4, 8, 16, 32):
        products.clear()
        key_lengths.clear()
        with torch.no_grad():
            model(torch.randn(1, views, 32, 32))
        totals[views] = sum(products)
        tokens = TINY.tokens_per_view
        # only the reference attends to other views (View Integration); others see T tokens or the reference
        assert max(key_lengths) == (views - 1) * tokens
    increments = [totals[8] - totals[4], totals[16] - totals[8], totals[32] - totals[16]]
    assert increments[1] == 2 * increments[0] and increments[2] == 2 * increments[1]  # linear, not quadratic


def test_views_after_the_anchors_are_permutation_equivariant():
    torch.manual_seed(0)
    model = CryoFastAR(TINY).eval()
    assert TINY.anchor_views == 2
    images = torch.randn(1, 7, 32, 32)
    order = torch.tensor([0, 1, 2, 5, 3, 6, 4])  # reference and anchors stay in place
    with torch.no_grad():
        fpm, conf = model(images)
        fpm_p, conf_p = model(images[:, order])
    assert torch.allclose(fpm[:, order], fpm_p, atol=1e-5)
    assert torch.allclose(conf[:, order], conf_p, atol=1e-4)


def test_anchor_correlation_matches_views_and_leaves_self_and_missing_anchors_empty():
    torch.manual_seed(1)
    model = CryoFastAR(TINY)
    rays = model.rays(torch.randn(4, 32, 32)).unflatten(0, (1, 4))  # (S=1, W=4, 2, L, R)
    rays[:, 3] = rays[:, 0]  # view 3 is a copy of anchor 1
    t = TINY.tokens_per_view
    features = model.anchor_correlation(rays).view(4, t, 2, 3, TINY.n_lines)  # view, token, anchor, channel, offset
    assert bool((features[0, :, 0] == 0).all()) and bool((features[1, :, 1] == 0).all())  # self: nothing
    assert torch.allclose(features[3, :, 0, 0, 0], torch.ones(t), atol=1e-5)  # complex match at offset 0
    assert torch.allclose(features[3, :, 0], model.correlation(rays[:, 3:], rays[:, 0]).view(t, 3, TINY.n_lines),
                          atol=1e-6)  # batched alike to rounding (bitwise depends on the CPU's kernels)
    short = model.anchor_correlation(rays[:, :1]).view(1, t, 2, 3, TINY.n_lines)
    assert bool((short[:, :, 1] == 0).all())  # a set with one non-reference view has no second anchor


def test_configs_written_before_anchors_load_without_them():
    legacy = {k: v for k, v in TINY.to_dict().items() if k != "anchor_views"}
    assert ModelConfig.from_dict(legacy).anchor_views == 0
    assert ModelConfig().anchor_views == 2
    assert not hasattr(CryoFastAR(ModelConfig.from_dict(legacy)), "anchor_embed")


def test_warm_start_copies_matching_tensors_and_starts_unchanged(tmp_path):
    torch.manual_seed(2)
    legacy = CryoFastAR(replace(TINY, anchor_views=0)).eval()
    path = tmp_path / "legacy.safetensors"
    save_weights(legacy, path)
    grown = CryoFastAR(TINY).eval()
    assert warm_start(grown, path) == ["anchor_embed.bias", "anchor_embed.weight"]
    images = torch.randn(1, 5, 32, 32)
    with torch.no_grad():
        assert torch.allclose(legacy(images)[0], grown(images)[0], atol=1e-6)
    other = tmp_path / "other.safetensors"
    save_file({"unrelated.weight": torch.zeros(3)}, str(other), metadata={"config": "{}"})
    with pytest.raises(WeightsError, match="no tensor fits"):
        warm_start(grown, other)
    with pytest.raises(WeightsError, match="not found"):
        warm_start(grown, tmp_path / "missing.safetensors")


def test_weights_round_trip_and_errors(tmp_path):
    model = CryoFastAR(TINY)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, {"training": {"step": 3}})
    loaded = load_model(path)
    assert loaded.config == TINY
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert read_metadata(path)["training"] == {"step": 3}
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")


def test_shipped_weights_load_by_default():
    model = load_model()
    assert model.config.box == 64
    assert "training" in read_metadata(Path(__file__).parents[1] / "model" / "weights" / "cryofastar-small.safetensors")


def test_select_reference_scores_every_candidate():
    torch.manual_seed(1)
    model = CryoFastAR(TINY).eval()
    index, scores = select_reference(model, torch.randn(10, 32, 32), context=4, sets_per_pass=3)
    assert scores.shape == (10,)
    assert 0 <= index < 10 and int(scores.argmax()) == index
    with pytest.raises(ValueError):
        select_reference(model, torch.randn(1, 32, 32))


class ExactFpmNetwork(CryoFastAR):
    """The real network class with its forward replaced by the exact FPM of known poses.

    Each test image carries its particle id in pixel [0, 0]; every set comes out in a
    random hand, as a trained network may do. This isolates the session-frame logic
    (reference in every pass, anchors fixing the hand) from the network's accuracy.
    """

    def __init__(self, rotations: torch.Tensor, origins_px: torch.Tensor, seed: int):
        super().__init__(TINY)
        self.true_rotations, self.true_origins = rotations, origins_px
        self.hands = torch.Generator().manual_seed(seed)

    def forward(self, images):
        ids = images[:, :, 0, 0].round().long()
        rotations, origins = self.true_rotations[ids], self.true_origins[ids]
        fpm = fourier_planar_map(relative_rotations(rotations), origins_to_tau(origins, 32),
                                 self.planar_coordinates.double()).float()
        flip = torch.rand(fpm.shape[0], generator=self.hands) < 0.5
        fpm = torch.where(flip[:, None, None, None, None], mirror_fpm(fpm), fpm)
        return fpm, torch.full(fpm.shape[:-1], 2.0)


def test_session_frame_puts_thousands_of_particles_in_one_frame_and_hand():
    n = 3000
    g = torch.Generator().manual_seed(2)
    rotations = random_rotations(n + 1, g)
    origins = (torch.rand(n + 1, 2, generator=g, dtype=torch.float64) - 0.5) * 6
    images = torch.zeros(n + 1, 32, 32)
    images[:, 0, 0] = torch.arange(n + 1).float()
    net = ExactFpmNetwork(rotations, origins, seed=3)
    frame = SessionFrame(net, images[0], views=128, anchors=8)
    poses = []
    for chunk in images[1:].split(700):  # several calls, as a stream would make them
        poses.append(frame.pose(chunk))
    got = torch.cat([p.rotations for p in poses])
    mirrored = torch.cat([p.mirrored for p in poses])
    assert len(mirrored) >= n // 119 and bool(mirrored.any()) and not bool(mirrored.all())
    # one frame: every pose equals the true one up to ONE global rotation (the reference's) ...
    j = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    expected = rotations[1:] @ rotations[0].T
    direct = geodesic_degrees(got, expected)
    flipped = geodesic_degrees(got, j @ expected @ j)
    # ... and one hand for the whole session
    assert float(torch.minimum(direct.max(), flipped.max())) < 1e-3
    assert torch.allclose(torch.cat([p.origins_px for p in poses]), origins[1:], atol=1e-6)
    # the frame can be saved and continued
    again = SessionFrame.from_state_dict(net, frame.state_dict())
    more = again.pose(images[1:200])
    hand = direct.max() < 1e-3
    check = geodesic_degrees(more.rotations, expected[:199] if hand else j @ expected[:199] @ j)
    assert float(check.max()) < 1e-3


def test_train_smoke_checkpoints_and_resumes(tmp_path):
    stages = (Stage("a", "inplane", views=3, min_steps=1, max_steps=2, gate_degrees=0.0),
              Stage("b", "full", views=4, snr_min=1.0, snr_max=10.0, ctf_probability=1.0, max_shift_px=2.0))
    settings = TrainSettings(steps=3, images_per_step=8, bank_size=2, val_every=2, val_sets=2, checkpoint_every=2,
                             warmup_steps=1, model=dict(TINY.to_dict(), box=32), real_fraction=0.0)
    out = tmp_path / "run"
    train(out, settings, torch.device("cpu"), curriculum=stages, progress=False)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"start", "val", "stage"}
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    assert load_model(out / "latest.safetensors").config.box == 32
    with pytest.raises(FileExistsError):
        train(out, settings, torch.device("cpu"), curriculum=stages, progress=False)
    settings.steps = 5
    train(out, settings, torch.device("cpu"), curriculum=stages, resume=True, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and state["stage_index"] == 1


def test_train_starts_at_a_named_stage_from_warm_weights(tmp_path):
    stages = (Stage("a", "inplane", views=3), Stage("b", "cone", views=4, max_shift_px=1.0))
    settings = TrainSettings(steps=2, images_per_step=8, bank_size=2, val_every=2, val_sets=2, checkpoint_every=2,
                             warmup_steps=1, model=TINY.to_dict(), real_fraction=0.0)
    init = tmp_path / "init.safetensors"  # written before configs had anchor_views, like the first shipped weights
    legacy_config = {k: v for k, v in TINY.to_dict().items() if k != "anchor_views"}
    legacy = CryoFastAR(ModelConfig.from_dict(legacy_config))
    save_file(legacy.state_dict(), str(init), metadata={"config": json.dumps(legacy_config)})
    with pytest.raises(ValueError, match="start-stage must be one of a, b"):
        train(tmp_path / "bad", settings, torch.device("cpu"), curriculum=stages, start_stage="c", progress=False)
    out = tmp_path / "run"
    train(out, settings, torch.device("cpu"), curriculum=stages, init_weights=init, start_stage="b", progress=False)
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert start["stage"] == "b" and start["not_warm_started"] == ["anchor_embed.bias", "anchor_embed.weight"]
    assert load_model(out / "latest.safetensors").config.anchor_views == 2


def test_rope_inverse_and_cyclic_relative_offsets():
    from cryofastar.model.rope import RotaryEmbedding2D

    period = 12
    angle = torch.arange(period // 2).repeat_interleave(2)
    band = torch.arange(2).repeat(period // 2)
    rope = RotaryEmbedding2D(16, angle, band, period=period)
    x = torch.randn(3, len(angle), 16)
    assert torch.allclose(rope(rope(x), inverse=True), x, atol=1e-5)
    # a value rotated by its key's angle and brought back by the query's angle is rotated
    # by the angular offset only; a full turn of offset (period) is no rotation at all
    shifted = RotaryEmbedding2D(16, angle + period, band, period=period)
    assert torch.allclose(shifted(x), rope(x), atol=1e-4)
    half_turn = RotaryEmbedding2D(16, angle + period // 2, band, period=period)
    assert not torch.allclose(half_turn(x), rope(x), atol=1e-2)

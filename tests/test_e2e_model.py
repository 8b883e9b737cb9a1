"""End to end through the real console script: ab initio reconstruct, evaluate, train."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import starfile
import torch
from cryofastar.model.geometric_weights import load_decoder
from cryofastar.model.weights import load_model
from cryofastar.recon.io import read_volume
from session_helpers import run_cli as run


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("session")
    run("simulate", "--out", str(out), "--n", "400", "--box", "80", "--apix", "2.0", "--snr", "1", "--ctf",
        "--per-stack", "150", "--seed", "1000000007")
    return out


@pytest.mark.slow
def test_reconstruct_writes_poses_and_maps_that_evaluate_reads(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "recon"
    result = run("reconstruct", str(session / "particles.star"), "-o", str(out), "--views", "64", "--no-progress",
                 "--reference", str(session / "reference.mrc"), "--refine-rounds", "2")  # what is written, not how well
    assert "400 particles posed" in result.stdout
    star = starfile.read(out / "particles.star")
    particles = star["particles"]
    assert len(particles) == 400
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                   "rlnCryofastarConfidence", "rlnDefocusU"):
        assert column in particles.columns
    assert bool((particles["rlnCryofastarConfidence"] > 1).all())
    assert float(star["optics"]["rlnImagePixelSize"].iloc[0]) == pytest.approx(2.0)
    volume, apix = read_volume(out / "volume.mrc")
    assert volume.shape == (80, 80, 80) and apix == pytest.approx(2.0)  # the input's box, not the model's
    for name in ("volume_half1.mrc", "volume_half2.mrc", "volume_fsc.tsv"):
        assert (out / name).is_file()
    report = run("evaluate", str(out / "particles.star"), str(session / "particles.star"), "--json",
                 str(tmp_path / "eval.json"))
    assert "matched 400 particles" in report.stdout
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["n_matched"] == 400 and figures["predicted"]["n_particles"] == 400
    assert 0 <= figures["predicted"]["geodesic_median_degrees"] <= 180
    assert figures["chance"]["geodesic_median_degrees"] > 90  # chance level, measured the same way
    assert "random poses" in report.stdout
    # refinement (the default) kept the network's own poses beside the refined ones; evaluate reports both
    assert "refined in" in result.stdout
    for column in ("rlnCryofastarNetworkAngleRot", "rlnCryofastarNetworkOriginYAngst", "rlnCryofastarRefineScore",
                   "rlnCryofastarAngularSpread"):
        assert column in particles.columns
    assert "network (before refinement)" in report.stdout
    assert figures["network"]["n_particles"] == 400


@pytest.mark.slow
def test_reconstruct_refuses_bad_weights_and_views(session: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    bad = run("reconstruct", str(session / "particles.star"), "-o", str(tmp_path / "r"), "--weights", str(junk),
              ok=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "safetensors" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    views = run("reconstruct", str(session / "particles.star"), "-o", str(tmp_path / "r"), "--views", "2", ok=False)
    assert views.returncode == 2 and "--views" in views.stderr
    assert not (tmp_path / "r" / "volume.mrc").exists()


@pytest.mark.slow
def test_train_command_leaves_weights_within_its_budget(tmp_path: Path) -> None:
    """The geometric decoder's trainer, as a GPU run would be started, on the CPU with a 30-second budget."""
    out = tmp_path / "run"
    started = time.monotonic()
    done = run("train", "--out", str(out), "--budget-min", "0.5", "--log-seconds", "10", "--views", "5", "--sets",
               "2", "--bank-size", "2", "--procedural-only", "--device", "cpu")
    assert time.monotonic() - started < 120
    assert "common lines found at SNR 1" in done.stdout and "best.safetensors" in done.stdout
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) >= 3 and records[-1]["final"]
    decoder, config = load_decoder(out / "latest.safetensors")
    assert config.box == 64 and (out / "latest.safetensors").stat().st_size < 16 * 2**20


@pytest.mark.slow
def test_train_vit_command_checkpoints_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train-vit", "--out", str(out), "--steps", "2", "--images-per-step", "8", "--bank-size", "2",
            "--procedural-only", "--no-progress")
    first = run(*args)
    assert "validation: median" in first.stdout
    assert load_model(out / "best.safetensors").config.box == 64
    again = run(*args, ok=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run(*args[:3], "--steps", "3", *args[5:], "--resume")
    assert "validation" in resumed.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3


@pytest.mark.slow
def test_reconstruct_map_only_poses_from_ab_initio(tmp_path: Path) -> None:
    # held-out asymmetric molecule (bench/bench_ab_initio.py SEEDS); measured median errors 3.9-10.8° on the three
    # seeds there (chance ~125°), so 20° fails only if ab initio + local rounds no longer find the structure
    session = tmp_path / "session"
    run("simulate", "--out", str(session), "--n", "400", "--box", "48", "--apix", "3", "--snr", "1", "--no-ctf",
        "--per-stack", "200", "--seed", "1000000005")
    out = tmp_path / "recon"
    result = run("reconstruct", str(session / "particles.star"), "-o", str(out), "--poses-from", "map-only",
                 "--refine-rounds", "2", "--no-progress")
    assert "(ab-initio, local, local)" in result.stdout and "ab initio took" in result.stdout
    verdict = json.loads((out / "ab_initio.json").read_text())  # the verdict and its evidence
    assert verdict["converged"] and verdict["agreement_degrees"] <= 15 and verdict["attempts"][0]["restarts"] >= 2
    assert "ab initio converged: 2 of" in result.stdout and f"wrote {out / 'ab_initio.json'}" in result.stdout
    particles = starfile.read(out / "particles.star")["particles"]
    # the verdict's second part: the final poses' precision, from the spreads written beside them
    precision = verdict["pose_precision"]
    assert precision["particles"] == 400
    assert precision["median_spread_degrees"] == pytest.approx(particles["rlnCryofastarAngularSpread"].median(),
                                                               rel=1e-5)
    assert precision["estimated_median_error_degrees"] == pytest.approx(0.888 * precision["median_spread_degrees"],
                                                                        rel=1e-3)
    assert ("poses precise" if precision["precise"] else "poses NOT precise") in result.stdout
    assert "rlnCryofastarNetworkAngleRot" not in particles.columns  # no network
    assert particles["rlnCryofastarRefineScore"].notna().all() and particles["rlnCryofastarAngularSpread"].notna().all()
    run("evaluate", str(out / "particles.star"), str(session / "particles.star"), "--json", str(tmp_path / "e.json"))
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["n_matched"] == 400
    assert figures["predicted"]["geodesic_median_degrees"] < 20
    assert figures["chance"]["geodesic_median_degrees"] > 90

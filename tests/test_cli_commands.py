"""The commands in-process (typer's CliRunner on the real app), beside the subprocess tests.

Cheap runs only: a tiny simulate -> backproject -> evaluate -> reconstruct chain, one bad value per
command (rejected by its settings dataclass or its library function before anything
heavy starts: one ``error:`` line, exit status 2), help texts and defaults taken from
the dataclasses, and the ``--watch DIR`` alias.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryofastar.daemon.settings import DaemonSettings
from typer.testing import CliRunner

from cryofastar.cli import _watch_alias, app

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def invoke(*args: str):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, list(args), env=WIDE)


def test_simulate_backproject_evaluate_in_process(tmp_path: Path) -> None:
    sim = invoke("simulate", "--out", str(tmp_path / "s"), "--n", "40", "--box", "16", "--apix", "4",
                 "--no-noise", "--per-stack", "20", "--seed", "1")
    assert sim.exit_code == 0, sim.output
    star = tmp_path / "s" / "particles.star"
    assert sim.stdout == f"wrote 40 particles to {star} (true map: {tmp_path / 's' / 'reference.mrc'})\n"
    assert len(list((tmp_path / "s").glob("*.mrcs"))) == 2

    bp = invoke("backproject", str(star), "-o", str(tmp_path / "map.mrc"), "--half-maps", "--interpolation",
                "nearest", "--reference", str(tmp_path / "s" / "reference.mrc"))
    assert bp.exit_code == 0, bp.output
    lines = bp.stdout.splitlines()
    assert lines[0].startswith("40 particles (half sets 20/20)") and "half-map FSC 0.143 resolution" in lines[0]
    assert lines[1].startswith(f"FSC 0.5 resolution against {tmp_path / 's' / 'reference.mrc'}: ")
    assert lines[2:] == [f"wrote {tmp_path / name}" for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc",
                                                                   "map_fsc.tsv")]

    ev = invoke("evaluate", str(star), str(star), "--json", str(tmp_path / "acc.json"))
    assert ev.exit_code == 0, ev.output
    assert ev.stdout.startswith("matched 40 particles by image (stack file and index) (0 only in particles.star, "
                                "0 only in particles.star)")
    assert ev.stdout.endswith(f"wrote {tmp_path / 'acc.json'}\n")
    figures = json.loads((tmp_path / "acc.json").read_text())
    assert figures["n_matched"] == 40 and figures["predicted"]["geodesic_median_degrees"] < 1e-3

    rec = invoke("reconstruct", str(star), "-o", str(tmp_path / "r"), "--no-refine", "--views", "16",
                 "--no-progress", "--device", "cpu", "--no-ctf")
    assert rec.exit_code == 0, rec.output
    lines = rec.stdout.splitlines()
    assert lines[0].startswith("40 particles posed in ") and "passes mirrored" in lines[0]
    assert lines[1:] == [f"wrote {tmp_path / 'r' / name}" for name in (
        "particles.star", "volume.mrc", "volume_half1.mrc", "volume_half2.mrc", "volume_fsc.tsv")]


@pytest.mark.parametrize(("args", "message"), [
    (["simulate", "--out", "X", "--box", "33"], "--box must be an even number of pixels >= 16, got 33"),
    (["backproject", "X/p.star", "-o", "X/m.mrc", "--interpolation", "cubic"],
     "--interpolation must be trilinear or nearest, got 'cubic'"),
    (["evaluate", "X/none.star", "X/none.star"], "not found"),
    (["train-vit", "--out", "X/run", "--size", "huge"], "--size must be one of small, base, got 'huge'"),
    (["train-vit", "--out", "X/run", "--images-per-step", "2"], "--images-per-step >= 3"),
    (["train", "--out", "X/run", "--budget-min", "0"], "--budget-min must be positive, got 0.0"),
    (["train", "--out", "X/run", "--snr-min", "5", "--snr-max", "1"], "need 0 < --snr-min <= --snr-max"),
    (["reconstruct", "X/p.star", "-o", "X/run", "--views", "2"], "--views must be at least 3, got 2"),
    (["reconstruct", "X/p.star", "-o", "X/run", "--poses-from", "map-only", "--no-refine"], "needs refinement"),
    (["reconstruct", "X/none.star", "-o", "X/run"], "X/none.star"),
    (["reconstruct", "X/p.star", "-o", "X/run", "--poses-from", "classes", "--classes", "1"],
     "--classes must be at least 2, got 1"),
    (["reconstruct", "X/p.star", "-o", "X/run", "--poses-from", "classes", "--class-weights", "X/none.safetensors"],
     "--class-weights X/none.safetensors: no such weights file"),
    (["reconstruct", "X/p.star", "-o", "X/run", "--poses-from", "magic"], "--poses-from must be network, map-only or "
     "classes, got 'magic'"),
    (["watch", "X/missing"], "--watch X/missing: not an existing directory"),
    (["watch", "X", "--idle-exit", "0"], "--idle-exit must be positive, got 0.0"),
    (["watch", "X", "--refine-box", "8"], "--refine-box must be 16..512 px, got 8"),
    (["watch", "X", "--poses-from", "classes", "--no-classify"], "--poses-from classes needs the 2D lane (its class "
     "averages are the views): drop --no-classify"),
    (["watch", "X", "--poses-from", "classes", "--class-weights", "X/none.safetensors"],
     "--class-weights X/none.safetensors: no such weights file"),
    (["subscribe", "tcp://127.0.0.1:1", "--count", "0"], "--count must be at least 1, got 0"),
    (["dashboard", "--connect", "nowhere"], "--connect 'nowhere': expected a ZeroMQ address"),
    (["dashboard", "--port", "70000"], "--port must be 0..65535, got 70000"),
    (["demo", "--polish", "-1"], "--polish must be >= 0 seconds, got -1.0"),
])
def test_a_bad_value_is_one_error_line_and_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("X", str(tmp_path)) for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.replace("X", str(tmp_path)) in lines[0]
    assert not (tmp_path / "run").exists()


def test_watch_help_shows_the_daemon_settings_defaults_and_help() -> None:
    result = invoke("watch", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.replace("│", " ").split())
    defaults = DaemonSettings(watch=Path("."))
    shown = 0
    for f in dataclasses.fields(DaemonSettings):
        spec = f.metadata.get("cli")
        if spec is None:
            assert f"--{f.name.replace('_', '-')}" not in text, f.name  # e.g. queue_size, probe_every
            continue
        assert spec.help in text, f.name
        value = getattr(defaults, f.name)
        if f.name not in ("watch", "out") and value is not None and not isinstance(value, bool):
            assert f"[default: {value}]" in text, f.name
        shown += 1
    assert shown == 26  # --nproc included
    assert "--classify --no-classify" in text and "--classes <int> Number of 2D classes. [default: 50]" in text
    assert "--publish-every <float> Write and publish the map at least this often, in seconds... [default: 10.0]" \
        in text
    assert "--refine --no-refine" in text and "--idle-exit" in text and "--dashboard-port" in text and "--nproc" in text


def test_watch_alias_and_root_options() -> None:
    assert _watch_alias(["--watch", "d", "--poll", "5"]) == ["watch", "d", "--poll", "5"]
    assert _watch_alias(["-v", "--watch=d"]) == ["-v", "watch", "d"]
    assert _watch_alias(["simulate", "--watch", "d"]) == ["simulate", "--watch", "d"]
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("cryofastar-stream ")
    listing = invoke("--help").stdout
    names = ["simulate", "backproject", "evaluate", "train", "train-vit", "reconstruct", "watch", "subscribe",
             "dashboard", "demo"]
    positions = [listing.index(f" {name} ") for name in names]
    assert positions == sorted(positions)

"""The real ``cryofastar-stream`` console script on bad input: one ``error:`` line, exit 2, no traceback.

Each case runs the installed entry point as a subprocess. The bad-input runs are
independent, so they are started together (one module-scoped fixture) and each
test checks its own result; the happy path (simulate, then backproject with
half maps) runs on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile


def _console_script() -> str:
    beside = Path(sys.executable).parent / "cryofastar-stream"
    if beside.is_file():
        return str(beside)
    found = shutil.which("cryofastar-stream")
    if found is None:
        pytest.skip("cryofastar-stream console script is not installed")
    return found


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
TIMEOUT = 120


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_console_script(), *args], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=TIMEOUT)


# --------------------------------------------------------------------------- fixtures on disk

BOX = 16


def _write_stack(path: Path, n: int = 5, box: int = BOX, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).standard_normal((n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 1.5


def make_set(directory: Path, *, drop: tuple[str, ...] = (), box_b: int = BOX) -> Path:
    """A RELION 3.1 set: 2 stacks of 5 images + particles.star (optionally missing columns)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_stack(directory / "stack_a.mrcs", seed=0)
    _write_stack(directory / "stack_b.mrcs", box=box_b, seed=1)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [1.5],
        "rlnImageSize": [BOX], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
    })
    rows = [
        {"rlnImageName": f"{i:06d}@{stack}", "rlnAngleRot": 10.0 * k, "rlnAngleTilt": 5.0 * k,
         "rlnAnglePsi": 0.0, "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0, "rlnOpticsGroup": 1}
        for k, (stack, i) in enumerate((s, i) for s in ("stack_a.mrcs", "stack_b.mrcs") for i in range(1, 6))
    ]
    particles = pd.DataFrame(rows).drop(columns=list(drop))
    star = directory / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    return star


def _missing_columns(d: Path) -> list[str]:
    return ["backproject", str(make_set(d, drop=("rlnAngleTilt",))), "-o", str(d / "map.mrc")]


def _missing_stack(d: Path) -> list[str]:
    star = make_set(d)
    (d / "stack_b.mrcs").unlink()
    return ["backproject", str(star), "-o", str(d / "map.mrc")]


def _mismatched_boxes(d: Path) -> list[str]:
    return ["backproject", str(make_set(d, box_b=20)), "-o", str(d / "map.mrc")]


def _non_mrc_stack(d: Path) -> list[str]:
    star = make_set(d)
    (d / "stack_a.mrcs").write_text("definitely not an MRC stack\n" * 50)
    return ["backproject", str(star), "-o", str(d / "map.mrc")]


def _nan_pixels(d: Path) -> list[str]:
    star = make_set(d)
    with mrcfile.open(d / "stack_b.mrcs", mode="r+") as mrc:
        mrc.data[2, 3, 4] = np.nan
    return ["backproject", str(star), "-o", str(d / "map.mrc")]


def _lying_header(d: Path, fields: dict[int, int], size: int | None = None) -> Path:
    """A set whose stack_b.mrcs header has int32 words (byte offset -> value) overwritten; ``size``: sparse length."""
    star = make_set(d)
    raw = bytearray((d / "stack_b.mrcs").read_bytes())
    for offset, value in fields.items():
        raw[offset:offset + 4] = np.int32(value).tobytes()
    (d / "stack_b.mrcs").write_bytes(bytes(raw))
    if size is not None:
        os.truncate(d / "stack_b.mrcs", size)
    return star


def _negative_nz(d: Path) -> list[str]:  # issue 20: OverflowError from mmap, a traceback
    return ["backproject", str(_lying_header(d, {8: -5})), "-o", str(d / "map.mrc")]


def _huge_box(d: Path) -> list[str]:  # issue 20: a sparse 128 GiB stack, "Unable to allocate 128 GiB"
    return ["backproject", str(_lying_header(d, {0: 65536, 4: 65536, 8: 8}, 1024 + 65536**2 * 32)), "-o",
            str(d / "map.mrc")]


def _reconstruct_negative_nz(d: Path) -> list[str]:
    return ["reconstruct", str(_lying_header(d, {8: -5})), "--out", str(d / "job")]


def _nonexistent_star(d: Path) -> list[str]:
    d.mkdir(parents=True)
    return ["backproject", str(d / "no_such.star"), "-o", str(d / "map.mrc")]


def _bad_interpolation(d: Path) -> list[str]:
    return ["backproject", str(make_set(d)), "-o", str(d / "map.mrc"), "--interpolation", "cubic"]


def _odd_box(d: Path) -> list[str]:
    return ["simulate", "--out", str(d / "sim"), "--n", "4", "--box", "33", "--apix", "2", "--no-noise"]


def _negative_apix(d: Path) -> list[str]:
    return ["simulate", "--out", str(d / "sim"), "--n", "4", "--box", "32", "--apix", "-3", "--no-noise"]


def _non_integer_n(d: Path) -> list[str]:
    return ["simulate", "--out", str(d / "sim"), "--n", "many", "--box", "32", "--no-noise"]


@dataclass(frozen=True)
class Case:
    build: object  # (directory) -> argv
    keyword: str  # must appear in the error line
    writes_nothing: str | None = None  # a path (relative to the case dir) that must not exist afterwards


CASES: dict[str, Case] = {
    "star-missing-columns": Case(_missing_columns, "rlnAngleTilt", "map.mrc"),
    "missing-stack": Case(_missing_stack, "stack_b.mrcs", "map.mrc"),
    "mismatched-boxes": Case(_mismatched_boxes, "box", "map.mrc"),
    "non-mrc-stack": Case(_non_mrc_stack, "MRC", "map.mrc"),
    "nonexistent-star": Case(_nonexistent_star, "not found", "map.mrc"),
    "negative-nz": Case(_negative_nz, "stack_b.mrcs: not a readable MRC file (header dimensions", "map.mrc"),
    "huge-box": Case(_huge_box, "header claims 65536 x 65536 px images", "map.mrc"),
    "reconstruct-negative-nz": Case(_reconstruct_negative_nz, "not all positive", "job/particles.star"),
    "bad-interpolation": Case(_bad_interpolation, "--interpolation", "map.mrc"),
    "simulate-odd-box": Case(_odd_box, "--box", "sim/particles.star"),
    "simulate-negative-apix": Case(_negative_apix, "--apix", "sim/particles.star"),
}
# typer/click usage errors (a value of the wrong type, a missing option) are not routed through
# the one-line error handler; see test_usage_error_is_one_error_line.
USAGE_CASES: dict[str, Case] = {"simulate-non-integer-n": Case(_non_integer_n, "--n")}
# not errors: an image with NaN pixels is left out with one warning line naming it (run in the same pool)
SKIP_CASES: dict[str, Case] = {"nan-pixels": Case(_nan_pixels, "000003@stack_b.mrcs")}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Build every bad-input case, run them (one per CPU at a time), return ``{case: (result, case_dir)}``.

    Each run is dominated by the interpreter importing torch, so running them side by side
    keeps this module's runtime near that of the happy path.
    """
    root = tmp_path_factory.mktemp("cli_errors")
    jobs = {}
    for name, case in {**CASES, **USAGE_CASES, **SKIP_CASES}.items():
        directory = root / name
        argv = case.build(directory)
        directory.mkdir(exist_ok=True)
        jobs[name] = (argv, directory)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, argv, directory) for name, (argv, directory) in jobs.items()}
        return {name: (future.result(), jobs[name][1]) for name, future in futures.items()}


def assert_one_error_line(result: subprocess.CompletedProcess[str], keyword: str) -> None:
    context = f"argv={result.args}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == 2, context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, context
    assert lines[0].startswith("error:"), context
    assert keyword in lines[0], context


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line_and_status_2(error_runs, name: str) -> None:
    result, directory = error_runs[name]
    assert_one_error_line(result, CASES[name].keyword)
    assert "Traceback" not in result.stdout
    if CASES[name].writes_nothing:
        assert not (directory / CASES[name].writes_nothing).exists()


@pytest.mark.parametrize("name", list(USAGE_CASES))
def test_usage_error_is_one_error_line(error_runs, name: str) -> None:
    result, _ = error_runs[name]
    assert "Traceback" not in result.stderr and result.returncode == 2  # holds today
    assert_one_error_line(result, USAGE_CASES[name].keyword)


def test_nan_image_is_skipped_with_one_warning_naming_it(error_runs) -> None:
    result, directory = error_runs["nan-pixels"]
    context = f"stdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert result.returncode == 0 and "Traceback" not in result.stderr, context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "WARNING" in lines[0], context
    assert "1 image(s) contain NaN or Inf pixels and were skipped (000003@stack_b.mrcs)" in lines[0], context
    assert result.stdout.startswith("9 particles"), context  # 10 in the STAR file, the NaN one left out
    with mrcfile.open(directory / "map.mrc") as mrc:
        assert np.isfinite(mrc.data).all() and float(np.abs(mrc.data).max()) > 0


@pytest.mark.slow
def test_simulate_then_backproject_with_half_maps(tmp_path: Path) -> None:
    out = tmp_path / "session"
    sim = run_cli(["simulate", "--out", str(out), "--n", "40", "--box", "32", "--apix", "3",
                   "--no-noise", "--per-stack", "20", "--seed", "1"], cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    assert "Traceback" not in sim.stderr
    star = out / "particles.star"
    assert star.is_file()
    assert len(list(out.glob("*.mrcs"))) == 2  # 40 particles, 20 per stack

    work = tmp_path / "elsewhere"  # run from another directory: stacks resolve beside the STAR file
    work.mkdir()
    rec = run_cli(["backproject", str(star), "-o", str(out / "map.mrc"), "--half-maps"], cwd=work)
    assert rec.returncode == 0, rec.stderr
    assert "Traceback" not in rec.stderr
    assert "resolution" in rec.stdout
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        path = out / name
        assert path.is_file(), name
        assert f"wrote {path}" in rec.stdout
        with mrcfile.open(path) as mrc:
            assert mrc.data.shape == (32, 32, 32)
            assert mrc.data.dtype == np.float32
            assert np.isfinite(mrc.data).all()
            assert float(np.abs(mrc.data).max()) > 0
            for axis in ("x", "y", "z"):
                assert float(getattr(mrc.voxel_size, axis)) == pytest.approx(3.0, rel=1e-5)
    assert not list(out.glob(".*.tmp"))

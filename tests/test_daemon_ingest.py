"""The daemon's ingestion journal, file checks and session state (real files on disk)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cryofastar.daemon.ingest import NotParticles, Rejected, SessionGeometry, plan_particle_file
from cryofastar.daemon.journal import IngestJournal
from cryofastar.daemon.state import SessionState
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import read_particles, write_stack, write_volume
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.rotations import random_rotations


def _stack(path, n=5, box=16, apix=2.0, seed=0):
    images = torch.randn(n, box, box, generator=torch.Generator().manual_seed(seed))
    write_stack(path, images, apix)
    return images


def test_journal_records_membership_per_stack_and_round_trips():
    journal = IngestJournal()
    journal.add("a.mrcs", np.array([1, 3, 5]))
    journal.add("b.mrcs", np.array([2]))
    journal.add("a.mrcs", np.array([3]))  # twice is harmless
    assert len(journal) == 4 and journal.count("a.mrcs") == 3
    assert journal.contains("a.mrcs", np.array([1, 2, 3, 9])).tolist() == [True, False, True, False]
    assert journal.contains("c.mrcs", np.array([1])).tolist() == [False]
    copy = IngestJournal.from_state_dict(journal.state_dict())
    assert copy.contains("b.mrcs", np.array([1, 2])).tolist() == [False, True]
    copy.remove("a.mrcs", np.array([1]))
    assert journal.count("a.mrcs") == 3 and copy.count("a.mrcs") == 2
    with pytest.raises(ValueError, match="1-based"):
        journal.add("a.mrcs", np.array([0]))
    # one stack per particle, as chunks carry them: grouped per stack
    stacks = np.array(["c.mrcs", "d.mrcs", "c.mrcs"])
    journal.add(stacks, np.array([4, 1, 2]))
    assert journal.contains(stacks, np.array([4, 1, 3])).tolist() == [True, True, False]
    journal.remove(stacks[:1], np.array([4]))
    assert journal.count("c.mrcs") == 1 and journal.count("d.mrcs") == 1
    with pytest.raises(ValueError, match="2 stacks for 3 indices"):
        journal.contains(stacks[:2], np.array([1, 2, 3]))


def test_a_stack_brings_every_image_once(tmp_path):
    images = _stack(tmp_path / "s.mrcs")
    taken = IngestJournal()
    plan, geometry = plan_particle_file(tmp_path / "s.mrcs", tmp_path, None, taken)
    assert geometry == SessionGeometry(16, 2.0)
    chunks = list(plan.chunks(2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c.images for c in chunks]), images)
    assert np.concatenate([c.indices for c in chunks]).tolist() == [1, 2, 3, 4, 5]
    for c in chunks:
        taken.add(str(c.stacks[0]), c.indices)
    again, _ = plan_particle_file(tmp_path / "s.mrcs", tmp_path, geometry, taken)
    assert len(again) == 0


def test_a_star_naming_stacks_already_taken_adds_only_new_rows_with_ctf(tmp_path):
    _stack(tmp_path / "s.mrcs", n=4)
    rows = pd.DataFrame({"rlnImageName": [f"{i:06d}@s.mrcs" for i in (1, 2, 3, 4)],
                         "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
                         "rlnDefocusU": 12000.0, "rlnDefocusV": 11000.0, "rlnDefocusAngle": 10.0,
                         "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0], "rlnImageSize": [16],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_particles(tmp_path / "p.star", rows, optics)
    taken = IngestJournal()
    taken.add(str((tmp_path / "s.mrcs").resolve()), np.array([1, 2]))
    plan, _ = plan_particle_file(tmp_path / "p.star", tmp_path, SessionGeometry(16, 2.0), taken)
    assert plan.indices.tolist() == [3, 4]
    chunk = next(plan.chunks())
    assert chunk.ctf is not None and torch.allclose(chunk.ctf.defocus_u_angstrom, torch.full((2,), 12000.0).double())
    assert chunk.optics["rlnVoltage"] == 300.0


@pytest.mark.parametrize("case", ["truncated", "volume", "box", "apix", "outside", "missing", "text"])
def test_bad_files_are_rejected_with_one_clear_line(tmp_path, case):
    watched = tmp_path / "watched"
    watched.mkdir()
    geometry = SessionGeometry(16, 2.0)
    expected = {"truncated": "not a readable MRC", "volume": "3D map", "box": "box 32 px differs",
                "apix": "pixel size 2.5000 Å differs", "outside": "outside the watched directory",
                "missing": "missing stack", "text": "not a (readable )?STAR file"}[case]
    if case == "truncated":
        _stack(watched / "t.mrcs", n=8)
        data = (watched / "t.mrcs").read_bytes()
        (watched / "t.mrcs").write_bytes(data[: len(data) - 700])
        path = watched / "t.mrcs"
    elif case == "volume":
        write_volume(watched / "map.mrc", torch.zeros(16, 16, 16), 2.0)
        path = watched / "map.mrc"
    elif case in ("box", "apix"):
        _stack(watched / "x.mrcs", box=32 if case == "box" else 16, apix=2.0 if case == "box" else 2.5)
        path = watched / "x.mrcs"
    else:
        if case == "outside":
            _stack(tmp_path / "elsewhere.mrcs", n=2)
            name = "../elsewhere.mrcs"
        else:
            name = "gone.mrcs"
        rows = pd.DataFrame({"rlnImageName": [f"000001@{name}"], "rlnAngleRot": [0.0], "rlnAngleTilt": [0.0],
                             "rlnAnglePsi": [0.0]})
        path = watched / "p.star"
        if case == "text":
            path.write_text("this is not a star file\n\x00\x01")
        else:
            write_particles(path, rows, pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0]}))
    with pytest.raises(Rejected, match=expected) as info:
        plan_particle_file(path, watched, geometry, IngestJournal())
    assert "\n" not in str(info.value)
    assert isinstance(info.value, NotParticles) == (case == "volume")  # a map is skipped, not an error


def test_non_finite_images_are_dropped_and_counted(tmp_path):
    images = torch.randn(4, 16, 16)
    images[1, 3, 3] = float("nan")
    images[2, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):  # mrcfile warns when it writes non-finite data
        write_stack(tmp_path / "n.mrcs", images, 2.0)
    plan, _ = plan_particle_file(tmp_path / "n.mrcs", tmp_path, None, IngestJournal())
    chunk = next(plan.chunks())
    assert chunk.indices.tolist() == [1, 4] and chunk.rows.tolist() == [0, 3]
    assert chunk.skipped.rows.tolist() == [1, 2] and chunk.skipped.reason == "NaN or Inf pixels"
    assert [name.split("@")[0] for name in chunk.skipped.names] == ["000002", "000003"]
    assert bool(torch.isfinite(chunk.images).all())


def test_session_state_checkpoint_round_trip_and_particles_star(tmp_path):
    _stack(tmp_path / "s.mrcs", n=6)
    plan, geometry = plan_particle_file(tmp_path / "s.mrcs", tmp_path, None, IngestJournal())
    chunk = next(plan.chunks())
    state = SessionState(geometry=geometry, accumulator=HalfSetAccumulator(16, 2.0, interpolation="nearest"))
    rotations = random_rotations(6, torch.Generator().manual_seed(0))
    origins = torch.randn(6, 2, dtype=torch.float64)
    state.accumulator.add(chunk.images, rotations, origins, chunk.half_sets)
    state.journal.add(str(chunk.stacks[0]), chunk.indices)
    state.poses.append(chunk.stacks, chunk.indices, rotations, origins, torch.ones(6) * 1.5, chunk.half_sets, None)
    out = tmp_path / "out"
    out.mkdir()
    state.save(out / "checkpoint.pt")
    state.write_particles(out)
    volume, curve, resolution, halves = state.write_maps(out)
    assert halves.shape == (2, 16, 16, 16)
    loaded = SessionState.load(out / "checkpoint.pt")
    assert loaded.n_particles == 6 and len(loaded.journal) == 6 and len(loaded.poses) == 6
    assert torch.equal(loaded.accumulator.grids, state.accumulator.grids)
    table = read_particles(out / "particles.star")
    assert len(table) == 6 and table.apix == 2.0 and table.box == 16  # image names resolve from --out
    assert torch.allclose(table.rotations(), rotations, atol=1e-6)
    assert torch.allclose(table.origins_angstrom(), origins, atol=1e-5)
    assert table.half_sets().tolist() == chunk.half_sets.tolist()
    assert (out / "volume_half1.mrc").exists() and (out / "fsc_history.tsv").read_text().count("\n") == 2
    (out / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable session checkpoint"):
        SessionState.load(out / "bad.pt")


# ------------------------------------------------------------- issue 20: one file must not kill the session

BAD_NAMES = {"tab": b"a\tb.mrcs", "newline": b"a\nb.mrcs", "byte-ff": b"a\xffb.mrcs", "quote": b"it's.mrcs",
             "hash": b"a#b.mrcs", "colon": b"10:30.mrcs"}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_stack_whose_name_the_outputs_cannot_hold_is_rejected_before_it_is_read(tmp_path, case):
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    path = watched / "sub" / os.fsdecode(BAD_NAMES[case])  # the name as os.listdir / the watcher give it
    _stack(path)
    expected = r"sub/.*: its name has .*; rename it \(docs/conventions.md, File names\)"
    with pytest.raises(Rejected, match=expected) as info:
        plan_particle_file(path, watched, None, IngestJournal())
    message = str(info.value)
    assert "\n" not in message and "\t" not in message and message.encode("utf-8")
    # a STAR naming that stack is rejected too, naming the stack (written by hand: no STAR writer can write
    # a tab or a newline, and the starfile package reads a quote as ")
    if case in ("hash", "colon"):
        star = watched / "p.star"
        write_particles(star, pd.DataFrame({"rlnImageName": [f"000001@sub/{path.name}"], "rlnOpticsGroup": [1]}),
                        pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0]}))
        with pytest.raises(Rejected, match=r"p\.star: stack 'sub/.*' has .*, which RELION reads as image-name syntax"):
            plan_particle_file(star, watched, None, IngestJournal())


@pytest.mark.parametrize(("fields", "size"), [({8: -5}, None), ({0: 65536, 4: 65536, 8: 8}, 1024 + 65536**2 * 32)],
                         ids=["negative-nz", "huge-box-sparse"])
def test_a_stack_whose_header_lies_is_rejected_and_fixes_no_geometry(tmp_path, fields, size):
    """Issue 20: OverflowError escaped from mmap; a sparse 128 GiB file made the reader allocate 128 GiB."""
    path = tmp_path / "lies.mrcs"
    _stack(path)
    raw = bytearray(path.read_bytes())
    for offset, value in fields.items():
        raw[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))
    if size is not None:
        os.truncate(path, size)  # sparse: as long as the header says, no disk used
    with pytest.raises(Rejected, match=r"lies\.mrcs: not a readable MRC file \((header dimensions|header claims)"):
        plan_particle_file(path, tmp_path, None, IngestJournal())
    _stack(tmp_path / "good.mrcs")
    _, geometry = plan_particle_file(tmp_path / "good.mrcs", tmp_path, None, IngestJournal())
    assert geometry == SessionGeometry(16, 2.0)


def test_a_first_stack_of_a_box_no_session_map_may_have_is_rejected_and_fixes_no_geometry(tmp_path):
    """A valid 1,040-px stack as the session's first file would make the map 1040³ voxels per grid."""
    _stack(tmp_path / "big.mrcs", n=1, box=1040)
    with pytest.raises(Rejected, match=r"big\.mrcs: box 1040 px is larger than a session map may be \(1024 px"):
        plan_particle_file(tmp_path / "big.mrcs", tmp_path, None, IngestJournal())
    _stack(tmp_path / "good.mrcs")
    _, geometry = plan_particle_file(tmp_path / "good.mrcs", tmp_path, None, IngestJournal())
    assert geometry == SessionGeometry(16, 2.0)


# ------------------------------------------------------------- issue 20: exactly once, and nothing outside


def _star(path, names, apix=2.0):
    rows = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})
    write_particles(path, rows, pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [apix]}))
    return path


def test_a_star_naming_one_image_ten_times_brings_it_once_and_reports_the_rest(tmp_path):
    _stack(tmp_path / "s.mrcs", n=3)
    star = _star(tmp_path / "p.star", ["000001@s.mrcs"] * 10 + ["000002@s.mrcs", "3@s.mrcs", "2@./s.mrcs"])
    plan, _ = plan_particle_file(star, tmp_path, None, IngestJournal())
    assert plan.indices.tolist() == [1, 2, 3]
    chunk = next(plan.chunks())
    assert len(chunk) == 3 and len(chunk.skipped) == 10
    assert chunk.skipped.describe(star).startswith(f"{star}: 10 image(s) repeat an earlier row's image (same stack "
                                                   "and index) and were skipped (000001@s.mrcs, ")


@pytest.fixture
def opened():
    """Every path opened through Python's ``open`` / ``os.open`` while a test runs (a real audit hook)."""
    import sys

    seen: list[str] = []
    active = [True]

    def hook(event, args):  # noqa: ANN001, ANN202
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed; this one goes quiet after the test
    yield seen
    active[0] = False


@pytest.mark.parametrize("case", ["absolute", "star-symlink", "bare-symlink", "dotdot"])
def test_a_stack_outside_the_watched_directory_is_refused_before_it_is_opened(tmp_path, case, opened):
    """Issue 20: a STAR naming /etc/passwd, or a stack that is a symlink out of the tree, was opened (its header read)
    before the daemon's inside check; a bare stack that is a symlink leading out was taken."""
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    _stack(outside / "secret.mrcs", n=2)
    _stack(watched / "good.mrcs", n=2)
    target = outside / "secret.mrcs"
    if case == "absolute":
        target = tmp_path / "passwd"  # as /etc/passwd, but one the test owns
        target.write_text("root:x:0:0:root:/root:/bin/bash\n" * 40)
        path = _star(watched / "p.star", [f"000001@{target}"])
    elif case == "dotdot":
        path = _star(watched / "p.star", ["000001@good.mrcs", "000001@../outside/secret.mrcs"])
    else:
        (watched / "link.mrcs").symlink_to(target)
        path = watched / "link.mrcs" if case == "bare-symlink" else \
            _star(watched / "p.star", ["000001@good.mrcs", "000001@link.mrcs"])
    opened.clear()
    with pytest.raises(Rejected, match=rf"{target.name}.*outside the watched directory") as info:
        plan_particle_file(path, watched, None, IngestJournal())
    assert "\n" not in str(info.value)
    assert not [p for p in opened if Path(p).resolve() == target.resolve()], opened
    # /etc/passwd itself, by its absolute name
    star = _star(watched / "etc.star", ["000001@/etc/passwd"])
    opened.clear()
    with pytest.raises(Rejected, match=r"names stack /etc/passwd outside the watched directory"):
        plan_particle_file(star, watched, None, IngestJournal())
    assert "/etc/passwd" not in opened
    # a symlink inside the tree to a stack inside the tree is fine (the same particles as the stack, once)
    (watched / "alias.mrcs").symlink_to(watched / "good.mrcs")
    plan, _ = plan_particle_file(_star(watched / "q.star", ["000001@alias.mrcs", "000001@good.mrcs"]), watched, None,
                                 IngestJournal())
    assert len(plan) == 1 and len(plan.left_out) == 1


def test_a_bare_stack_of_absurd_pixels_brings_no_particle(tmp_path):
    images = torch.randn(4, 16, 16) * 1e20
    with pytest.warns(RuntimeWarning):  # mrcfile's header statistics overflow float32
        write_stack(tmp_path / "x.mrcs", images, 2.0)
    plan, _ = plan_particle_file(tmp_path / "x.mrcs", tmp_path, None, IngestJournal())
    chunk = next(plan.chunks())
    assert len(chunk) == 0 and len(chunk.skipped) == 4 and "beyond ±1e+06" in chunk.skipped.describe("x")

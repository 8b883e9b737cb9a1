"""ParticleSource, the one particle-reading layer, on real MRC stacks and STAR files written to disk."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from cryofastar.recon.io import (
    NotAParticleStack,
    ParticleFileError,
    ParticleSource,
    image_keys,
    read_particles,
    write_particles,
    write_stack,
    write_volume,
)
from cryofastar.recon.io import source as source_module
from cryofastar.recon.simulate import CtfRange, write_session

BOX, APIX = 16, 1.5


def _images(n: int, seed: int) -> torch.Tensor:
    """`(n, BOX, BOX)` noise; image k (0-based) offset by 100 k so it is recognisable."""
    images = torch.randn(n, BOX, BOX, generator=torch.Generator().manual_seed(seed))
    return images + 100.0 * torch.arange(n, dtype=torch.float32)[:, None, None]


def _two_stack_set(directory: Path, bad: dict[int, float] | None = None) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Stacks a (5 images) and b (4 images) + a STAR naming b's images then a's, with CTF columns.

    ``bad`` maps an image of stack b (0-based) to a non-finite value written into it.
    """
    a, b = _images(5, 0), _images(4, 1)
    for k, value in (bad or {}).items():
        b[k, 2, 3] = value
    write_stack(directory / "a.mrcs", a, APIX)
    if bad:
        with pytest.warns(RuntimeWarning):  # mrcfile warns when it writes non-finite data
            write_stack(directory / "b.mrcs", b, APIX)
    else:
        write_stack(directory / "b.mrcs", b, APIX)
    names = [f"{i:06d}@b.mrcs" for i in range(1, 5)] + [f"{i:06d}@a.mrcs" for i in range(1, 6)]
    rows = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": np.arange(9) * 10.0, "rlnAngleTilt": 20.0,
                         "rlnAnglePsi": 0.0, "rlnDefocusU": 10000.0 + np.arange(9), "rlnDefocusV": 9000.0,
                         "rlnDefocusAngle": 5.0, "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_particles(directory / "particles.star", rows, optics)
    return directory / "particles.star", a, b


def test_a_star_source_holds_its_particles_and_reads_no_pixels_until_asked(tmp_path):
    star, a, b = _two_stack_set(tmp_path)
    source = ParticleSource.from_star(star)
    assert (len(source), source.box, source.apix, source.origin) == (9, BOX, APIX, star)
    assert source.indices.tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 5]
    resolved = {name: str((tmp_path / name).resolve()) for name in ("a.mrcs", "b.mrcs")}
    assert source.stacks.tolist() == [resolved["b.mrcs"]] * 4 + [resolved["a.mrcs"]] * 5
    assert source.names[0] == "000001@b.mrcs" and source.names[-1] == "000005@a.mrcs"
    assert source.optics == {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    assert source.ctf is not None and source.ctf.defocus_u_angstrom.tolist() == [10000.0 + k for k in range(9)]
    assert torch.equal(source.half_sets, read_particles(star).half_sets())
    # the pixels on disk change after the source was made: a read sees the new ones (nothing was read before)
    with mrcfile.open(tmp_path / "a.mrcs", mode="r+") as mrc:
        mrc.data[:] = 7.0
    chunk = source.images(np.array([4, 0]))
    assert torch.equal(chunk.images[0], torch.full((BOX, BOX), 7.0)) and torch.equal(chunk.images[1], b[0])
    assert chunk.rows.tolist() == [4, 0] and chunk.indices.tolist() == [1, 1] and len(chunk.skipped) == 0
    assert chunk.ctf is not None and chunk.ctf.defocus_u_angstrom.tolist() == [10004.0, 10000.0]
    (tmp_path / "b.mrcs").unlink()  # a stack gone by the time it is read: one clear error
    with pytest.raises(ParticleFileError, match="b.mrcs: file not found"):
        source.images(np.array([1]))


def test_one_read_per_stack_in_the_order_asked(tmp_path, monkeypatch):
    star, a, b = _two_stack_set(tmp_path)
    source = ParticleSource.from_star(star)
    calls = []
    real = source_module.read_images

    def counting(path, indices):  # noqa: ANN001, ANN202 - the real reader, counted
        calls.append((Path(path).name, np.asarray(indices).tolist()))
        return real(path, indices)

    monkeypatch.setattr(source_module, "read_images", counting)
    rows = np.array([8, 0, 5, 3, 4, 1])  # a5, b1, a2, b4, a1, b2: interleaved stacks
    images = source.images(rows).all_images()
    assert sorted(calls) == [("a.mrcs", [5, 2, 1]), ("b.mrcs", [1, 4, 2])]
    assert torch.equal(images, torch.stack([a[4], b[0], a[1], b[3], a[0], b[1]]))


def test_chunks_read_every_image_a_bounded_number_at_a_time(tmp_path):
    star, a, b = _two_stack_set(tmp_path)
    source = ParticleSource.from_star(star)
    chunks = list(source.chunks(4))
    assert [len(c) for c in chunks] == [4, 4, 1]
    assert np.concatenate([c.rows for c in chunks]).tolist() == list(range(9))
    assert torch.equal(torch.cat([c.images for c in chunks]), torch.cat([b, a]))
    assert torch.equal(torch.cat([c.half_sets for c in chunks]), source.half_sets)
    first, rest = chunks[0].split(3)
    assert (len(first), len(rest), rest.rows.tolist(), rest.indices.tolist()) == (3, 1, [3], [4])
    with pytest.raises(ValueError, match="at least 1"):
        next(source.chunks(0))


def test_a_nan_or_inf_image_is_left_out_and_reported(tmp_path, caplog):
    star, a, b = _two_stack_set(tmp_path, bad={1: float("nan"), 3: float("-inf")})
    source = ParticleSource.from_star(star)
    chunk = source.images(np.array([5, 1, 2, 3]))
    assert chunk.rows.tolist() == [5, 2] and torch.equal(chunk.images, torch.stack([a[1], b[2]]))
    assert chunk.indices.tolist() == [2, 3] and chunk.half_sets.tolist() == source.half_sets[[5, 2]].tolist()
    assert chunk.skipped.rows.tolist() == [1, 3] and chunk.skipped.names.tolist() == ["000002@b.mrcs", "000004@b.mrcs"]
    assert chunk.skipped.describe("p.star") == ("p.star: 2 image(s) contain NaN or Inf pixels and were skipped "
                                                "(000002@b.mrcs, 000004@b.mrcs)")
    with pytest.raises(ParticleFileError, match="000002@b.mrcs, 000004@b.mrcs"):
        chunk.all_images()
    # chunks report what each left out
    assert [c.skipped.rows.tolist() for c in source.chunks(2)] == [[1], [3], [], [], []]

    # the offline path: one scan, a restricted source, one warning line naming them
    with caplog.at_level(logging.WARNING, logger="cryofastar.recon.io.source"):
        finite, report = source.finite(size=3)
    assert [r.getMessage() for r in caplog.records] == [report.describe(star)]
    assert report.names.tolist() == ["000002@b.mrcs", "000004@b.mrcs"] and report.rows.tolist() == [1, 3]
    assert len(finite) == 7 and len(finite.table) == 7
    assert finite.names.tolist() == [n for k, n in enumerate(source.names) if k not in (1, 3)]
    assert finite.table.particles["rlnImageName"].tolist() == finite.names.tolist()
    assert torch.equal(finite.table.rotations(), source.table.rotations()[[0, 2, 4, 5, 6, 7, 8]])
    assert torch.equal(finite.images().all_images(), torch.cat([b[[0, 2]], a]))
    # a source with nothing finite cannot be used
    with pytest.raises(ParticleFileError, match="every image contains NaN or Inf"):
        source.select(np.array([1, 3])).finite()


def test_select_restricts_every_per_particle_field_together(tmp_path):
    star, a, b = _two_stack_set(tmp_path)
    source = ParticleSource.from_star(star)
    mask = np.zeros(9, dtype=bool)
    mask[[2, 6, 7]] = True
    picked = source.select(mask)
    assert picked.indices.tolist() == [3, 3, 4] and picked.names.tolist() == [source.names[k] for k in (2, 6, 7)]
    assert picked.ctf.defocus_u_angstrom.tolist() == [10002.0, 10006.0, 10007.0]
    assert picked.half_sets.tolist() == source.half_sets[[2, 6, 7]].tolist()
    assert picked.table.particles["rlnAngleRot"].tolist() == [20.0, 60.0, 70.0]
    assert torch.equal(picked.images().all_images(), torch.stack([b[2], a[2], a[3]]))
    reordered = source.select(np.array([7, 2]))  # int rows: in the order given
    assert reordered.indices.tolist() == [4, 3] and (picked.box, picked.apix) == (BOX, APIX)
    with pytest.raises(ValueError, match="mask of shape"):
        source.select(np.ones(3, dtype=bool))


def test_a_chunk_subset_keeps_every_per_particle_field_together(tmp_path):
    star, a, b = _two_stack_set(tmp_path)
    chunk = ParticleSource.from_star(star).images()
    mask = np.zeros(9, dtype=bool)
    mask[[2, 6, 7]] = True
    for keep in (mask, np.array([2, 6, 7])):
        part = chunk.subset(keep)
        assert part.rows.tolist() == [2, 6, 7] and part.indices.tolist() == [3, 3, 4]
        assert torch.equal(part.images, torch.stack([b[2], a[2], a[3]]))
        assert part.ctf.defocus_u_angstrom.tolist() == [10002.0, 10006.0, 10007.0]
        assert part.half_sets.tolist() == chunk.half_sets[[2, 6, 7]].tolist() and part.optics == chunk.optics
    assert chunk.subset(np.array([7, 2])).indices.tolist() == [4, 3]  # positions: in the order given


def test_a_bare_stack_and_a_star_naming_it_give_the_same_particles(tmp_path):
    volume = torch.zeros(BOX, BOX, BOX)
    volume[5:11, 6:10, 4:12] = 1.0
    star = write_session(tmp_path, volume, APIX, 6, snr=None, seed=2, per_stack=6, ctf=CtfRange())
    stack = tmp_path / "particles_00001.mrcs"
    from_star, bare = ParticleSource.from_star(star), ParticleSource.from_stack(stack)
    assert (len(bare), bare.box, bare.apix) == (6, BOX, pytest.approx(APIX))
    assert bare.stacks.tolist() == from_star.stacks.tolist() and bare.indices.tolist() == from_star.indices.tolist()
    assert torch.equal(bare.half_sets, from_star.half_sets)  # the same stable hash of (stack, index)
    assert torch.equal(bare.images().all_images(), from_star.images().all_images())
    assert bare.ctf is None and bare.optics == {} and bare.table is None and from_star.ctf is not None
    assert bare.names[0] == f"000001@{stack.resolve()}" and bare.origin == stack
    assert image_keys(bare).equals(image_keys(from_star)) and image_keys(from_star).equals(image_keys(from_star.table))
    assert ParticleSource.from_stack(stack, apix=2.0).apix == 2.0  # --apix overrides the header


def test_a_bare_file_that_is_not_a_usable_stack_is_one_clear_error(tmp_path):
    write_volume(tmp_path / "map.mrc", torch.zeros(BOX, BOX, BOX), APIX)
    with pytest.raises(NotAParticleStack, match="3D map"):
        ParticleSource.from_stack(tmp_path / "map.mrc")
    write_stack(tmp_path / "s.mrcs", _images(2, 0), 0.0)  # header without a pixel size
    with pytest.raises(ParticleFileError, match="no pixel size; pass --apix"):
        ParticleSource.from_stack(tmp_path / "s.mrcs")
    assert ParticleSource.from_stack(tmp_path / "s.mrcs", apix=APIX).apix == APIX
    (tmp_path / "t.mrcs").write_bytes((tmp_path / "s.mrcs").read_bytes()[:-500])
    with pytest.raises(ParticleFileError, match="not a readable MRC file") as info:
        ParticleSource.from_stack(tmp_path / "t.mrcs")
    assert "\n" not in str(info.value)


def test_image_keys_match_names_across_spellings_and_refuse_duplicates(tmp_path):
    star, _, _ = _two_stack_set(tmp_path)
    table = read_particles(star)
    keys = image_keys(table)
    assert keys[0] == f"1@{(tmp_path / 'b.mrcs').resolve()}" and len(keys) == 9
    twice = table.particles.assign(rlnImageName=["1@b.mrcs"] + table.particles["rlnImageName"].tolist()[:-1])
    write_particles(tmp_path / "twice.star", twice, table.optics)
    with pytest.raises(ValueError, match="appears more than once"):
        image_keys(ParticleSource.from_star(tmp_path / "twice.star"))


def test_offline_commands_leave_out_and_name_a_nan_image(tmp_path, caplog):
    from cryofastar.engine.offline import ReconstructSettings, reconstruct
    from cryofastar.recon.backprojection import BackprojectSettings, backproject_particles

    volume = torch.zeros(32, 32, 32)
    volume[10:20, 12:18, 9:23] = 1.0
    star = write_session(tmp_path / "s", volume, 3.0, 24, snr=None, seed=5, per_stack=12)
    stack = tmp_path / "s" / "particles_00002.mrcs"
    with mrcfile.open(stack, mode="r+") as mrc:
        mrc.data[4, 7, 7] = np.nan  # 000005@particles_00002.mrcs
    bad = "000005@particles_00002.mrcs"
    with caplog.at_level(logging.WARNING):
        result = backproject_particles(BackprojectSettings(star, tmp_path / "map.mrc", interpolation="nearest",
                                                           oversampling=1, batch=8, device="cpu"))
    assert result.n_particles == 23 and sum(result.half_counts) == 23 and result.skipped == [bad]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and bad in warnings[0] and "NaN or Inf" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = reconstruct(star, tmp_path / "recon", ReconstructSettings(device="cpu", views=8, chunk=10, candidates=4,
                                                                        refine=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and bad in warnings[0]
    written = read_particles(tmp_path / "recon" / "particles.star")
    assert out.n_particles == 23 and len(written) == 23
    assert not any(name.startswith("000005@") and name.endswith("particles_00002.mrcs")
                   for name in written.particles["rlnImageName"])


# ------------------------------------------------------------- issue 20: the map poisoned silently, repeats


def test_pixels_no_particle_has_are_left_out_and_reported_with_why(tmp_path, caplog):
    """Issue 20: a stack scaled by 1e20, or one pixel at 2.4e27, was taken and ruined the map."""
    images = _images(6, 2)
    images[1, 4, 4] = 2.4e27  # beyond MAX_PIXEL_MAGNITUDE
    images[3, 9, 2] += 5000.0  # a hot pixel: 5000 RMS from its image's mean, under 1e6
    with pytest.warns(RuntimeWarning):  # mrcfile's header statistics overflow float32
        write_stack(tmp_path / "hot.mrcs", images, APIX)
    with pytest.warns(RuntimeWarning):
        write_stack(tmp_path / "scaled.mrcs", _images(4, 3) * 1e20, APIX)
    source = ParticleSource.from_stack(tmp_path / "hot.mrcs")
    chunk = source.images()
    assert chunk.rows.tolist() == [0, 2, 4, 5] and torch.equal(chunk.images, images[[0, 2, 4, 5]])
    assert chunk.skipped.rows.tolist() == [1, 3]
    assert chunk.skipped.reasons.tolist() == [source_module.TOO_LARGE, source_module.OUTLIER]
    assert chunk.skipped.describe("hot.mrcs") == (
        "hot.mrcs: 1 image(s) contain pixels beyond ±1e+06 and were skipped (000002@" + str(tmp_path / "hot.mrcs")
        + "); 1 image(s) contain a pixel over 1000 times the stack's typical RMS from the image mean and were "
        "skipped (000004@" + str(tmp_path / "hot.mrcs") + ")")
    # the verdict depends on the stack, not on which rows are read together
    assert [c.skipped.rows.tolist() for c in source.chunks(1)] == [[], [1], [], [3], [], []]
    scaled = ParticleSource.from_stack(tmp_path / "scaled.mrcs")
    assert len(scaled.images()) == 0 and len(scaled.images().skipped) == 4
    with pytest.raises(ParticleFileError, match="every image contains pixels beyond ±1e\\+06; nothing to use"):
        scaled.finite()
    # real data keep every image: noisy and noise-free simulated particles, a constant (blank) image
    volume = torch.zeros(24, 24, 24)
    volume[8:14, 9:12, 7:17] = 1.0
    for snr in (None, 0.1):
        star = write_session(tmp_path / f"sim{snr}", volume, 3.0, 20, snr=snr, seed=5, per_stack=10)
        sim = ParticleSource.from_star(star)
        assert len(sim.finite()[1]) == 0
    write_stack(tmp_path / "blank.mrcs", torch.cat([torch.zeros(1, BOX, BOX), _images(3, 4)]), APIX)
    assert len(ParticleSource.from_stack(tmp_path / "blank.mrcs").images().skipped) == 0


def test_an_image_named_twice_is_taken_once_and_the_repeats_reported(tmp_path, caplog):
    """Issue 20: a STAR listing the same particle 10 times inserted it 10 times."""
    star, a, b = _two_stack_set(tmp_path)
    table = read_particles(star)
    rows = table.particles.iloc[[0] * 10 + list(range(1, 9))].reset_index(drop=True)
    rows.loc[3, "rlnImageName"] = "1@" + str((tmp_path / "b.mrcs").resolve())  # the same image spelt otherwise
    write_particles(tmp_path / "tenfold.star", rows, table.optics)
    source = ParticleSource.from_star(tmp_path / "tenfold.star")
    assert len(source) == 18
    once = source.distinct()
    assert len(once) == 9 and once.names.tolist() == source.names[[0, *range(10, 18)]].tolist()
    assert once.left_out.rows.tolist() == list(range(1, 10))
    assert set(once.left_out.reasons) == {source_module.DUPLICATE}
    chunks = list(once.chunks(4))
    assert len(chunks[0].skipped) == 9 and [len(c.skipped) for c in chunks[1:]] == [0, 0]
    assert chunks[0].skipped.describe("t.star").startswith(
        "t.star: 9 image(s) repeat an earlier row's image (same stack and index) and were skipped (000001@b.mrcs, ")
    assert torch.equal(torch.cat([c.images for c in chunks]), torch.cat([b, a]))
    # the offline path: one warning line, every image once
    with caplog.at_level(logging.WARNING, logger="cryofastar.recon.io.source"):
        kept, report = source.finite(size=4)
    assert len(caplog.records) == 1 and "9 image(s) repeat" in caplog.records[0].getMessage()
    assert len(kept) == 9 and report.rows.tolist() == list(range(1, 10)) and len(kept.table) == 9
    assert torch.equal(kept.images().all_images(), torch.cat([b, a]))


def test_offline_backproject_inserts_a_repeated_image_once_with_one_warning(tmp_path, caplog):
    from cryofastar.recon.backprojection import BackprojectSettings, backproject_particles

    volume = torch.zeros(24, 24, 24)
    volume[8:14, 9:12, 7:17] = 1.0
    star = write_session(tmp_path / "s", volume, 3.0, 12, snr=None, seed=5, per_stack=12)
    table = read_particles(star)
    starfile_rows = table.particles.iloc[[0] * 10 + list(range(1, 12))].reset_index(drop=True)
    write_particles(tmp_path / "s" / "tenfold.star", starfile_rows.drop(
        columns=[c for c in table.optics.columns if c != "rlnOpticsGroup"]), table.optics)
    with caplog.at_level(logging.WARNING):
        result = backproject_particles(BackprojectSettings(tmp_path / "s" / "tenfold.star", tmp_path / "map.mrc",
                                                           interpolation="nearest", oversampling=1, batch=8,
                                                           device="cpu"))
    assert result.n_particles == 12 and sum(result.half_counts) == 12 and len(result.skipped) == 9
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "9 image(s) repeat an earlier row's image" in warnings[0]

"""MRC stacks and volumes (cryofastar.recon.io.mrc) against real files on disk.

Every fixture is written to ``tmp_path`` with mrcfile / numpy (or the package's own writers
where the round trip is the point), then read back through the public API. Bad input must
raise :class:`ParticleFileError` whose one-line message names the problem.
"""

from __future__ import annotations

from pathlib import Path

import cryofastar.recon.io.source as source_module
import mrcfile
import numpy as np
import pytest
import torch
from cryofastar.recon.io import (
    ParticleFileError,
    ParticleSource,
    read_images,
    read_volume,
    stack_shape,
    write_stack,
    write_volume,
)
from cryofastar.recon.io.mrc import MAX_IMAGE_SIDE, MAX_VOLUME_SIDE
from stack_helpers import BOX, stack_images

# --------------------------------------------------------------------------- MRC round trips


def test_write_stack_read_images_roundtrip(tmp_path: Path) -> None:
    images = stack_images(3, n=7)
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 2.0)

    assert stack_shape(path) == (7, BOX, BOX)
    everything = read_images(path)
    assert everything.dtype == torch.float32 and everything.shape == (7, BOX, BOX)
    torch.testing.assert_close(everything, images, rtol=0, atol=0)

    wanted = np.array([3, 1, 7, 3])  # 1-based, any order, repeats allowed
    picked = read_images(path, wanted)
    assert picked.shape == (4, BOX, BOX)
    torch.testing.assert_close(picked, images[wanted - 1], rtol=0, atol=0)

    with mrcfile.open(path) as mrc:  # a real image stack with the pixel size in the header
        assert mrc.is_image_stack()
        assert mrc.voxel_size.x == pytest.approx(2.0)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file behind"


@pytest.mark.parametrize("index", [0, 8, -1])
def test_read_images_rejects_out_of_range_index(tmp_path: Path, index: int) -> None:
    path = tmp_path / "s.mrcs"
    write_stack(path, stack_images(0, n=7), 1.0)
    with pytest.raises(ParticleFileError, match=rf"image {index} requested but the stack holds 7"):
        read_images(path, np.array([1, index]))


def test_single_2d_image_counts_as_stack_of_one(tmp_path: Path) -> None:
    path = tmp_path / "one.mrc"
    image = np.arange(BOX * BOX, dtype=np.float32).reshape(BOX, BOX)
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
    assert stack_shape(path) == (1, BOX, BOX)
    torch.testing.assert_close(read_images(path, np.array([1]))[0], torch.from_numpy(image))


def test_write_volume_read_volume_keeps_data_and_pixel_size(tmp_path: Path) -> None:
    volume = torch.randn(20, 20, 20, generator=torch.Generator().manual_seed(1))
    volume[2, 5, 11] = 42.0  # an asymmetric marker: axes must not be permuted
    path = tmp_path / "map.mrc"
    write_volume(path, volume, 1.37)

    back, apix = read_volume(path)
    assert back.dtype == torch.float32 and back.shape == (20, 20, 20)
    torch.testing.assert_close(back, volume, rtol=0, atol=0)
    assert back[2, 5, 11] == 42.0
    assert apix == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(path) as mrc:
        assert mrc.is_volume()

    write_volume(path, 2 * volume, 0.9)  # overwriting an existing map works
    back, apix = read_volume(path)
    torch.testing.assert_close(back, 2 * volume)
    assert apix == pytest.approx(0.9, rel=1e-6)


def test_read_volume_rejects_non_cubic(tmp_path: Path) -> None:
    path = tmp_path / "flat.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 16, 16), dtype=np.float32))
        mrc.set_volume()
    with pytest.raises(ParticleFileError, match="cubic"):
        read_volume(path)


def test_mrc_readers_reject_missing_and_non_mrc_files(tmp_path: Path) -> None:
    with pytest.raises(ParticleFileError, match="not found"):
        read_volume(tmp_path / "absent.mrc")
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"this is not an MRC file\n" * 100)
    with pytest.raises(ParticleFileError, match="not a readable MRC"):
        stack_shape(junk)
    with pytest.raises(ParticleFileError, match="not a readable MRC"):
        read_images(junk, np.array([1]))


# --------------------------------------------------------------------------- headers that lie (issue 20)


def _patched_stack(path: Path, fields: dict[str, int], size: int | None = None) -> Path:
    """A real 3-image stack written by mrcfile, then header words overwritten as raw little-endian int32.

    ``size`` extends the file sparsely (no disk used) so that it is as long as a lying header claims.
    """
    write_stack(path, stack_images(0, n=3), 2.0)
    offsets = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "nsymbt": 92}
    raw = bytearray(path.read_bytes())
    for name, value in fields.items():
        raw[offsets[name]:offsets[name] + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))
    if size is not None:
        with open(path, "r+b") as handle:
            handle.truncate(size)
    return path


@pytest.mark.parametrize(("fields", "size", "message"), [
    ({"nz": -5}, None, r"dimensions 16 x 16 x -5 are not all positive"),  # was OverflowError from mmap
    ({"nx": -16, "ny": -16}, None, r"not all positive"),
    ({"nz": 0}, None, r"not all positive"),
    # a sparse file exactly as long as the header says: 8 GiB of float32 images (was MemoryError on read)
    ({"nx": 65536, "ny": 65536, "nz": 1}, 1024 + 65536 * 65536 * 4, r"65536 x 65536 px images; at most 4096"),
    ({"nz": 10**6}, None, r"truncated: the header claims 1024001024 bytes, the file has 4096"),
    ({"nsymbt": 2**31 - 1}, None, r"truncated"),
    ({"nsymbt": -4}, None, r"negative extended header"),
    ({"mode": 99}, None, r"Unrecognised mode"),
], ids=["negative-nz", "negative-nx", "zero-nz", "huge-box-sparse", "huge-nz", "huge-extended", "negative-extended",
        "mode"])
def test_a_header_that_lies_is_refused_before_anything_is_mapped_or_allocated(tmp_path: Path, fields, size,
                                                                             message) -> None:
    path = _patched_stack(tmp_path / "lies.mrcs", fields, size)
    for read in (stack_shape, read_images, read_volume, lambda p: ParticleSource.from_stack(p)):
        with pytest.raises(ParticleFileError, match=rf"lies\.mrcs: not a readable MRC file \(.*{message}") as info:
            read(path)
        assert "\n" not in str(info.value)


def test_the_caps_allow_real_boxes_and_refuse_larger_maps(tmp_path: Path) -> None:
    assert MAX_IMAGE_SIDE >= 1024 and MAX_VOLUME_SIDE >= 512
    path = tmp_path / "big.mrcs"
    write_stack(path, torch.zeros(1, 1024, 1024), 1.0)  # a large particle box is fine
    assert stack_shape(path) == (1, 1024, 1024)
    volume = _patched_stack(tmp_path / "map.mrc", {"nx": 2048, "ny": 2048, "nz": 2048}, 1024 + 2048**3 * 4)
    with pytest.raises(ParticleFileError, match=r"2048 x 2048 x 2048 map; at most 1024 px"):
        read_volume(volume)


def test_chunks_of_a_big_box_stay_under_the_byte_cap(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "wide.mrcs"
    box = 512
    write_stack(path, torch.zeros(3, box, box), 1.0)
    source = ParticleSource.from_stack(path)
    monkeypatch.setattr(source_module, "CHUNK_BYTES", 2 * box * box * 4)  # two images' worth
    assert [len(chunk) for chunk in source.chunks(512)] == [2, 1]


# --------------------------------------------------------------------------- MRC modes (issue 20)


@pytest.mark.parametrize(("mode", "dtype"), [(0, np.int8), (1, np.int16), (6, np.uint16), (12, np.float16)])
def test_integer_and_half_float_modes_are_read_as_float32_exactly(tmp_path: Path, mode: int, dtype) -> None:
    """The modes RELION reads (0, 1, 6; 12 from RELION 4) convert to float32 without loss; mode 0 is signed,
    as relion_image_handler reads it (-62 stays -62)."""
    rng = np.random.default_rng(mode)
    values = rng.normal(0.0, 20.0, (3, BOX, BOX)) + (100.0 if dtype is np.uint16 else 0.0)
    values[0, 0, 0] = -62 if dtype is not np.uint16 else 62
    data = np.clip(values, np.iinfo(dtype).min, np.iinfo(dtype).max) if dtype is not np.float16 else values
    data = data.astype(dtype)
    path = tmp_path / f"m{mode}.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 2.0
    assert int(mrcfile.open(path).header.mode) == mode
    images = read_images(path)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, torch.from_numpy(data.astype(np.float32)), rtol=0, atol=0)
    assert float(images[0, 0, 0]) == float(data[0, 0, 0])


@pytest.mark.parametrize("mode", [3, 4])
def test_complex_modes_are_refused_with_a_reason(tmp_path: Path, mode: int) -> None:
    """Issue 20: a complex64 stack was read as its real part without a word (RELION 3.1: "only real-space images
    may be read into RELION")."""
    path = tmp_path / "complex.mrcs"
    if mode == 4:
        with mrcfile.new(path) as mrc:
            mrc.set_data(np.ones((3, BOX, BOX), dtype=np.complex64))
            mrc.set_image_stack()
            mrc.voxel_size = 2.0
    else:  # mrcfile cannot write complex int16: the header of a real file, patched
        _patched_stack(path, {"mode": 3})
    for read in (stack_shape, read_images, lambda p: ParticleSource.from_stack(p)):
        with pytest.raises(ParticleFileError, match=rf"complex\.mrcs: not a readable MRC file \(mode {mode} \(complex "
                                                    r"(int16|float32)\) holds Fourier-space data"):
            read(path)


def test_a_float16_stack_with_a_signalling_nan_is_read_without_a_warning(tmp_path):
    """Fuzzing (issue 20): the cast of a float16 signalling NaN raised numpy's 'invalid value encountered in cast'."""
    import warnings

    import mrcfile
    from cryofastar.recon.io.mrc import read_images, typical_image_rms

    data = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float16)
    data.view(np.uint16)[1, 2, 3] = 0x7D00  # exponent all ones, quiet bit clear: a signalling NaN
    path = tmp_path / "half.mrcs"
    with warnings.catch_warnings(), mrcfile.new(path) as mrc:
        warnings.simplefilter("ignore")  # mrcfile's own note that the data holds NaN
        mrc.set_data(data)
        mrc.header.ispg = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(typical_image_rms(path, 3))
        images = read_images(path)
    assert images.dtype == torch.float32 and bool(images[1].isnan().any()) and not bool(images[0].isnan().any())

"""The readers a user's files reach, fuzzed (a fast subset of bench/fuzz_readers.py), and one regression test per
fault that campaign found: each hostile file is either read into valid data or refused with one clear line."""

from __future__ import annotations

import importlib.util
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cryofastar.daemon.ingest import Rejected, plan_particle_file
from cryofastar.daemon.journal import IngestJournal
from cryofastar.recon.io import ParticleFileError, ParticleSource
from cryofastar.recon.io.mrc import MAX_STACK_IMAGES, check_header
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

_SPEC = importlib.util.spec_from_file_location("fuzz_readers", Path(__file__).parents[1] / "bench" / "fuzz_readers.py")
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules["fuzz_readers"] = fuzz
_SPEC.loader.exec_module(fuzz)

EXAMPLES = 200


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """The campaign's watched tree (valid stacks, a symlink out, a FIFO, a symlink loop) and the folder outside."""
    return fuzz.make_tree(tmp_path_factory.mktemp("fuzz"))


def test_fuzzed_files_are_read_or_refused_with_a_clear_reason(tree) -> None:
    """EXAMPLES fuzzed files (seeded): no uncaught exception, no rejection without a clear reason, no input
    that makes the readers allocate past the cap."""
    root, outside = tree
    tally = fuzz.Tally()
    tracemalloc.start()
    try:
        @hypothesis_seed(20)
        @settings(max_examples=EXAMPLES, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(fuzz.FUZZED, st.sampled_from([None, fuzz.SessionGeometry(fuzz.BOX, fuzz.APIX)]))
        def run(spec, geometry) -> None:  # noqa: ANN001
            suffix, data, placement = spec
            path = fuzz.materialise(root, outside, tally.tried, suffix, data, placement)
            try:
                tally.add(fuzz.feed(path, root, geometry), "star" if suffix == ".star" else "mrc")
            finally:
                fuzz.remove(path)

        run()
    finally:
        tracemalloc.stop()
    assert tally.tried == EXAMPLES
    assert tally.by_status["uncaught"] == 0, "\n".join(tally.traces)
    unclear = {k: tally.examples[k] for k in tally.reasons if k.startswith("unclear") or k == "unclassified"}
    assert not unclear, unclear
    assert tally.over_cap == 0 and tally.peak_bytes < fuzz.ALLOCATION_CAP
    # the campaign reaches both outcomes and both kinds of file (a generator that only makes junk proves nothing)
    assert tally.by_status["accepted"] > 10 and tally.by_status["rejected"] > EXAMPLES // 3
    assert tally.by_generator["star"] > 30 and tally.by_generator["mrc"] > 30


def test_a_header_claiming_1e6_x_1e5_x_1e5_voxels_is_refused_before_reading(tmp_path) -> None:
    tracemalloc.start()
    try:
        seen = fuzz.huge_claim_is_refused(tmp_path)
    finally:
        tracemalloc.stop()
    assert "1000000 x 100000 px images; at most 4096" in seen["1e6 x 1e5 x 1e5"]["refused"]
    assert f"1000000000 images; at most {MAX_STACK_IMAGES} per stack" in seen[
        "16 x 16 x 1e9 (sparse file of the claimed size)"]["refused"]


# ------------------------------------------------------------------ regressions: one per fault the fuzzer found
def _star(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


_OPTICS = ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnVoltage\n_rlnSphericalAberration\n"
           "_rlnAmplitudeContrast\n{rows}\n\n")
_PARTICLES = "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n{columns}{rows}\n"


def _particle_star(root: Path, name: str, optics_rows: str = "1 3.0 300 2.7 0.1", columns: str = "",
                   rows: str = "000001@stacks/s1.mrcs 1\n000002@stacks/s1.mrcs 1") -> Path:
    return _star(root, name, _OPTICS.format(rows=optics_rows) + _PARTICLES.format(columns=columns, rows=rows))


def _refused(path: Path, root: Path, match: str) -> str:
    """The daemon and the offline reader both refuse ``path`` with one line matching ``match``."""
    with pytest.raises(Rejected, match=match) as daemon:
        plan_particle_file(path, root, None, IngestJournal())
    with pytest.raises(ParticleFileError, match=match):  # what the offline commands read
        ParticleSource.from_star(path, root=root) if path.suffix == ".star" else check_header(path)
    message = str(daemon.value)
    assert "\n" not in message and path.name in message
    return message


@pytest.mark.parametrize(("columns", "rows", "match"), [
    # was AttributeError ('DataFrame' object has no attribute 'str')
    ("_rlnImageName\n", "000001@stacks/s1.mrcs 1 000001@stacks/s1.mrcs", "column rlnImageName appears twice"),
    # was ValueError (could not convert string to float)
    ("_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginXAngst\n_rlnOriginYAngst\n",
     "000001@stacks/s1.mrcs 1 0 0 0 x 0", "column rlnOriginXAngst of the particles must hold numbers, got 'x'"),
    # was accepted: a NaN origin shifts every image by NaN and poisons the map
    ("_rlnOriginXAngst\n_rlnOriginYAngst\n", "000001@stacks/s1.mrcs 1 nan 0", "rlnOriginXAngst .* finite numbers"),
    # was accepted as image 1 (int64 of 1.5); NaN was a ValueError
    ("_rlnRandomSubset\n", "000001@stacks/s1.mrcs 1 1.5", "rlnRandomSubset must be 1 or 2"),
    # was OverflowError (int64 of a 23-digit image number)
    ("", "99999999999999999999999@stacks/s1.mrcs 1", "is not of the form N@stack.mrcs"),
    # was read as image 3 (an Arabic-Indic digit matched \\d)
    ("", "\u0663@stacks/s1.mrcs 1", "is not of the form N@stack.mrcs"),
    # was RuntimeError (pathlib's symlink loop) in the containment check
    ("", "1@stacks/loop.mrcs 1", "missing stack|outside the watched directory"),
    # was ValueError (embedded null byte) while naming the refused path
    ("", "1@/etc/pa\x00sswd 1", "outside the watched directory"),
    # was OSError (File name too long) from Path.is_file
    ("", "1@" + "a" * 5000 + ".mrcs 1", "missing stack"),
])
def test_hostile_particle_columns_are_one_clear_error(tree, columns, rows, match) -> None:
    root, _ = tree
    _refused(_particle_star(root, "columns.star", columns=columns, rows=rows), root, match)


@pytest.mark.parametrize(("optics_rows", "match"), [
    # was MergeError (many-to-one merge), a pandas message with several lines
    ("1 3.0 300 2.7 0.1\n1 3.0 300 2.7 0.1", "data_optics defines optics group 1 more than once"),
    # were accepted: a pixel size of 0, -3 or NaN Å reached the session geometry and the CTF
    ("1 0 300 2.7 0.1", "rlnImagePixelSize of data_optics must be positive"),
    ("1 -3.0 300 2.7 0.1", "rlnImagePixelSize of data_optics must be positive"),
    ("1 nan 300 2.7 0.1", "rlnImagePixelSize of data_optics must hold finite numbers"),
    # was ValueError (could not convert string to float: 'abc')
    ("1 abc 300 2.7 0.1", "rlnImagePixelSize of data_optics must hold numbers, got 'abc'"),
    # were accepted: a CTF at 0 kV or with amplitude contrast 2 is no CTF (NaN or nonsense in the map)
    ("1 3.0 0 2.7 0.1", "rlnVoltage of data_optics must be positive"),
    ("1 3.0 300 2.7 2", "rlnAmplitudeContrast must be an amplitude contrast in"),
    # a string optics group against integer ones was a ValueError (merge of int64 and object columns)
    ("x 3.0 300 2.7 0.1", "rlnOpticsGroup of data_optics must hold numbers"),
    # a float group merged with integer ones: pandas cast it (RuntimeWarning, 'invalid value encountered in cast')
    ("1 3.0 300 2.7 0.1\n1e308 3.0 300 2.7 0.1", "rlnOpticsGroup of data_optics must hold optics group numbers"),
    ("1.5 3.0 300 2.7 0.1", "rlnOpticsGroup of data_optics must hold optics group numbers"),
])
def test_hostile_optics_tables_are_one_clear_error(tree, optics_rows, match) -> None:
    root, _ = tree
    path = _particle_star(root, "optics.star", optics_rows=optics_rows,
                          columns="_rlnDefocusU\n", rows="000001@stacks/s1.mrcs 1 15000")
    with pytest.raises(Rejected, match=match) as daemon:
        plan_particle_file(path, root, None, IngestJournal())
    assert "\n" not in str(daemon.value)


def test_an_unparseable_star_file_is_refused_on_one_line(tree) -> None:
    """starfile's ParserError spans two lines; the rejection (rejected.tsv, logs) was two lines too."""
    root, _ = tree
    path = _star(root, "ragged.star", "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
                 "000001@stacks/s1.mrcs 1\n000002@stacks/s1.mrcs 1 3 4\n000003@stacks/s1.mrcs 1\n")
    message = _refused(path, root, "not a readable STAR file")
    assert message.endswith(")")


def test_bytes_after_the_data_are_refused_without_a_warning(tree) -> None:
    """mrcfile warned (RuntimeWarning, an error under pytest) and read the header's images; the header does not
    describe such a file (a stack still growing: more images than nz), so it is refused."""
    root, _ = tree
    path = root / "trailing.mrcs"
    path.write_bytes(fuzz.valid_stack() + bytes(4 * fuzz.BOX * fuzz.BOX))
    assert "1024 bytes after the data the header claims" in _refused(path, root, "after the data")


@pytest.mark.parametrize(("nz", "mz"), [(5, 0), (5, 2)])
def test_a_stack_of_volumes_is_refused_by_the_header_check(tree, nz, mz) -> None:
    """Space group 401 (a stack of volumes): mrcfile shapes the data (nz // mz, mz, ny, nx); mz = 0 raised
    ZeroDivisionError, nz not a multiple of mz a RuntimeWarning ('larger than expected') past the size check."""
    root, _ = tree
    path = root / "volumes.mrcs"
    path.write_bytes(fuzz.mrc_bytes({"nx": 4, "ny": 4, "nz": nz, "mode": 2, "mx": 4, "my": 4, "mz": mz,
                                     "cella": 12.0, "ispg": 401}, bytes(4 * 4 * nz * 4)))
    _refused(path, root, f"space group 401 marks a stack of volumes \\(nz {nz}, mz {mz}\\)")


def test_a_header_without_cell_sampling_gives_no_pixel_size_without_a_warning(tree) -> None:
    """mx = 0: mrcfile's voxel size divided by zero (a numpy RuntimeWarning); now only the clear rejection."""
    root, _ = tree
    path = root / "no_sampling.mrcs"
    path.write_bytes(fuzz.mrc_bytes({"nx": 4, "ny": 4, "nz": 2, "mode": 2, "cella": 12.0}, bytes(4 * 4 * 2 * 4)))
    with pytest.raises(Rejected, match="gives no pixel size; pass --apix"):
        plan_particle_file(path, root, None, IngestJournal())
    assert len(ParticleSource.from_stack(path, apix=3.0)) == 2


def test_a_stack_that_is_a_symlink_loop_is_refused(tree) -> None:
    """The containment check of a bare stack raised pathlib's RuntimeError for a symlink loop."""
    root, _ = tree
    link = root / "self.mrcs"
    link.symlink_to("self.mrcs")
    try:
        with pytest.raises(Rejected, match="outside the watched directory"):
            plan_particle_file(link, root, None, IngestJournal())
    finally:
        link.unlink()


def test_a_sparse_stack_claiming_too_many_images_allocates_nothing(tree) -> None:
    """16 x 16 x (MAX_STACK_IMAGES + 1) float32, a sparse file of exactly that size: the listing of its particles
    (stack path and name per image, ~1.3 kB each) was allocated before any pixel was read."""
    root, _ = tree
    path = root / "many.mrcs"
    n = MAX_STACK_IMAGES + 1
    path.write_bytes(fuzz.mrc_bytes({"nx": 16, "ny": 16, "nz": n, "mode": 2, "mx": 16, "my": 16, "mz": 1,
                                     "cella": 48.0}, b""))
    os.truncate(path, 1024 + 16 * 16 * 4 * n)
    tracemalloc.start()
    try:
        with pytest.raises(Rejected, match=f"{n} images; at most {MAX_STACK_IMAGES} per stack"):
            plan_particle_file(path, root, None, IngestJournal())
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
        path.unlink()


def test_valid_files_of_every_kind_are_still_read(tree) -> None:
    """The seeds the byte mutator starts from are read whole (the checks above refuse only what is wrong)."""
    root, outside = tree
    for k, (name, (suffix, data)) in enumerate(sorted(fuzz.seed_files().items())):
        path = fuzz.materialise(root, outside, 900000 + k, suffix, data, "in")
        try:
            outcome = fuzz.feed(path, root, None)
        finally:
            fuzz.remove(path)
        expected = "not particles" if name == "volume" else "accepted"
        assert outcome.status == expected, (name, outcome)
        if expected == "accepted":
            assert outcome.images == fuzz.N_IMAGES and outcome.skipped == 0, name
    assert np.isfinite(fuzz.APIX)

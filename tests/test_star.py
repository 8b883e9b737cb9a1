"""RELION STAR particle tables (cryofastar.recon.io.star: read_particles, ParticleTable,
write_particles) against real files on disk.

Every fixture is written to ``tmp_path`` with mrcfile / starfile / numpy /
pandas (or the package's own writers where the round trip is the point), then
read back through the public API. Bad input must raise
:class:`ParticleFileError` whose one-line message names the problem.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from cryofastar.recon.io import (
    ParticleFileError,
    ParticleSource,
    ParticleTable,
    read_particles,
    write_particles,
    write_stack,
)
from stack_helpers import BOX, N_PER_STACK, stack_images

APIX = 1.5
STACKS = ("stack_a.mrcs", "stack_b.mrcs")


# --------------------------------------------------------------------------- helpers


def optics_table(apix: float | None = APIX, box: int = BOX) -> pd.DataFrame:
    table = {
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnOpticsGroup": [1],
        "rlnImagePixelSize": [apix],
        "rlnImageSize": [box],
        "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
    }
    if apix is None:
        del table["rlnImagePixelSize"]
    return pd.DataFrame(table)


def particles_table(stack_prefix: str = "", n_per_stack: int = N_PER_STACK) -> pd.DataFrame:
    """10 particles: every image of both stacks, with distinct angles and origins."""
    rows = []
    k = 0
    for stack in STACKS:
        for i in range(1, n_per_stack + 1):
            rows.append({
                "rlnImageName": f"{i:06d}@{stack_prefix}{stack}",
                "rlnAngleRot": 10.0 * k,
                "rlnAngleTilt": 5.0 * k,
                "rlnAnglePsi": -7.0 * k,
                "rlnOriginXAngst": 0.5 * k,
                "rlnOriginYAngst": -0.25 * k,
                "rlnOpticsGroup": 1,
            })
            k += 1
    return pd.DataFrame(rows)


def make_relion31_set(
    directory: Path,
    *,
    particles: pd.DataFrame | None = None,
    optics: pd.DataFrame | None = None,
    stack_dir: str = "",
    star_name: str = "particles.star",
) -> Path:
    """A valid RELION 3.1 set in ``directory``: 2 stacks of 5 float32 images of box 16 + a STAR file.

    Stacks go to ``directory / stack_dir``; rlnImageName is ``N@<stack_dir>/stack_x.mrcs``
    (relative to the STAR file's directory). Returns the STAR path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{stack_dir}/" if stack_dir else ""
    for seed, stack in enumerate(STACKS):
        write_stack(directory / prefix / stack, stack_images(seed), APIX)
    star = directory / star_name
    starfile.write(
        {"optics": optics_table() if optics is None else optics,
         "particles": particles_table(prefix) if particles is None else particles},
        star, overwrite=True,
    )
    return star


def rewrite_particles(star: Path, edit) -> Path:
    """Read the set's two blocks with starfile, apply ``edit(particles, optics)``, write them back."""
    blocks = starfile.read(star, always_dict=True)
    particles, optics = edit(blocks["particles"].copy(), blocks["optics"].copy())
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    return star


@pytest.fixture
def relion31(tmp_path: Path) -> Path:
    return make_relion31_set(tmp_path / "project")


# --------------------------------------------------------------------------- valid particle sets


def test_read_particles_valid_relion31_set(relion31: Path, tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # stacks must be found beside the STAR file, not in cwd

    table = read_particles(relion31)
    assert isinstance(table, ParticleTable)
    assert len(table) == 2 * N_PER_STACK
    assert table.box == BOX
    assert table.apix == pytest.approx(APIX)
    assert table.star_path == relion31

    expected_paths = [str((relion31.parent / s).resolve()) for s in STACKS for _ in range(N_PER_STACK)]
    assert list(table.stack_paths) == expected_paths
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table.stack_paths)
    np.testing.assert_array_equal(table.image_indices, np.tile(np.arange(1, N_PER_STACK + 1), 2))
    assert table.image_indices.dtype == np.int64

    # optics merged in, one row per particle
    assert (table.particles["rlnVoltage"] == 300.0).all()
    assert table.optics is not None and len(table.optics) == 1

    origins = table.origins_angstrom()
    assert origins.shape == (10, 2) and origins.dtype == torch.float64
    k = torch.arange(10, dtype=torch.float64)
    torch.testing.assert_close(origins, torch.stack([0.5 * k, -0.25 * k], dim=1))

    rotations = table.rotations()
    assert rotations.shape == (10, 3, 3)
    torch.testing.assert_close(rotations[0].to(torch.float64), torch.eye(3, dtype=torch.float64))  # all angles 0
    eye = torch.eye(3, dtype=rotations.dtype).expand(10, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, atol=1e-6, rtol=0)

    assert table.ctf() is None  # no rlnDefocusU

    # images of chosen rows come from the right stack and index
    rows = np.array([7, 0, 4])
    images = ParticleSource.from_star(table.star_path, table=table).images(rows).all_images()
    torch.testing.assert_close(images[0], stack_images(1)[2])  # row 7 = stack_b image 3
    torch.testing.assert_close(images[1], stack_images(0)[0])
    torch.testing.assert_close(images[2], stack_images(0)[4])


def test_stacks_in_subdirectory_resolved_from_star_directory(tmp_path: Path, monkeypatch) -> None:
    star = make_relion31_set(tmp_path / "proj", stack_dir="Extract/job007")
    monkeypatch.chdir(tmp_path)
    table = read_particles(Path("proj") / "particles.star")  # relative STAR path, different cwd
    assert set(table.stack_paths) == {str((tmp_path / "proj/Extract/job007" / s).resolve()) for s in STACKS}
    assert star.is_file()


def test_stacks_resolved_from_relion_project_directory(tmp_path: Path, monkeypatch) -> None:
    """RELION writes rlnImageName relative to the project directory (the working directory)."""
    project = tmp_path / "relion_project"
    for seed, stack in enumerate(STACKS):
        write_stack(project / "Extract/job003" / stack, stack_images(seed), APIX)
    star = project / "Select/job010/particles.star"
    star.parent.mkdir(parents=True)
    starfile.write({"optics": optics_table(), "particles": particles_table("Extract/job003/")}, star)
    monkeypatch.chdir(project)
    table = read_particles(star)
    assert set(table.stack_paths) == {str((project / "Extract/job003" / s).resolve()) for s in STACKS}


def test_write_particles_roundtrip(tmp_path: Path) -> None:
    for seed, stack in enumerate(STACKS):
        write_stack(tmp_path / stack, stack_images(seed), APIX)
    star = tmp_path / "written.star"
    write_particles(star, particles_table(), optics_table())
    blocks = starfile.read(star, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    table = read_particles(star)
    assert len(table) == 10 and table.box == BOX and table.apix == pytest.approx(APIX)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["a\tb.mrcs", "a\nb.mrcs", "a'b.mrcs", 'a"b.mrcs', "a\udcffb.mrcs"],
                         ids=["tab", "newline", "single-quote", "double-quote", "byte-ff"])
def test_write_particles_refuses_a_name_no_reader_gets_back_and_keeps_the_old_file(tmp_path: Path, name) -> None:
    """Issue 20: a tab used to raise csv.Error from starfile, a quote wrote a file starfile misreads."""
    star = tmp_path / "written.star"
    write_particles(star, particles_table(), optics_table())
    before = star.read_bytes()
    rows = particles_table()
    rows["rlnImageName"] = rows["rlnImageName"].astype(object)  # pandas' own strings cannot hold byte 0xff
    rows.loc[3, "rlnImageName"] = f"000001@{name}"
    with pytest.raises(ParticleFileError, match=r"written\.star: cannot write rlnImageName '000001@a.*b\.mrcs' has a "
                       r"(quote|control or line-break character|byte that is not UTF-8)") as info:
        write_particles(star, rows, optics_table())
    assert "\n" not in str(info.value) and str(info.value).encode("utf-8")
    assert star.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_write_particles_quotes_whitespace_and_hash_and_read_particles_reads_them_back(tmp_path: Path) -> None:
    names = ("stack a.mrcs", "stack#b.mrcs")
    for seed, stack in enumerate(names):
        write_stack(tmp_path / stack, stack_images(seed), APIX)
    rows = particles_table()
    rows["rlnImageName"] = rows["rlnImageName"].str.replace("stack_", "stack ").str.replace("stack b", "stack#b")
    write_particles(tmp_path / "written.star", rows, optics_table())
    assert '"000001@stack#b.mrcs"' in (tmp_path / "written.star").read_text()
    table = read_particles(tmp_path / "written.star")
    assert [Path(p).name for p in table.stack_paths] == [names[0]] * N_PER_STACK + [names[1]] * N_PER_STACK


def test_ctf_present_with_defocus_columns(relion31: Path) -> None:
    def add_defocus(particles: pd.DataFrame, optics: pd.DataFrame):
        n = len(particles)
        particles["rlnDefocusU"] = 15000.0 + 100.0 * np.arange(n)
        particles["rlnDefocusV"] = 14000.0 + 100.0 * np.arange(n)
        particles["rlnDefocusAngle"] = 30.0
        return particles, optics

    table = read_particles(rewrite_particles(relion31, add_defocus))
    ctf = table.ctf()
    assert ctf is not None and len(ctf) == 10
    n = torch.arange(10, dtype=torch.float64)
    torch.testing.assert_close(ctf.defocus_u_angstrom, 15000.0 + 100.0 * n)
    torch.testing.assert_close(ctf.defocus_v_angstrom, 14000.0 + 100.0 * n)
    torch.testing.assert_close(ctf.defocus_angle_degrees, torch.full((10,), 30.0, dtype=torch.float64))
    # microscope parameters come from data_optics
    torch.testing.assert_close(ctf.voltage_kv, torch.full((10,), 300.0, dtype=torch.float64))
    torch.testing.assert_close(ctf.spherical_aberration_mm, torch.full((10,), 2.7, dtype=torch.float64))
    torch.testing.assert_close(ctf.amplitude_contrast, torch.full((10,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(ctf.phase_shift_degrees, torch.zeros(10, dtype=torch.float64))


def test_ctf_bfactor_and_scale_are_read_as_relion_means_them(relion31: Path) -> None:
    def add(particles: pd.DataFrame, optics: pd.DataFrame):
        particles["rlnDefocusU"], particles["rlnDefocusV"] = 15000.0, 14000.0
        particles["rlnPhaseShift"], particles["rlnCtfBfactor"], particles["rlnCtfScalefactor"] = 90.0, 50.0, 0.8
        return particles, optics

    ctf = read_particles(rewrite_particles(relion31, add)).ctf()
    torch.testing.assert_close(ctf.phase_shift_degrees, torch.full((10,), 90.0, dtype=torch.float64))
    torch.testing.assert_close(ctf.b_factor_angstrom2, torch.full((10,), 50.0, dtype=torch.float64))
    torch.testing.assert_close(ctf.scale, torch.full((10,), 0.8, dtype=torch.float64))


@pytest.mark.parametrize(("columns", "message"), [
    ({"rlnDefocusV": 14000.0}, "rlnDefocusV given without rlnDefocusU"),
    ({"rlnDefocusU": 0.0, "rlnDefocusV": 14000.0}, "rlnDefocusU must be a positive defocus"),
    ({"rlnDefocusU": float("nan"), "rlnDefocusV": 14000.0}, "rlnDefocusU must be a positive defocus"),
    ({"rlnDefocusU": 15000.0, "rlnDefocusV": -3.0}, "rlnDefocusV must be a positive defocus"),
])
def test_partial_or_impossible_ctf_columns_are_one_clear_error(relion31: Path, columns, message) -> None:
    def add(particles: pd.DataFrame, optics: pd.DataFrame):
        for name, value in columns.items():
            particles[name] = value
        return particles, optics

    with pytest.raises(ParticleFileError, match=message):
        read_particles(rewrite_particles(relion31, add)).ctf()


def test_half_sets_are_valid_and_stable(relion31: Path, tmp_path: Path) -> None:
    first = read_particles(relion31).half_sets()
    second = read_particles(relion31).half_sets()
    assert first.shape == (10,) and first.dtype == torch.int64
    assert set(first.tolist()) <= {1, 2}
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    # the assignment depends on stack name and index, not on where the set lives
    copy = tmp_path / "copy"
    shutil.copytree(relion31.parent, copy)
    torch.testing.assert_close(read_particles(copy / relion31.name).half_sets(), first, rtol=0, atol=0)

    # ... nor on the order of the rows
    def reverse(particles: pd.DataFrame, optics: pd.DataFrame):
        return particles.iloc[::-1].reset_index(drop=True), optics

    reversed_halves = read_particles(rewrite_particles(copy / relion31.name, reverse)).half_sets()
    torch.testing.assert_close(reversed_halves.flip(0), first, rtol=0, atol=0)


SUBSETS = np.array([2, 2, 1, 2, 1, 1, 1, 2, 2, 1])


def _add_subsets(particles: pd.DataFrame, optics: pd.DataFrame):
    particles["rlnRandomSubset"] = SUBSETS
    return particles, optics


def test_half_sets_honor_rln_random_subset(relion31: Path) -> None:
    halves = read_particles(rewrite_particles(relion31, _add_subsets)).half_sets()
    assert halves.dtype == torch.int64
    np.testing.assert_array_equal(halves.numpy(), SUBSETS)


def test_half_sets_from_rln_random_subset_are_a_copy_without_warning(relion31: Path) -> None:
    table = read_particles(rewrite_particles(relion31, _add_subsets))
    # torch warns only once per process, so check the aliasing too (order-independent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        halves = table.half_sets()
    halves[0] = 99  # must not write through into the particle table
    assert table.particles["rlnRandomSubset"].iloc[0] == SUBSETS[0]
    table.half_sets()  # and, when torch has not warned yet in this process, no warning


def test_half_sets_reject_bad_rln_random_subset(relion31: Path) -> None:
    def add_subset(particles: pd.DataFrame, optics: pd.DataFrame):
        particles["rlnRandomSubset"] = 3
        return particles, optics

    table = read_particles(rewrite_particles(relion31, add_subset))
    with pytest.raises(ParticleFileError, match="rlnRandomSubset"):
        table.half_sets()


RELION30_HEADER = """
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnVoltage #10
_rlnSphericalAberration #11
_rlnAmplitudeContrast #12
"""


def write_relion30(directory: Path, extra_columns: str = "", extra_values: str = "") -> Path:
    """A RELION 3.0 file: one ``data_`` block, origins rlnOriginX/Y in pixels, no optics block."""
    directory.mkdir(parents=True, exist_ok=True)
    for seed, stack in enumerate(STACKS):
        write_stack(directory / stack, stack_images(seed), APIX)
    lines = [RELION30_HEADER.strip("\n") + ("\n" + extra_columns.strip("\n") if extra_columns else "")]
    k = 0
    for stack in STACKS:
        for i in range(1, N_PER_STACK + 1):
            lines.append(f"{i:06d}@{stack} {10.0 * k:.3f} {5.0 * k:.3f} {-7.0 * k:.3f} "
                         f"{1.0 * k:.3f} {-2.0 * k:.3f} 20000.0 19000.0 45.0 300.0 2.7 0.07{extra_values}")
            k += 1
    star = directory / "particles_30.star"
    star.write_text("\n".join(lines) + "\n\n")
    return star


def test_read_relion30_single_block_with_apix(tmp_path: Path) -> None:
    star = write_relion30(tmp_path / "r30")
    table = read_particles(star, apix=2.0)
    assert len(table) == 10 and table.box == BOX
    assert table.apix == pytest.approx(2.0)
    assert table.optics is None
    k = torch.arange(10, dtype=torch.float64)
    # pixels x apix = Å
    torch.testing.assert_close(table.origins_angstrom(), torch.stack([2.0 * k, -4.0 * k], dim=1))
    ctf = table.ctf()
    assert ctf is not None
    torch.testing.assert_close(ctf.voltage_kv, torch.full((10,), 300.0, dtype=torch.float64))
    torch.testing.assert_close(ctf.defocus_angle_degrees, torch.full((10,), 45.0, dtype=torch.float64))
    assert set(table.half_sets().tolist()) <= {1, 2}


def test_read_relion30_pixel_size_from_detector_and_magnification(tmp_path: Path) -> None:
    # rlnDetectorPixelSize 5 µm at 25000x -> 2.0 Å; it wins over --apix
    star = write_relion30(tmp_path / "r30", "_rlnDetectorPixelSize #13\n_rlnMagnification #14\n",
                          " 5.0 25000.0")
    table = read_particles(star, apix=9.0)
    assert table.apix == pytest.approx(2.0)
    torch.testing.assert_close(table.origins_angstrom()[1], torch.tensor([2.0, -4.0], dtype=torch.float64))


def test_relion30_without_pixel_size_needs_apix(tmp_path: Path) -> None:
    star = write_relion30(tmp_path / "r30")
    with pytest.raises(ParticleFileError, match=r"pixel size.*--apix"):
        read_particles(star)


def test_apix_argument_does_not_override_star_pixel_size(relion31: Path) -> None:
    assert read_particles(relion31, apix=7.0).apix == pytest.approx(APIX)


# --------------------------------------------------------------------------- bad input


def test_missing_required_column(relion31: Path) -> None:
    rewrite_particles(relion31, lambda p, o: (p.drop(columns=["rlnAngleTilt"]), o))
    with pytest.raises(ParticleFileError, match="missing required column.*rlnAngleTilt"):
        read_particles(relion31)


def test_particles_without_poses_are_read_and_asking_for_their_poses_is_a_clear_error(relion31: Path) -> None:
    """Particles straight from extraction have no angles: ab initio's input. Reading works; poses do not."""
    rewrite_particles(relion31, lambda p, o: (p.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]), o))
    table = read_particles(relion31)
    assert not table.has_poses and len(table) > 0
    with pytest.raises(ParticleFileError, match="no poses"):
        table.rotations()


def test_missing_image_name_column(relion31: Path) -> None:
    rewrite_particles(relion31, lambda p, o: (p.drop(columns=["rlnImageName"]), o))
    with pytest.raises(ParticleFileError, match="rlnImageName"):
        read_particles(relion31)


def test_image_name_points_at_missing_stack(relion31: Path) -> None:
    (relion31.parent / "stack_b.mrcs").unlink()
    with pytest.raises(ParticleFileError, match=r"missing stack .*stack_b\.mrcs"):
        read_particles(relion31)


def test_missing_stack_message_shows_plain_name(relion31: Path) -> None:
    (relion31.parent / "stack_b.mrcs").unlink()
    with pytest.raises(ParticleFileError) as info:
        read_particles(relion31)
    assert "np.str_" not in str(info.value)
    assert str(info.value).endswith("missing stack 'stack_b.mrcs'")


def test_index_beyond_stack_length(relion31: Path) -> None:
    def too_far(particles: pd.DataFrame, optics: pd.DataFrame):
        particles.loc[3, "rlnImageName"] = "000006@stack_a.mrcs"
        return particles, optics

    rewrite_particles(relion31, too_far)
    with pytest.raises(ParticleFileError, match=r"stack_a.mrcs.*holds images 1..5 but image 6 is requested"):
        read_particles(relion31)


def test_index_zero_is_rejected_and_named(relion31: Path) -> None:
    def zero(particles: pd.DataFrame, optics: pd.DataFrame):
        particles.loc[0, "rlnImageName"] = "000000@stack_a.mrcs"
        return particles, optics

    rewrite_particles(relion31, zero)
    with pytest.raises(ParticleFileError, match=r"stack_a.mrcs") as info:
        read_particles(relion31)
    assert re.search(r"image 0\b", str(info.value))


def test_stacks_with_mismatched_box_sizes(relion31: Path) -> None:
    write_stack(relion31.parent / "stack_b.mrcs", stack_images(1, box=20), APIX)
    with pytest.raises(ParticleFileError, match=r"has box (16|20) px but other stacks have (16|20) px"):
        read_particles(relion31)


def test_image_size_disagreeing_with_stacks(relion31: Path) -> None:
    rewrite_particles(relion31, lambda p, o: (p, o.assign(rlnImageSize=32)))
    with pytest.raises(ParticleFileError, match="rlnImageSize 32 does not match"):
        read_particles(relion31)


@pytest.mark.parametrize("content", [b"not an mrc file at all\n" * 64, b"", bytes(range(256)) * 8],
                         ids=["text", "empty", "binary"])
def test_non_mrc_file_named_mrcs(relion31: Path, content: bytes) -> None:
    (relion31.parent / "stack_a.mrcs").write_bytes(content)
    with pytest.raises(ParticleFileError, match="not a readable MRC file"):
        read_particles(relion31)


def test_star_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ParticleFileError, match="file not found"):
        read_particles(tmp_path / "absent.star")


@pytest.mark.parametrize(
    "content",
    [
        "this is just some text\nwith no data blocks\n",
        "",
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n1@a.mrcs 1 2 3 4 5\n\x00\x01",
    ],
    ids=["text", "empty", "garbled"],
)
def test_not_a_star_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.star"
    path.write_text(content)
    with pytest.raises(ParticleFileError, match=r"not a (readable )?STAR file"):
        read_particles(path)


def test_binary_file_is_not_a_star_file(tmp_path: Path) -> None:
    path = tmp_path / "image.star"
    write_stack(path, stack_images(0), 1.0)  # an MRC stack with a .star name
    with pytest.raises(ParticleFileError, match="STAR"):
        read_particles(path)


@pytest.mark.parametrize(
    "name",
    ["stack_a.mrcs", "x3@stack_a.mrcs", "@stack_a.mrcs", "3-stack_a.mrcs"],
)
def test_image_name_not_of_form_n_at_stack(relion31: Path, name: str) -> None:
    def bad_name(particles: pd.DataFrame, optics: pd.DataFrame):
        particles.loc[2, "rlnImageName"] = name
        return particles, optics

    rewrite_particles(relion31, bad_name)
    with pytest.raises(ParticleFileError, match=r"not of the form N@stack"):
        read_particles(relion31)


def test_image_names_all_without_at(relion31: Path) -> None:
    rewrite_particles(relion31, lambda p, o: (p.assign(rlnImageName="stack_a.mrcs"), o))
    with pytest.raises(ParticleFileError, match=r"'stack_a.mrcs' is not of the form N@stack"):
        read_particles(relion31)


def test_missing_pixel_size_without_apix(tmp_path: Path) -> None:
    star = make_relion31_set(tmp_path / "nopix", optics=optics_table(apix=None))
    with pytest.raises(ParticleFileError, match=r"no pixel size.*--apix"):
        read_particles(star)
    assert read_particles(star, apix=1.1).apix == pytest.approx(1.1)  # --apix fills the gap


def test_particles_refer_to_undefined_optics_group(relion31: Path) -> None:
    # optics block with rlnOpticsGroup as its first column
    def undefined_group(particles: pd.DataFrame, optics: pd.DataFrame):
        optics = optics[["rlnOpticsGroup", *[c for c in optics.columns if c != "rlnOpticsGroup"]]]
        return particles.assign(rlnOpticsGroup=[1] * 9 + [2]), optics

    rewrite_particles(relion31, undefined_group)
    with pytest.raises(ParticleFileError, match="optics group 2, which data_optics does not define"):
        read_particles(relion31)


def test_undefined_optics_group_with_relion_column_order(relion31: Path) -> None:
    assert list(optics_table().columns[:2]) == ["rlnOpticsGroupName", "rlnOpticsGroup"]  # as RELION writes
    rewrite_particles(relion31, lambda p, o: (p.assign(rlnOpticsGroup=[1] * 9 + [2]), o))
    with pytest.raises(ParticleFileError, match="optics group 2, which data_optics does not define"):
        read_particles(relion31)


def test_non_numeric_angles(relion31: Path) -> None:
    rewrite_particles(relion31, lambda p, o: (p.assign(rlnAnglePsi=["abc"] * 10), o))
    with pytest.raises(ParticleFileError, match="finite numbers"):
        read_particles(relion31)


def test_empty_particle_block(relion31: Path) -> None:
    relion31.write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.5\n\n"
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n\n"
    )
    with pytest.raises(ParticleFileError):
        read_particles(relion31)


def test_error_messages_are_one_line_and_name_the_file(relion31: Path) -> None:
    (relion31.parent / "stack_a.mrcs").write_bytes(b"\n\n garbage \n" * 50)
    with pytest.raises(ParticleFileError) as info:
        read_particles(relion31)
    message = str(info.value)
    assert "\n" not in message
    assert str(relion31) in message or "stack_a.mrcs" in message
    assert isinstance(info.value, ValueError)


def test_stack_names_relative_to_a_relion_project_directory(tmp_path: Path, monkeypatch) -> None:
    """RELION writes Refine3D/job012/run_data.star with names relative to the project."""
    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    write_stack(project / "Extract" / "job005" / "p.mrcs", torch.zeros(3, 16, 16), 1.0)
    job = project / "Refine3D" / "job012"
    job.mkdir(parents=True)
    import pandas as pd
    from cryofastar.recon.io import write_particles

    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [16]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i}@Extract/job005/p.mrcs" for i in (1, 2, 3)],
        "rlnAngleRot": [0.0] * 3, "rlnAngleTilt": [0.0] * 3, "rlnAnglePsi": [0.0] * 3, "rlnOpticsGroup": [1] * 3,
    })
    write_particles(job / "run_data.star", particles, optics)
    monkeypatch.chdir(tmp_path)  # not the project directory
    table = read_particles(job / "run_data.star")
    assert set(table.stack_paths) == {str((project / "Extract" / "job005" / "p.mrcs").resolve())}

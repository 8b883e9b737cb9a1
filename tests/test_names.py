"""The file-name rule of the outputs (cryofastar.recon.io.names), against starfile and RELION's own reader.

Real files with the odd characters in their names, a real STAR file written by the package's writer, read
back by the starfile package and by ``relion_reconstruct`` (RELION 3.1, Debian's ``relion``; skipped where
it is not installed, as in tests/test_relion_conventions.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import starfile
import torch
from cryofastar.recon.io import read_particles, write_stack
from cryofastar.recon.io.names import image_name_problem, printable, star_value, star_value_problem
from cryofastar.recon.io.star import write_particles

RELION = shutil.which("relion_reconstruct")

QUOTED = ["a b.mrcs", "grid 2/a\u00a0b.mrcs", "x#y.mrcs"]  # whitespace or '#': written in double quotes
BARE = ["plain.mrcs", "é_ü-1.mrcs", "a;b$c@d(e)[f]{g}!&+=~,.mrcs", "under_score/_x.mrcs"]
REFUSED = ["a\tb.mrcs", "a\nb.mrcs", "a\rb.mrcs", "a\x0bb.mrcs", "a\x85b.mrcs", "a\u2028b.mrcs", "a'b.mrcs",
           'a"b.mrcs', os.fsdecode(b"a\xffb.mrcs")]


def test_printable_escapes_what_would_break_a_line_and_nothing_else():
    name = os.fsdecode(b"/d/a\tb\n\xff") + "\u2028c \u00e9#.mrcs"
    assert printable(name) == "/d/a\\tb\\n\\xff\\u2028c \u00e9#.mrcs"
    assert printable("plain/é x.mrcs") == "plain/é x.mrcs"
    for name in REFUSED[:6] + REFUSED[8:]:
        assert len(printable(name).splitlines()) == 1 and "\t" not in printable(name)
        printable(name).encode("utf-8")  # writable as UTF-8


@pytest.mark.parametrize("name", REFUSED)
def test_values_no_reader_gets_back_are_refused_with_a_printable_reason(name):
    assert star_value_problem(name) is not None and image_name_problem(name) is not None
    with pytest.raises(ValueError, match=r"has a (quote|control or line-break character|byte that is not UTF-8)"):
        star_value(name)


def test_relion_syntax_characters_are_refused_only_in_image_names():
    for name in ("a#b.mrcs", "a%b.mrcs", "2024-01-01T10:00/a.mrcs"):
        assert star_value_problem(name) is None
        assert "RELION reads as image-name syntax" in image_name_problem(name)
    assert all(image_name_problem(name) is None for name in BARE + ["a b.mrcs"])
    assert [star_value(name) for name in QUOTED + ["", "plain"]] == [f'"{n}"' for n in QUOTED] + ['""', "plain"]


def _particles(tmp_path: Path, names: list[str]) -> Path:
    """One 3-image stack per name (sub-folders made), and a particles.star naming them, in ``tmp_path``."""
    rows = []
    for k, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_stack(tmp_path / name, torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(k)), 2.0)
        rows += [{"rlnImageName": f"{i:06d}@{name}", "rlnAngleRot": 0.0, "rlnAngleTilt": 30.0 * i,
                  "rlnAnglePsi": 0.0, "rlnOpticsGroup": 1} for i in (1, 2, 3)]
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [2.0], "rlnImageSize": [16], "rlnImageDimensionality": [2],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_particles(tmp_path / "particles.star", pd.DataFrame(rows), optics)
    return tmp_path / "particles.star"


def test_quoted_names_round_trip_through_starfile_and_our_reader(tmp_path):
    star = _particles(tmp_path, QUOTED + BARE)
    text = star.read_text(encoding="utf-8")
    assert '"000001@x#y.mrcs"' in text and "\n000001@plain.mrcs\t" in text
    names = [f"{i:06d}@{n}" for n in QUOTED + BARE for i in (1, 2, 3)]
    assert starfile.read(star)["particles"]["rlnImageName"].tolist() == names
    table = read_particles(star)
    assert [Path(p).relative_to(tmp_path.resolve()).as_posix() for p in table.stack_paths[::3]] == QUOTED + BARE


@pytest.mark.skipif(RELION is None, reason="relion_reconstruct not installed: bash scripts/setup.sh --test installs it")
def test_relion_reads_every_name_the_rule_lets_into_an_image_name(tmp_path):
    names = [n for n in QUOTED + BARE if image_name_problem(n) is None]
    assert len(names) == len(QUOTED + BARE) - 1  # all but "x#y.mrcs"
    _particles(tmp_path, names)
    done = subprocess.run([RELION, "--i", "particles.star", "--o", "relion.mrc"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and (tmp_path / "relion.mrc").is_file(), done.stdout[-1000:] + done.stderr[-1000:]

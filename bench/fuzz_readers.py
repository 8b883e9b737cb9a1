"""Fuzz every reader a user's files reach (issue 20, item 1): MRC/MRCS stacks and RELION STAR files.

Each fuzzed file is written into a watched tree (a temporary directory that also holds
valid stacks, a symlink leading out of it and a stack outside it) and fed to the readers
the daemon uses: :func:`cryofastar.daemon.ingest.plan_particle_file` and then every chunk
of :meth:`~cryofastar.recon.io.ParticleSource.chunks` (as ``Daemon._read`` does), then to
the offline readers (``read_particles`` and the table's poses, CTF and half sets for STAR
files; ``check_header``, ``stack_shape``, ``read_images``, ``typical_image_rms`` and
``read_volume`` for MRC files). Each must either return valid data (finite float32 images
of the declared box, pixels within the pixel policy) or raise the package's error
(``ParticleFileError``; the daemon's ``Rejected``) with one line that names the file and
a reason. Anything else is an *uncaught exception*.

Files come from two generators (hypothesis, derandomised with ``--seed``):

- **structured**: a valid file described field by field (MRC header words, data, byte
  order; STAR blocks, columns, optics groups, image names), with a few fields replaced by
  hostile values (negative and huge dimensions, unknown modes, a wrong map field, NaN and
  Inf pixels, truncated data; duplicate or missing columns and optics groups, zero,
  negative and NaN pixel sizes, ``..`` and absolute paths, symlinks out of the tree);
- **bytes**: a valid seed file (MRC or STAR) mutated byte by byte (flips, overwrites,
  insertions, deletions, truncations, repeated spans), or pure binary junk.

Peak allocation per input is measured with :mod:`tracemalloc` (numpy registers its
buffers with it; torch's own allocator does not, but the one torch buffer of a read, the
chunk, is bounded by ``CHUNK_BYTES`` by construction) and compared with
:data:`ALLOCATION_CAP`.

Run::

    nice -n 10 .venv/bin/python bench/fuzz_readers.py --n 10000 --seed 0

It prints the figures and writes ``bench/results/fuzz_readers.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryofastar.daemon.ingest import NotParticles, Rejected, SessionGeometry, plan_particle_file
from cryofastar.daemon.journal import IngestJournal
from cryofastar.recon.io import ParticleFileError, ParticleSource, read_particles
from cryofastar.recon.io.mrc import (
    MAX_IMAGE_SIDE,
    MAX_STACK_IMAGES,
    MAX_VOLUME_SIDE,
    check_header,
    read_images,
    read_volume,
    stack_shape,
    typical_image_rms,
)
from cryofastar.recon.io.source import CHUNK_BYTES, MAX_PIXEL_MAGNITUDE
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from mrcfile.dtypes import HEADER_DTYPE

BOX = 16
"""Side (px) of the valid stacks in the watched tree and of the structured MRC seeds."""
N_IMAGES = 5
APIX = 3.0
READ_CHUNK = 512  # the daemon's default --read-chunk (daemon/settings.py)
ALLOCATION_CAP = 3 * CHUNK_BYTES
"""Most bytes (tracemalloc peak) one input may make the readers allocate: a chunk's pixels in the file's
own dtype and as float32 (2 x CHUNK_BYTES), plus metadata for at most MAX_STACK_IMAGES particles."""
MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
_MACHST = {"<": b"\x44\x44\x00\x00", ">": b"\x11\x11\x00\x00"}


# ---------------------------------------------------------------------------------------- MRC files
def mrc_bytes(header: dict[str, object], data: bytes, order: str = "<", extended: bytes = b"") -> bytes:
    """An MRC file: a 1024-byte header (``header`` words over a valid default) + ``extended`` + ``data``.

    ``order`` is ``"<"`` or ``">"`` (byte order of the header words; the machine stamp follows
    it unless ``header`` sets ``machst``).
    """
    words = np.zeros((), dtype=HEADER_DTYPE.newbyteorder(order))
    words["map"] = b"MAP "
    words["machst"] = np.frombuffer(_MACHST[order], dtype="u1")
    words["nversion"] = 20140
    words["mapc"], words["mapr"], words["maps"] = 1, 2, 3
    for key, value in header.items():
        if key == "machst":
            words["machst"] = np.frombuffer(value, dtype="u1")
        elif key == "cella":
            words["cella"] = (value, value, value)
        else:
            words[key] = value
    return words.tobytes() + extended + data


def valid_stack(n: int = N_IMAGES, box: int = BOX, mode: int = 2, order: str = "<", seed: int = 0,
                ispg: int = 0) -> bytes:
    """A valid ``n``-image stack of ``box`` px in ``mode`` (mrcfile's header conventions, pixel size APIX)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, box, box)) * (20 if mode in (0, 1, 6) else 1) + (50 if mode == 6 else 0)
    data = values.astype(np.dtype(MODES[mode]).newbyteorder(order)).tobytes()
    header = {"nx": box, "ny": box, "nz": n, "mode": mode, "mx": box, "my": box, "mz": n if ispg else 1,
              "cella": APIX * box, "ispg": ispg}
    if not ispg:
        header["cella"] = 0.0
        header["cellb"] = (90.0, 90.0, 90.0)
    words = mrc_bytes(header, b"", order)
    head = np.frombuffer(words, dtype=HEADER_DTYPE.newbyteorder(order)).copy()
    head["cella"] = (APIX * box, APIX * box, APIX * (n if ispg else 1))
    head["mx"], head["my"], head["mz"] = box, box, n if ispg else 1
    head["cellb"] = (90.0, 90.0, 90.0)
    return head.tobytes() + data


_HUGE_INTS = [0, -1, -5, -(2**31), 2**31 - 1, 4097, 65536, 10**6, 10**5, 2**20 + 1, 1]
_MRC_FIELDS = {
    "nx": st.sampled_from(_HUGE_INTS + [BOX - 1, BOX + 1, 7]),
    "ny": st.sampled_from(_HUGE_INTS + [BOX - 1, BOX + 1, 3]),
    "nz": st.sampled_from(_HUGE_INTS + [N_IMAGES - 1, N_IMAGES + 1, 10**9, 2**31 - 1]),
    "mode": st.sampled_from([-1, 3, 4, 5, 7, 101, 255, 2**31 - 1, 0, 1, 6, 12]),
    "nsymbt": st.sampled_from([-1, -1024, 1, 80, 1024, 2**31 - 1, 4 * BOX]),
    "ispg": st.sampled_from([-1, 1, 401, 230, 2**31 - 1]),
    "mx": st.sampled_from([0, -1, 1, 2**31 - 1]),
    "mz": st.sampled_from([0, -3, 1, 2**31 - 1, N_IMAGES]),
    "cella": st.sampled_from([0.0, -48.0, float("nan"), float("inf"), 1e38, 1e-30]),
    "map": st.sampled_from([b"PAM ", b"\x00\x00\x00\x00", b"MAP\x00", b"map "]),
    "machst": st.sampled_from([b"\x00\x00\x00\x00", b"\xff\xff\x00\x00", b"\x44\x41\x00\x00", b"\x11\x11\x00\x00",
                               b"\x44\x44\x00\x00"]),
    "mapc": st.sampled_from([0, 2, 3, -1, 99]),
    "nversion": st.sampled_from([0, -1, 99999, 20140]),
    "exttyp": st.sampled_from([b"FEI1", b"\xff\xff\xff\xff", b"CCP4", b"MRCO"]),
    "nlabl": st.sampled_from([-1, 11, 2**31 - 1]),
    "dmin": st.sampled_from([float("nan"), float("-inf"), 1e38]),
    "rms": st.sampled_from([float("nan"), -1.0]),
}


@st.composite
def structured_mrc(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """A valid stack description with a few header fields, the data or the byte order made hostile.

    Returns ``(suffix, file bytes, placement)`` with placement ``"in"``, ``"symlink_out"`` or
    ``"symlink_in"``, ``"symlink_loop"`` (where the file lies relative to the watched tree).
    """
    order = draw(st.sampled_from("<>"))
    mode = draw(st.sampled_from(sorted(MODES)))
    n = draw(st.integers(1, 6))
    box = draw(st.sampled_from([1, 2, BOX, BOX, BOX, 15]))
    ny = draw(st.sampled_from([box, box, box, box + 1]))
    ispg = draw(st.sampled_from([0, 0, 0, 1, 401]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.standard_normal((n, ny, box)) * (20 if mode in (0, 1, 6) else 1) + (50 if mode == 6 else 0)
    poison = draw(st.sampled_from(["none", "none", "nan", "inf", "huge", "scaled", "hot", "zeros"]))
    if poison != "none" and mode in (2, 12):
        pick = draw(st.integers(0, values.size - 1))
        flat = values.reshape(-1)
        flat[pick] = {"nan": np.nan, "inf": -np.inf, "huge": 2.4e27, "scaled": flat[pick], "hot": 5e5,
                      "zeros": 0.0}[poison]
        if poison == "scaled":
            values = values * 1e20
        if poison == "zeros":
            values[:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float16 overflow of the poisons is the point
        data = values.astype(np.dtype(MODES[mode]).newbyteorder(order)).tobytes()
    header: dict[str, object] = {"nx": box, "ny": ny, "nz": n, "mode": mode, "mx": box, "my": ny,
                                 "mz": n if ispg else 1, "cella": APIX * box, "ispg": ispg}
    extended = b""
    for key in draw(st.sets(st.sampled_from(sorted(_MRC_FIELDS)), max_size=3)):
        header[key] = draw(_MRC_FIELDS[key])
        if key == "nsymbt" and isinstance(header[key], int) and 0 < header[key] <= 4096:
            extended = bytes(draw(st.sampled_from([header[key], 0, header[key] - 1])))
    cut = draw(st.sampled_from([0, 0, 0, 1, 4, len(data) // 2, len(data), len(data) + 1024 - 7]))
    data = data[: max(0, len(data) - cut)] if cut <= len(data) else b""
    data += bytes(draw(st.sampled_from([0, 0, 0, 3, 4 * box * box])))
    raw = mrc_bytes(header, data, order, extended)
    if cut > len(data) + 1024:
        raw = raw[: draw(st.integers(0, 1023))]
    suffix = draw(st.sampled_from([".mrcs", ".mrcs", ".mrc", ".MRCS"]))
    placement = draw(st.sampled_from(["in"] * 8 + ["symlink_out", "symlink_in", "symlink_loop"]))
    return suffix, raw, placement


# --------------------------------------------------------------------------------------- STAR files
_NAMES = {
    "valid": "{i:06d}@stacks/s1.mrcs",
    "valid_int16": "{i:06d}@stacks/s2.mrcs",
    "space": "{i:06d}@stacks/with space.mrcs",
    "absolute_inside": "{i:06d}@{root}/stacks/s1.mrcs",
    "other_box": "{i:06d}@stacks/big.mrcs",
    "nan_stack": "{i:06d}@stacks/nan.mrcs",
    "index0": "0@stacks/s1.mrcs",
    "index_past": "99@stacks/s1.mrcs",
    "index_huge": "99999999999999999999999@stacks/s1.mrcs",
    "index_int64": "9223372036854775807@stacks/s1.mrcs",
    "negative": "-1@stacks/s1.mrcs",
    "no_at": "stacks/s1.mrcs",
    "empty_stack": "1@",
    "at_only": "@",
    "unicode_digit": "\u0663@stacks/s1.mrcs",
    "traversal": "1@../../etc/passwd",
    "traversal_deep": "1@../" * 1 + "../../../../../../../../etc/passwd",
    "absolute": "1@/etc/passwd",
    "dev": "1@/dev/zero",
    "proc": "1@/proc/self/mem",
    "symlink_out": "1@link_out.mrcs",
    "dir": "1@stacks",
    "missing": "1@stacks/missing.mrcs",
    "outside_abs": "1@{outside}/secret.mrcs",
    "dotdot_back_in": "{i:06d}@stacks/../stacks/s1.mrcs",
    "nul": "1@stacks/s1\x00.mrcs",
    "long": "1@" + "a" * 5000 + ".mrcs",
    "self": "1@{self}",
    "fifo": "1@stacks/fifo.mrcs",
    "symlink_loop": "1@stacks/loop.mrcs",
    "nul_absolute": "1@/etc/pa\x00sswd",
    "star_itself": "1@particles.star",
}
_VALUES = {
    "good": ["3.0"],
    "zero": ["0", "0.0"],
    "negative": ["-3.0"],
    "nan": ["nan", "NaN"],
    "inf": ["inf", "-inf"],
    "text": ["abc", '"3.0"', "''"],
    "huge": ["1e308", "1e400"],
    "tiny": ["1e-300"],
}


def _star_value(value: str, quoting: str) -> str:
    if quoting == "double" or (" " in value and quoting != "none"):
        return f'"{value}"'
    if quoting == "single":
        return f"'{value}'"
    return value


def _loop(name: str, columns: list[str], rows: list[list[str]], quoting: str, layout: str) -> str:
    lines = [f"data_{name}", ""]
    if layout == "simple" and len(rows) == 1:
        lines += [f"_{c} {_star_value(v, quoting)}" for c, v in zip(columns, rows[0], strict=False)]
        return "\n".join(lines) + "\n\n"
    lines.append("loop_" if layout != "no_loop" else "")
    lines += [f"_{c} #{k + 1}" for k, c in enumerate(columns)]
    for row in rows:
        lines.append("\t".join(_star_value(v, quoting) for v in row))
    return "\n".join(lines) + "\n\n"


_STAR_ASPECTS = ["names", "groups", "pixel", "image_size", "voltage", "amplitude", "extras", "columns", "ragged",
                 "layout", "quoting", "block", "trailer", "encoding", "no_optics"]
_GOOD_NAMES = ["valid"] * 6 + ["valid_int16", "space", "absolute_inside", "dotdot_back_in"]


@st.composite
def structured_star(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """A RELION 3.1 particle STAR file built field by field, up to three aspects of it hostile.

    Aspects (``_STAR_ASPECTS``): image names, optics groups, pixel size, image size, voltage,
    amplitude contrast, the values of optional columns, duplicated/missing/renamed columns, a
    ragged row, the loop layout, quoting, the block name, a trailing block, the encoding, no
    optics block. Image names use the placeholders of ``_NAMES`` (``{root}``, ``{outside}``,
    ``{self}``), filled in by :func:`materialise`.
    """
    bad = draw(st.sets(st.sampled_from(_STAR_ASPECTS), max_size=3))

    def pick(aspect: str, good: list[str], hostile: list[str]) -> str:
        return draw(st.sampled_from(hostile if aspect in bad and draw(st.booleans()) else good))

    quoting = pick("quoting", ["none"], ["double", "single"])
    layout = pick("layout", ["loop"], ["simple", "no_loop"])
    groups = ["1"] if "groups" not in bad else draw(st.lists(st.sampled_from(["1", "1", "2", "x", "-1", "nan", "1.5",
                                                                               "0"]), min_size=0, max_size=3))
    optics_columns = ["rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
                      "rlnSphericalAberration", "rlnAmplitudeContrast"]
    optics_rows = []
    for group in groups:
        optics_rows.append([group, pick("pixel", _VALUES["good"], sum(_VALUES.values(), [])),
                            pick("image_size", [str(BOX)], ["32", "0", "-16", "x", "16.5", "nan"]),
                            pick("voltage", ["300"], ["0", "-300", "nan", "x", "inf"]), "2.7",
                            pick("amplitude", ["0.1"], ["nan", "2", "-0.5", "x"])])
    n_rows = draw(st.integers(1, 8))
    kinds = _GOOD_NAMES + (sorted(_NAMES) if "names" in bad else [])
    columns = ["rlnImageName", "rlnOpticsGroup"]
    rows = [[_NAMES[draw(st.sampled_from(kinds))].replace("{i:06d}", f"{draw(st.integers(1, N_IMAGES)):06d}"),
             draw(st.sampled_from(groups or ["1"]))] for _ in range(n_rows)]
    extras = draw(st.sets(st.sampled_from(["angles", "some_angles", "subset", "ctf", "defocus_v_only", "origins",
                                           "origins_px", "image_size", "pixel_in_particles", "magnification",
                                           "ctf_extra"]), max_size=4))
    hostile_value = st.sampled_from(["0", "-90", "nan", "inf", "x", "1e308", "-1e400", ""])
    for extra in sorted(extras):
        names = {"angles": ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "some_angles": ["rlnAngleRot"],
                 "subset": ["rlnRandomSubset"], "ctf": ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"],
                 "defocus_v_only": ["rlnDefocusV"], "origins": ["rlnOriginXAngst", "rlnOriginYAngst"],
                 "origins_px": ["rlnOriginX", "rlnOriginY"], "image_size": ["rlnImageSize"],
                 "pixel_in_particles": ["rlnImagePixelSize"], "magnification": ["rlnDetectorPixelSize",
                                                                                 "rlnMagnification"],
                 "ctf_extra": ["rlnDefocusU", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"]}[extra]
        good = {"subset": [["1", "2"]], "ctf": [["15000", "21000"], ["14000", "15000"], ["30", "-10"]],
                "image_size": [[str(BOX)]], "magnification": [["5"], ["16667"]],
                "pixel_in_particles": [["3.0"]], "ctf_extra": [["15000"], ["0", "90"], ["0", "50"], ["1"]]}.get(
                    extra, [["10.5", "-90", "0", "179.9"]])
        for k, name in enumerate(names):
            columns.append(name)
            hostile = "extras" in bad and draw(st.booleans())
            choices = good[min(k, len(good) - 1)]
            for row in rows:
                row.append(draw(hostile_value) if hostile and draw(st.booleans()) else draw(st.sampled_from(choices)))
    if "columns" in bad:
        for op in draw(st.lists(st.sampled_from(["duplicate", "drop", "rename"]), min_size=1, max_size=2)):
            k = draw(st.integers(0, len(columns) - 1))
            if op == "duplicate":
                columns.append(columns[k])
                for row in rows:
                    row.append(row[k])
            elif op == "drop" and len(columns) > 1:
                del columns[k]
                for row in rows:
                    del row[k]
            elif op == "rename":
                columns[k] = draw(st.sampled_from(["rlnImageName", "rlnOpticsGroup", "rlnMicrographName", ""]))
    if "ragged" in bad:
        rows[draw(st.integers(0, len(rows) - 1))].append("extra")
    if "groups" in bad and len(rows) > 1 and draw(st.booleans()):  # a particle in a group data_optics lacks
        rows[-1][1] = draw(st.sampled_from(["3", "x", ""]))
    text = "\n# version 30001\n\n"
    if "no_optics" not in bad:
        drop = draw(st.sets(st.integers(0, len(optics_columns) - 1), max_size=2)) if "columns" in bad else set()
        keep = [k for k in range(len(optics_columns)) if k not in drop]
        text += _loop("optics", [optics_columns[k] for k in keep], [[r[k] for k in keep] for r in optics_rows],
                      quoting, "loop")
    text += _loop(pick("block", ["particles"], ["", "images", "particles\n", "optics"]), columns, rows, quoting,
                  layout)
    if "trailer" in bad:
        text += draw(st.sampled_from(["data_particles\nloop_\n_rlnImageName\n1@stacks/s1.mrcs\n",
                                      "data_extra\n_rlnFoo 1\n", "loop_\n", "data_\n", "\x00\x01binary\xff",
                                      "data_optics\nloop_\n_rlnOpticsGroup\n1\n"]))
    encoding = pick("encoding", ["utf-8"], ["crlf", "latin-1", "bom", "nul"])
    data = text.replace("\n", "\r\n" if encoding == "crlf" else "\n").encode("utf-8", "replace")
    if encoding == "latin-1":
        data = data.replace(b"stacks", b"st\xe4cks", 1)
    elif encoding == "bom":
        data = b"\xef\xbb\xbf" + data
    elif encoding == "nul":
        data = data.replace(b"\n", b"\n\x00", 1)
    return ".star", data, "in"


# ------------------------------------------------------------------------------- byte mutations
_SEEDS: dict[str, tuple[str, bytes]] = {}


def seed_files() -> dict[str, tuple[str, bytes]]:
    """The valid seed files the byte-level mutator starts from: ``name -> (suffix, bytes)``."""
    if not _SEEDS:
        _SEEDS["float32"] = (".mrcs", valid_stack())
        _SEEDS["int16_big_endian"] = (".mrcs", valid_stack(mode=1, order=">", seed=1))
        _SEEDS["int8"] = (".mrcs", valid_stack(mode=0, seed=2))
        _SEEDS["float16"] = (".mrcs", valid_stack(mode=12, seed=3))
        _SEEDS["volume"] = (".mrc", valid_stack(n=BOX, mode=2, seed=4, ispg=1))
        rows = "\n".join(f"{i:06d}@stacks/s1.mrcs 1 10.0 20.0 30.0 1.5 -2.0 15000 14500 30 {1 + i % 2}"
                         for i in range(1, N_IMAGES + 1))
        star31 = ("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
                  "_rlnImagePixelSize #3\n_rlnImageSize #4\n_rlnImageDimensionality #5\n_rlnVoltage #6\n"
                  "_rlnSphericalAberration #7\n_rlnAmplitudeContrast #8\n"
                  f"1 opticsGroup1 {APIX} {BOX} 2 300 2.7 0.1\n\n\n# version 30001\n\ndata_particles\n\nloop_\n"
                  "_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnAngleRot #3\n_rlnAngleTilt #4\n_rlnAnglePsi #5\n"
                  "_rlnOriginXAngst #6\n_rlnOriginYAngst #7\n_rlnDefocusU #8\n_rlnDefocusV #9\n"
                  f"_rlnDefocusAngle #10\n_rlnRandomSubset #11\n{rows}\n\n")
        _SEEDS["star31"] = (".star", star31.encode())
        rows30 = "\n".join(f"{i:06d}@stacks/s2.mrcs 10.0 20.0 30.0 1 2 {APIX}" for i in range(1, N_IMAGES + 1))
        star30 = ("data_\n\nloop_\n_rlnImageName\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginX\n"
                  f"_rlnOriginY\n_rlnPixelSize\n{rows30}\n")
        _SEEDS["star30"] = (".star", star30.encode())
    return _SEEDS


_MUTATION = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat", "header_word"]),
                      st.integers(0, 2**20), st.integers(0, 255), st.integers(1, 64))


def mutate(data: bytes, ops: list[tuple[str, int, int, int]]) -> bytes:
    """``data`` after ``ops``: ``(kind, position, byte, length)`` each (positions wrap around the data)."""
    raw = bytearray(data)
    for kind, position, byte, length in ops:
        at = position % max(1, len(raw))
        if kind == "flip" and raw:
            raw[at] ^= 1 << (byte % 8)
        elif kind == "set" and raw:
            raw[at] = byte
        elif kind == "insert":
            raw[at:at] = bytes([byte]) * length
        elif kind == "delete":
            del raw[at:at + length]
        elif kind == "truncate":
            del raw[at:]
        elif kind == "repeat":
            raw[at:at] = raw[at:at + length * 8]
        elif kind == "header_word" and len(raw) >= 1024:  # an int32 word of the MRC header (or of the text)
            word = (position % 56) * 4
            raw[word:word + 4] = np.int32([0, -1, 2**31 - 1, 2**20, byte, -byte, 4097, 10**6][length % 8]).tobytes()
    return bytes(raw)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """A valid seed (MRC or STAR) after a few byte-level mutations, or binary junk under either suffix."""
    seeds = seed_files()
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([".mrcs", ".star", ".mrc"])), draw(st.binary(max_size=4096)), "in"
    suffix, data = seeds[draw(st.sampled_from(sorted(seeds)))]
    ops = draw(st.lists(_MUTATION, min_size=1, max_size=6))
    return suffix, mutate(data, ops), "in"


FUZZED = st.one_of(structured_mrc(), structured_star(), mutated_bytes())
"""Every fuzzed file: ``(suffix, bytes, placement)``."""


# ------------------------------------------------------------------------------- the watched tree
def make_tree(base: Path) -> tuple[Path, Path]:
    """The watched tree ``base/watch`` (valid stacks, a symlink out, a FIFO) and ``base/outside``."""
    root, outside = base / "watch", base / "outside"
    (root / "stacks").mkdir(parents=True)
    outside.mkdir()
    (root / "stacks" / "s1.mrcs").write_bytes(valid_stack(seed=10))
    (root / "stacks" / "s2.mrcs").write_bytes(valid_stack(mode=1, order=">", seed=11))
    (root / "stacks" / "with space.mrcs").write_bytes(valid_stack(seed=12))
    (root / "stacks" / "big.mrcs").write_bytes(valid_stack(box=2 * BOX, seed=13))
    nan = bytearray(valid_stack(seed=14))
    nan[1024 + 4 * BOX * BOX:1024 + 4 * BOX * BOX + 4] = np.float32(np.nan).tobytes()  # image 2 has a NaN
    (root / "stacks" / "nan.mrcs").write_bytes(bytes(nan))
    (outside / "secret.mrcs").write_bytes(valid_stack(seed=15))
    (root / "link_out.mrcs").symlink_to(outside / "secret.mrcs")
    os.mkfifo(root / "stacks" / "fifo.mrcs")
    (root / "stacks" / "loop.mrcs").symlink_to("loop.mrcs")
    return root, outside


def materialise(root: Path, outside: Path, k: int, suffix: str, data: bytes, placement: str) -> Path:
    """Write fuzzed file ``k`` into the tree (placeholders of STAR image names filled in); its path."""
    path = root / f"fuzz_{k:06d}{suffix}"
    if suffix == ".star":
        data = (data.replace(b"{root}", os.fsencode(root)).replace(b"{outside}", os.fsencode(outside))
                .replace(b"{self}", os.fsencode(path.name)))
    if placement == "symlink_out":
        target = outside / path.name
        target.write_bytes(data)
        path.symlink_to(target)
    elif placement == "symlink_loop":
        path.symlink_to(path.name)
    elif placement == "symlink_in":
        target = root / "stacks" / f".target_{path.name}"
        target.write_bytes(data)
        path.symlink_to(target)
    else:
        path.write_bytes(data)
    return path


def remove(path: Path) -> None:
    """Remove a fuzzed file and what its symlink points at (never the tree's own files)."""
    if path.is_symlink():
        target = path.parent / os.readlink(path)  # relative links are relative to the link's folder
        path.unlink()
        if target.name.startswith(("fuzz_", ".target_fuzz_")):
            target.unlink(missing_ok=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- feeding the readers
class BadOutput(AssertionError):
    """A reader returned data that breaks its contract (not an error it raised)."""


_REASONS = [  # (class, pattern of the message after the file's path); the first match names the class
    ("missing file", r"file not found|missing stack"),
    ("MRC: shorter than a header", r"shorter than an MRC header"),
    ("MRC: machine stamp", r"machine stamp"),
    ("MRC: dimensions not positive", r"not all positive"),
    ("MRC: image side over the cap", r"px images; at most"),
    ("MRC: stack of volumes", r"stack of volumes"),
    ("MRC: too many images", r"images; at most .* per stack"),
    ("MRC: map over the cap", r"px a side are read"),
    ("MRC: extended header", r"extended header"),
    ("MRC: Fourier-space mode", r"holds Fourier-space data"),
    ("MRC: unknown mode", r"[Mm]ode .*(is not read|not supported|unrecognised|Unrecognised)"),
    ("MRC: truncated", r"truncated|bytes, the file has"),
    ("MRC: bytes after the data", r"bytes after the data"),
    ("MRC: map field", r"[Mm]ap ID string|map field"),
    ("MRC: not square or not a stack", r"square images|cubic volume|shape"),
    ("MRC: 3D map", r"3D map"),
    ("MRC: header", r"not a readable MRC file"),
    ("STAR: columns", r"missing required column|appears twice|column .* must"),
    ("no pixel size", r"no pixel size|pixel size .*(must|differs|positive)|rlnImagePixelSize|rlnPixelSize|"
                      r"rlnMagnification|rlnDetectorPixelSize"),
    ("session geometry", r"differs from the session|larger than a session map may be"),
    ("STAR: unreadable", r"not a readable STAR file|not a STAR file|not UTF-8|cannot be decoded"),
    ("STAR: no particle block", r"no data_particles block|particle block is empty"),
    ("STAR: columns", r"missing required column|duplicate column|column"),
    ("STAR: optics groups", r"optics group|data_optics"),
    ("STAR: image name", r"rlnImageName|not of the form"),
    ("STAR: index out of range", r"holds images|image \d+ requested"),
    ("STAR: stack outside the tree", r"outside the watched directory|a symlink to"),
    ("STAR: box mismatch", r"has box|does not match the stacks' box|box \d+ px"),
    ("STAR: angles", r"rlnAngle"),
    ("STAR: CTF", r"defocus|CTF|rlnDefocus|rlnVoltage|rlnSphericalAberration|rlnAmplitudeContrast"),
    ("STAR: half sets", r"rlnRandomSubset"),
    ("STAR: origins", r"rlnOrigin"),
    ("name rule", r"its name has|stack '.*' has"),
    ("not a particle file", r"not a particle file"),
    ("not a regular file", r"not a regular file|special file"),
]


def reason_class(message: str) -> str:
    """The class of a rejection message (``"unclassified"`` if no pattern of ``_REASONS`` matches)."""
    for name, pattern in _REASONS:
        if re.search(pattern, message):
            return name
    return "unclassified"


def _check_chunk(chunk: object, box: int) -> int:
    images = chunk.images
    if images.dtype.is_floating_point is False or images.ndim != 3 or tuple(images.shape[1:]) != (box, box):
        raise BadOutput(f"images of shape {tuple(images.shape)} {images.dtype}, box {box} expected")
    if len(images) and not bool(images.isfinite().all()):
        raise BadOutput("a non-finite pixel came back")
    if len(images) and float(images.abs().max()) > MAX_PIXEL_MAGNITUDE:
        raise BadOutput("a pixel beyond the pixel policy came back")
    if len(chunk.rows) != len(images) or len(chunk.indices) != len(images) or len(chunk.half_sets) != len(images):
        raise BadOutput("rows, indices and images disagree")
    if len(images) and not bool(((chunk.half_sets == 1) | (chunk.half_sets == 2)).all()):
        raise BadOutput("a half set other than 1 or 2")
    return len(images)


def _check_source(source: ParticleSource) -> None:
    if not (source.box >= 1 and np.isfinite(source.apix) and source.apix > 0):
        raise BadOutput(f"box {source.box}, pixel size {source.apix} accepted")
    if source.ctf is not None:
        for name in ("defocus_u_angstrom", "voltage_kv", "spherical_aberration_mm", "amplitude_contrast"):
            values = getattr(source.ctf, name, None)
            if values is not None and not bool(values.isfinite().all()):
                raise BadOutput(f"a non-finite CTF value ({name}) accepted")


def daemon_read(path: Path, root: Path, geometry: SessionGeometry | None) -> tuple[int, int]:
    """What ``Daemon._read`` does with one file: ``(images taken, images skipped)``; Rejected/NotParticles raise."""
    source, _ = plan_particle_file(path, root, geometry, IngestJournal())
    _check_source(source)
    taken = skipped = 0
    try:
        for chunk in source.chunks(READ_CHUNK):
            taken += _check_chunk(chunk, source.box)
            skipped += len(chunk.skipped)
    except ParticleFileError as exc:  # the daemon rejects the file then (daemon/pipeline.py)
        raise Rejected(str(exc)) from None
    return taken, skipped


def offline_reads(path: Path, root: Path) -> None:
    """The offline readers on the same file (each must return valid data or raise ParticleFileError)."""
    if path.suffix.lower() == ".star":
        for call in (lambda: read_particles(path, root=root), lambda: read_particles(path, apix=APIX)):
            with contextlib.suppress(ParticleFileError):
                table = call()
                if table.has_poses:
                    rotations = table.rotations()
                    if not bool(rotations.isfinite().all()):
                        raise BadOutput("non-finite rotations")
                if not bool(table.origins_angstrom().isfinite().all()):
                    raise BadOutput("non-finite origins")
                table.ctf()
                table.half_sets()
                source, _ = ParticleSource.from_star(path, table=table).finite(size=READ_CHUNK, warn=False)
                _check_source(source)
        return
    for call in (lambda: check_header(path), lambda: stack_shape(path), lambda: read_images(path),
                 lambda: read_images(path, np.array([1, 2])), lambda: typical_image_rms(path),
                 lambda: read_volume(path),
                 lambda: ParticleSource.from_stack(path, apix=APIX).finite(size=READ_CHUNK, warn=False)):
        with contextlib.suppress(ParticleFileError):
            call()


@dataclass
class Outcome:
    """What the readers made of one file."""

    status: str  # "accepted", "rejected", "not particles" or "uncaught"
    reason: str = ""
    message: str = ""
    images: int = 0
    skipped: int = 0
    peak_bytes: int = 0
    trace: str = ""


def clear(message: str, path: Path) -> bool:
    """A clear rejection: one line that names the file (its name) and says something after it."""
    return "\n" not in message and path.name in message and len(message.split(path.name, 1)[-1].strip(" :")) > 3


def feed(path: Path, root: Path, geometry: SessionGeometry | None, offline: bool = True) -> Outcome:
    """Feed one file to the daemon's readers (then the offline ones); never raises."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a reader's warning is an error too: it must say so in one line
            try:
                taken, skipped = daemon_read(path, root, geometry)
                outcome = Outcome("accepted", images=taken, skipped=skipped)
            except NotParticles as exc:
                outcome = Outcome("not particles", "MRC: 3D map", str(exc))
            except (Rejected, ParticleFileError) as exc:
                outcome = Outcome("rejected", reason_class(str(exc)), str(exc))
                if not clear(str(exc), path):
                    outcome.reason = "unclear: " + outcome.reason
            if offline:
                offline_reads(path, root)
    except Exception as exc:  # noqa: BLE001 - what the campaign counts
        outcome = Outcome("uncaught", f"{type(exc).__name__}", str(exc)[:300], trace=traceback.format_exc())
    outcome.peak_bytes = tracemalloc.get_traced_memory()[1] - base
    return outcome


@dataclass
class Tally:
    """The campaign's counts."""

    tried: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    reasons: collections.Counter = field(default_factory=collections.Counter)
    uncaught: collections.Counter = field(default_factory=collections.Counter)
    traces: list[str] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    peak_bytes: int = 0
    over_cap: int = 0
    images_taken: int = 0
    images_skipped: int = 0
    by_generator: collections.Counter = field(default_factory=collections.Counter)

    def add(self, outcome: Outcome, generator: str) -> None:
        """Count one outcome."""
        self.tried += 1
        self.by_generator[generator] += 1
        self.by_status[outcome.status] += 1
        self.peak_bytes = max(self.peak_bytes, outcome.peak_bytes)
        self.over_cap += outcome.peak_bytes > ALLOCATION_CAP
        self.images_taken += outcome.images
        self.images_skipped += outcome.skipped
        if outcome.status in ("rejected", "not particles"):
            self.reasons[outcome.reason] += 1
            self.examples.setdefault(outcome.reason, outcome.message[:240])
        elif outcome.status == "uncaught":
            key = f"{outcome.reason}: {outcome.message[:120]}"
            self.uncaught[key] += 1
            if len(self.traces) < 5:
                self.traces.append(outcome.trace)


def huge_claim_is_refused(base: Path) -> dict[str, object]:
    """A header claiming 10^6 x 10^5 x 10^5 voxels (and the others below) is refused before reading.

    Each file is a header plus 4 KiB; the claim must be refused with its reason and the readers may
    allocate no more than 1 MiB for it (tracemalloc). Returns what was seen per file.
    """
    claims = {"1e6 x 1e5 x 1e5": (10**6, 10**5, 10**5), "4096 x 4096 x 2^31-1": (4096, 4096, 2**31 - 1),
              "16 x 16 x 1e9 (sparse file of the claimed size)": (16, 16, 10**9)}
    seen = {}
    root = base / "claims"
    root.mkdir()
    for label, (nx, ny, nz) in claims.items():
        path = root / f"claim_{nx}_{ny}_{nz}.mrcs"
        path.write_bytes(mrc_bytes({"nx": nx, "ny": ny, "nz": nz, "mode": 2}, bytes(4096)))
        if "sparse" in label:
            os.truncate(path, 1024 + nx * ny * nz * 4)  # 1 TB of holes: the file really is that size
        tracemalloc.reset_peak()
        base_bytes = tracemalloc.get_traced_memory()[0]
        try:
            plan_particle_file(path, root, None, IngestJournal())
            message = "accepted"
        except (Rejected, ParticleFileError) as exc:
            message = str(exc)
        peak = tracemalloc.get_traced_memory()[1] - base_bytes
        path.unlink()
        assert message != "accepted" and clear(message, path), f"{label}: {message}"
        assert peak < 2**20, f"{label}: {peak} bytes allocated before refusing"
        seen[label] = {"refused": message.split(": ", 1)[-1], "peak_bytes": peak}
    return seen


def largest_stack_stays_under_the_cap(base: Path) -> dict[str, object]:
    """A valid stack of the largest box a session takes (MAX_VOLUME_SIDE px: its first file fixes the map's side),
    100 images in a sparse file (400 MiB of zeros, more than one CHUNK_BYTES), read as the daemon reads it: the peak
    allocation (tracemalloc) must stay within ALLOCATION_CAP."""
    side, n = MAX_VOLUME_SIDE, 100
    root = base / "largest"
    root.mkdir()
    path = root / "largest.mrcs"
    path.write_bytes(mrc_bytes({"nx": side, "ny": side, "nz": n, "mode": 2, "mx": side, "my": side, "mz": 1,
                                "cella": APIX * side}, b""))
    os.truncate(path, 1024 + side * side * n * 4)
    tracemalloc.reset_peak()
    base_bytes = tracemalloc.get_traced_memory()[0]
    taken, skipped = daemon_read(path, root, None)
    peak = tracemalloc.get_traced_memory()[1] - base_bytes
    path.unlink()
    assert taken + skipped == n and peak <= ALLOCATION_CAP, (taken, skipped, peak)
    return {"side_px": side, "images": n, "taken": taken, "peak_bytes": peak}


def campaign(n: int, seed: int, offline: bool = True, progress: bool = True, keep: Path | None = None,
             ) -> tuple[Tally, dict[str, object]]:
    """Generate ``n`` fuzzed files (hypothesis, seeded) and feed each to the readers; the inputs that raise an
    uncaught exception are copied to ``keep`` (their placement in the tree is not kept)."""
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="fuzz_readers_") as tmp:
        root, outside = make_tree(Path(tmp))
        claims = huge_claim_is_refused(Path(tmp))
        claims["largest stack read"] = largest_stack_stays_under_the_cap(Path(tmp))
        start = time.perf_counter()

        @hypothesis_seed(seed)
        @settings(max_examples=n, database=None, deadline=None, derandomize=False, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(FUZZED, st.sampled_from([None, None, SessionGeometry(BOX, APIX)]))
        def run(spec: tuple[str, bytes, str], geometry: SessionGeometry | None) -> None:
            suffix, data, placement = spec
            k = tally.tried
            path = materialise(root, outside, k, suffix, data, placement)
            try:
                generator = "star" if suffix == ".star" else "mrc"
                outcome = feed(path, root, geometry, offline)
                tally.add(outcome, generator)
                if outcome.status == "uncaught" and keep is not None:  # the input, to replay and keep as a test
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{k:06d}{suffix}").write_bytes(data)
            finally:
                remove(path)
            if progress and tally.tried % 500 == 0:
                print(f"  {tally.tried} files, {tally.by_status['uncaught']} uncaught, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)

        run()
    return tally, claims


def main() -> None:
    """Run the campaign, print the figures, write bench/results/fuzz_readers.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="fuzzed files to try")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (the run is reproducible)")
    parser.add_argument("--no-offline", action="store_true", help="only the daemon's readers")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz_readers.json")
    parser.add_argument("--keep-failures", type=Path, default=Path(__file__).parent / "results" / "fuzz_failures",
                        help="where inputs that raised an uncaught exception are copied")
    args = parser.parse_args()
    tracemalloc.start()
    t0 = time.perf_counter()
    tally, claims = campaign(args.n, args.seed, offline=not args.no_offline, keep=args.keep_failures)
    wall = time.perf_counter() - t0
    unclear = sum(v for k, v in tally.reasons.items() if k.startswith("unclear") or k.endswith("unclassified"))
    print(f"files tried: {tally.tried} (MRC {tally.by_generator['mrc']}, STAR {tally.by_generator['star']})")
    print(f"accepted: {tally.by_status['accepted']} ({tally.images_taken} images taken, "
          f"{tally.images_skipped} left out by the pixel policy or as repeats)")
    print(f"rejected: {tally.by_status['rejected']}; skipped as 3D maps: {tally.by_status['not particles']}")
    for reason, count in tally.reasons.most_common():
        print(f"  {count:6d}  {reason}    e.g. {tally.examples[reason][:150]!r}")
    print(f"rejections without a clear reason: {unclear}")
    print(f"uncaught exceptions: {tally.by_status['uncaught']}")
    for key, count in tally.uncaught.most_common():
        print(f"  {count:6d}  {key}")
    for trace in tally.traces[:3]:
        print(trace)
    print(f"peak allocation per input: {tally.peak_bytes / 2**20:.2f} MiB (cap {ALLOCATION_CAP / 2**20:.0f} MiB: "
          f"caps side <= {MAX_IMAGE_SIDE}, map side <= {MAX_VOLUME_SIDE}, images per stack <= {MAX_STACK_IMAGES}, "
          f"CHUNK_BYTES {CHUNK_BYTES / 2**20:.0f} MiB); inputs over the cap: {tally.over_cap}")
    largest = claims.pop("largest stack read")
    print(f"largest stack the readers take ({largest['side_px']} px x {largest['images']} images, sparse): read "
          f"with a peak of {largest['peak_bytes'] / 2**20:.0f} MiB (cap {ALLOCATION_CAP / 2**20:.0f} MiB)")
    for label, seen in claims.items():
        print(f"huge claim {label}: refused before reading ({seen['refused'][:90]}; {seen['peak_bytes']} bytes)")
    print(f"wall time: {wall:.1f} s")
    record = {"files_tried": tally.tried, "mrc_files": tally.by_generator["mrc"],
              "star_files": tally.by_generator["star"], "seed": args.seed, "offline_readers": not args.no_offline,
              "accepted": tally.by_status["accepted"], "rejected": tally.by_status["rejected"],
              "not_particles": tally.by_status["not particles"], "images_taken": tally.images_taken,
              "images_left_out": tally.images_skipped, "rejections_by_reason": dict(tally.reasons.most_common()),
              "rejection_examples": tally.examples, "unclear_rejections": unclear,
              "uncaught_exceptions": tally.by_status["uncaught"], "uncaught_by_kind": dict(tally.uncaught),
              "uncaught_tracebacks": tally.traces[:3], "peak_allocation_bytes": tally.peak_bytes,
              "allocation_cap_bytes": ALLOCATION_CAP, "inputs_over_cap": tally.over_cap,
              "huge_claims_refused": claims, "largest_stack_read": largest, "wall_seconds": round(wall, 1),
              "command": f"python bench/fuzz_readers.py --n {args.n} --seed {args.seed}"
                         + (" --no-offline" if args.no_offline else "")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if tally.by_status["uncaught"] or tally.over_cap or unclear else 0)


if __name__ == "__main__":
    main()

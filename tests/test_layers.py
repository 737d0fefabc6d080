"""The layers of docs/ARCHITECTURE.md hold in the code: import-linter's contracts (pyproject.toml,
``[tool.importlinter]``) pass, every module has a layer, and an upward import or a cycle fails them with the
offending import named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def lint(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts (pyproject.toml in its folder) over the package in ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([LINT, "--no-cache"], cwd=ROOT, env=env,   # reads ROOT/pyproject.toml
                          capture_output=True, text=True, timeout=300)


def copy_of_package(tmp_path: Path) -> Path:
    """The package's Python files in ``tmp_path/src`` (the weights and data stay behind)."""
    target = tmp_path / "src"
    shutil.copytree(SRC / "characonsist", target / "characonsist",
                    ignore=lambda folder, names: [n for n in names if not n.endswith(".py")
                                                  and not (Path(folder) / n).is_dir() or n == "__pycache__"])
    return target


def add_import(module: Path, line: str) -> None:
    """Append ``line`` inside a function at the end of ``module`` (an import in a function counts like any)."""
    module.write_text(module.read_text() + f"\n\ndef _added():\n    {line}\n")


def test_the_contracts_hold():
    result = lint(SRC)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_every_module_has_its_layer():
    """A new module must be placed in docs/ARCHITECTURE.md's picture (and the layers contract) to be checked."""
    import grimp

    tomllib = pytest.importorskip("tomllib")     # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for part in layer.split("|") for m in part.split(":")}
    graph = grimp.build_graph("characonsist", cache_dir=None)
    packages = {"characonsist", "characonsist.toy"}      # their __init__ only hands names on
    homeless = sorted(m for m in graph.modules if m not in packages
                      and not any(m == n or m.startswith(n + ".") for n in named))
    assert not homeless, f"modules in no layer of pyproject.toml's contract: {homeless}"


def test_an_upward_import_fails_naming_it(tmp_path):
    """``import characonsist.app`` in the engine (library -> application) breaks the layers (and makes a cycle)."""
    src = copy_of_package(tmp_path)
    assert lint(src).returncode == 0
    add_import(src / "characonsist" / "engine.py", "import characonsist.app")
    result = lint(src)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "characonsist.engine -> characonsist.app" in result.stdout


def test_a_cycle_inside_one_layer_fails_naming_it(tmp_path):
    """mask.py and match.py share a layer (the layers contract allows either to import the other); the cycle
    contract refuses both at once."""
    src = copy_of_package(tmp_path)
    add_import(src / "characonsist" / "mask.py", "from . import match")
    add_import(src / "characonsist" / "match.py", "from . import mask")
    result = lint(src)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "front ends > application > library: each layer imports only the layers below it KEPT" in out
    assert "no import cycles" in out and "BROKEN" in out
    assert "No cycles are allowed in characonsist." in out
    assert ".match -> .mask (1 import)" in out or ".mask -> .match (1 import)" in out

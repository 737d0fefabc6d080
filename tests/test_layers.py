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

# CI (scripts/test.sh installs the test extra) fails instead of skipping when it is missing
pytestmark = pytest.mark.skipif(LINT is None and not os.environ.get("CI"),
                                reason="import-linter is not installed (pip install -e '.[test]')")


def lint(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts (pyproject.toml in its folder) over the package in ``src``."""
    assert LINT is not None, "lint-imports is missing: pip install -e '.[test]' (import-linter)"
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


# The one place that says which imports may stay inside a function (docs/ARCHITECTURE.md points here): an optional
# extra that may be missing, or a slow dependency that the light modules (the command line, the input rules, the
# application layer, the UI's start) must not pay for when a command does not need it; and a module of the package
# that itself imports one of these at its top. Every other import stands at the top of its module.
OPTIONAL = {"starlette", "uvicorn", "ray", "onnx", "onnxruntime", "scipy", "torchao", "peft", "bitsandbytes", "psutil",
            "msvcrt", "tomllib", "selenium"}
SLOW = {"torch", "torchvision", "diffusers", "transformers", "huggingface_hub", "safetensors", "accelerate",
        "tokenizers"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(module: str, is_package: bool, node) -> list[str]:
    """The modules an import statement names (``from .a import b``: ``pkg.a`` and ``pkg.a.b``)."""
    import ast

    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not node.level:
        return [node.module]
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    return ([target] if node.module else []) + [f"{target}.{a.name}" for a in node.names]


def test_imports_inside_functions_are_only_optional_or_slow_ones():
    import ast

    trees = {}
    for path in sorted((SRC / "characonsist").rglob("*.py")):
        trees[_module_name(path)] = (ast.parse(path.read_text()), path.name == "__init__.py", path)

    def top_level(tree):
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.Try) or (isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test)):
                yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))

    deps = {m: {t for node in top_level(tree) for t in _targets(m, pkg, node)} for m, (tree, pkg, _) in trees.items()}
    lazy_ok: dict[str, bool] = {}

    def may_be_lazy(name: str, seen: frozenset = frozenset()) -> bool:
        """An optional or slow package, or a module of ours importing one at its top (with its parents)."""
        top = name.split(".")[0]
        if top in OPTIONAL or top in SLOW:
            return True
        if top != "characonsist" or name in seen:
            return False
        if name not in lazy_ok:
            parts = name.split(".")
            mods = [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in trees]
            lazy_ok[name] = any(may_be_lazy(t, seen | {name}) for m in mods for t in deps[m])
        return lazy_ok[name]

    found = []
    for module, (tree, pkg, path) in trees.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                            may_be_lazy(t) for t in _targets(module, pkg, node)):
                        found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "move these imports to the top of their module (tests/test_layers.py says which may stay " \
        "inside a function):\n" + "\n".join(found)

"""The one architectural rule of DESIGN.md, checked on the source with :mod:`ast`.

* ``engine/`` never imports qgis, PyQt or ``training`` (nor the plugin);
* ``training/`` never imports qgis or PyQt (nor the plugin);
* ``sarmae_qgis/`` never imports torch, torchvision, onnxruntime, rasterio, ``engine`` or
  ``training``: it talks to the engine process over JSON lines.

Every absolute import counts, including those nested in functions or ``if TYPE_CHECKING`` blocks,
and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

QT = {"qgis", "PyQt5", "PyQt6", "PyQt", "sip"}
FORBIDDEN: dict[str, set[str]] = {
    "engine": QT | {"training", "sarmae_qgis"},
    "training": QT | {"sarmae_qgis"},
    "sarmae_qgis": {"torch", "torchvision", "onnxruntime", "rasterio", "engine", "training"},
}


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Yield ``(line, dotted module name)`` for every absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside the package
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in {"import_module", "__import__"} and isinstance(arg, ast.Constant):
                if isinstance(arg.value, str) and not arg.value.startswith("."):
                    yield node.lineno, arg.value


def find_violations(root: Path, package: str) -> list[str]:
    """List ``path:line: imports X`` for each forbidden import in ``root/package``."""
    forbidden = FORBIDDEN[package]
    violations = []
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in forbidden:
                rel = path.relative_to(root).as_posix()
                violations.append(f"{rel}:{line}: imports {module}")
    return violations


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_boundary(package: str) -> None:
    """No forbidden import anywhere in the package (see DESIGN.md, "the one rule")."""
    if not (REPO_ROOT / package).is_dir():
        pytest.skip(f"{package}/ does not exist yet")
    violations = find_violations(REPO_ROOT, package)
    assert not violations, f"{package} breaks the import boundary:\n" + "\n".join(violations)


def test_checker_catches_violations(tmp_path: Path) -> None:
    """The checker sees top-level, nested, from- and importlib-style imports; not relative ones."""
    pkg = tmp_path / "sarmae_qgis"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "bad.py").write_text("import torch\n")
    (pkg / "sub" / "nested.py").write_text(
        "import os\n"
        "from . import engine\n"  # relative: the plugin's own module, allowed
        "def f():\n"
        "    from engine.models import vit\n"
        "    import importlib\n"
        "    return importlib.import_module('rasterio.windows')\n"
    )
    (pkg / "ok.py").write_text("from qgis.core import QgsMessageLog\nimport json\n")
    assert find_violations(tmp_path, "sarmae_qgis") == [
        "sarmae_qgis/bad.py:1: imports torch",
        "sarmae_qgis/sub/nested.py:4: imports engine.models",
        "sarmae_qgis/sub/nested.py:6: imports rasterio.windows",
    ]


def test_checker_engine_rules(tmp_path: Path) -> None:
    """engine may import torch but not qgis, PyQt or training."""
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "m.py").write_text("import torch\nimport PyQt5.QtCore\nfrom training import x\n")
    assert find_violations(tmp_path, "engine") == [
        "engine/m.py:2: imports PyQt5.QtCore",
        "engine/m.py:3: imports training",
    ]


def test_plugin_imports_without_engine_dependencies() -> None:
    """Importing every plugin module pulls in none of the engine's heavy packages (transitively)."""
    blocked = sorted(FORBIDDEN["sarmae_qgis"])
    modules = sorted(
        ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO_ROOT / "sarmae_qgis").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    code = (
        "import importlib, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        f"for mod in {modules!r}:\n"
        "    importlib.import_module(mod)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

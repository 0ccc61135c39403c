"""Boundaries the design depends on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_service_source_never_imports_torch_or_training() -> None:
    offenders = {
        str(path.relative_to(SERVICE.parent)): sorted(
            _imported_roots(path) & {"torch", "torchvision", "training"}
        )
        for path in sorted(SERVICE.rglob("*.py"))
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"service/ must run without torch or training code: {offenders}"


def test_importing_every_service_module_loads_no_torch() -> None:
    modules = [
        ".".join(path.relative_to(SERVICE.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted(SERVICE.rglob("*.py"))
    ]
    assert modules, "service/ has no modules"
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing service/ pulled in {result.stdout.strip()}"

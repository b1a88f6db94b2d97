"""The import direction of docs/contracts.md, enforced: core <- stages <- command line.

Every ``import`` and ``from ... import`` in the project's packages is read with :mod:`ast`, the ones
inside functions included (a lazy import is still a dependency), and so are string literals that
run a module with ``-m`` (``python -m muse_cli`` from a stage would hide a cycle in a subprocess).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "muse"
STAGES = ("indexer", "retriever", "ranker")
CLI = "muse_cli"
PACKAGES = (CORE, *STAGES, CLI)

#: package -> packages it must never import.
FORBIDDEN: dict[str, set[str]] = {
    CORE: {*STAGES, CLI},
    "indexer": {CLI, "ranker"},
    "retriever": {CLI, "indexer", "ranker"},
    "ranker": {CLI, "indexer"},
}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _dependencies(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import and every ``-m PACKAGE`` string in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call):
            # importlib.import_module("pkg.mod") and subprocess argv lists ["-m", "pkg.mod", ...]
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name == "import_module" and args:
                found.add((args[0].split(".")[0], node.lineno))
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for i, item in enumerate(items[:-1]):
                if item == "-m" and isinstance(items[i + 1], str):
                    found.add((items[i + 1].split(".")[0], node.lineno))
    return found


def test_every_package_is_scanned():
    for package in PACKAGES:
        assert _modules(package), f"no modules found under {package}/"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str):
    bad = []
    for path in _modules(package):
        for dep, line in sorted(_dependencies(path)):
            if dep in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses {dep}")
    assert not bad, f"{package} must not depend on {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_the_scanner_sees_lazy_imports_and_module_runs(tmp_path: Path):
    """The checker itself must catch the forms it exists for, or the test above cannot fail."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "def f():\n"
        "    from indexer.sources import x\n"
        "    import ranker.data\n"
        "    cmd = [sys.executable, '-m', 'muse_cli', 'worker']\n"
        "    importlib.import_module('retriever.client')\n"
    )
    deps = {d for d, _ in _dependencies(sample)}
    assert {"os", "indexer", "ranker", "muse_cli", "retriever"} <= deps

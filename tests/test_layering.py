"""Package layering: `live` → `engine` ← `export`, and no package reaches into another's privates.

`engine` runs models and owns the TensorRT engine cache; `export` makes models and builds
engines through `engine.runtime`'s public names; `live` runs the daemon on `engine` alone. A
module whose name starts with `_` is private to its package: other packages (and `benchmarks`)
import the names its package's `__init__` re-exports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("live", "engine", "export", "benchmarks")
FORBIDDEN = {"engine": ("export", "live"), "live": ("export",), "export": ("live",)}
"""Packages each package must never import (the arrows only point one way)."""


def _modules() -> Iterator[tuple[str, Path]]:
    """Yield (package, file) for every Python file of the checked packages."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield package, path


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line, absolute module, imported names) for each import in `path` (also in functions).

    Relative imports stay inside their package and are left out.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def _private(part: str) -> bool:
    """Say whether a module or attribute name is private (`_x`, not a dunder like `__main__`)."""
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_checked_packages_exist() -> None:
    found = {package for package, _ in _modules()}
    assert found == set(PACKAGES)


def test_dependencies_point_one_way() -> None:
    bad = [
        f"{_where(path, line)} imports {module}"
        for package, path in _modules()
        for line, module, _ in _imports(path)
        if module.split(".")[0] in FORBIDDEN.get(package, ())
    ]
    assert not bad, "\n".join(bad)


def test_no_private_module_of_another_package_is_imported() -> None:
    bad = []
    for package, path in _modules():
        for line, module, names in _imports(path):
            top, *rest = module.split(".")
            if top == package or top not in PACKAGES:
                continue
            private = [p for p in rest if _private(p)] + [n for n in names if _private(n)]
            if private:
                bad.append(f"{_where(path, line)} imports {module} ({', '.join(private)})")
    assert not bad, "\n".join(bad)


def test_daemon_imports_stay_light() -> None:
    code = (
        "import sys, engine.runtime, live.run\n"
        "print(sorted(m for m in ('torch', 'tensorrt') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"engine.runtime, live.run imported {out.stdout.strip()}"

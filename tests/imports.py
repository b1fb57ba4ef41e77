"""The project's static import graph (``ast``, no code is run): modules, files and closures.

Used by tests/test_layout.py (layers, circles, stage deps) and printable for a human:
``python -m tests.imports stages.train`` lists the files a module needs.
Every import counts, at module level or inside a function: a lazy import still runs when
that code path does, so DVC must see it and the layers must allow it.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_inits(module: str) -> list[Path]:
    """The ``__init__.py`` files Python runs before ``module`` (its parent packages)."""
    parts = module.split(".")
    found = (module_file(".".join(parts[:i])) for i in range(1, len(parts)))
    return [f for f in found if f is not None and f.name == "__init__.py"]


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Project modules ``module`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in ("stages", "tests", "bench"))
    return frozenset(m for m in out if module_file(m) is not None and m != module)


def closure_files(module: str) -> set[Path]:
    """Every project file that importing (or running) ``module`` can execute."""
    seen: set[str] = set()
    todo = [module]
    files: set[Path] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod)
        if path is None:
            continue
        files.add(path)
        files.update(package_inits(mod))
        todo.extend(direct_imports(mod))
        todo.extend(module_name(p) for p in package_inits(mod))
    return files


def project_modules(root: str = "stages") -> list[str]:
    return sorted(module_name(p) for p in (REPO / root).rglob("*.py"))


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name)
        for f in sorted(closure_files(name)):
            print("  ", f.relative_to(REPO).as_posix())

"""The tests use migrator's public names only, and share helpers through helper modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every ``from X import name`` in tests/ and benchmarks/."""
    found = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found += [(str(path.relative_to(ROOT)), node.module, alias.name)
                          for alias in node.names]
    return found


def test_no_test_imports_a_private_name_of_migrator() -> None:
    private = [f"{file}: {module}.{name}" for file, module, name in imports()
               if module.split(".")[0] == "migrator"
               and (name.startswith("_") or any(part.startswith("_")
                                                for part in module.split(".")[1:]))
               and not name.startswith("__")]
    assert not private, private


def test_no_module_imports_from_a_test_module() -> None:
    from_tests = [f"{file}: {module}" for file, module, _ in imports()
                  if module.startswith("tests.")
                  and module.rsplit(".", 1)[-1].startswith("test_")]
    assert not from_tests, from_tests

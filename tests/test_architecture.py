"""Architecture rules from DESIGN.md and STYLE.md, enforced on every run.

- ``proxy`` and ``control_plane`` never import each other;
- the data plane never imports asyncpg or stripe (it never talks to Postgres or Stripe);
- ``shared`` is pure code: stdlib without I/O, and orjson (``shared/monitoring.py``, the
  services' Sentry start-up, alone may import ``sentry_sdk``);
- the environment is read only in each service's ``settings.py``;
- no module grows past 600 lines;
- ruff and mypy --strict are clean (the same as ``make lint``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "control_plane", "shared")

SHARED_ALLOWED = {
    "__future__", "dataclasses", "decimal", "re", "secrets", "time", "typing", "uuid", "zlib",
    "orjson", "shared", "collections", "enum", "datetime",
}
# shared/monitoring.py starts the Sentry SDK for both services' start-up (one init, one
# scrubber); nothing else in shared may import it.
SHARED_EXTRA = {"monitoring.py": {"sentry_sdk", "logging"}}
FORBIDDEN = {
    "proxy": {"control_plane", "asyncpg", "stripe"},
    "control_plane": {"proxy"},
}


def _modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_services_do_not_import_what_they_must_not(package: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if name in FORBIDDEN[package]
    ]
    assert found == []


def test_shared_is_pure_code() -> None:
    found = []
    for path in _modules("shared"):
        for line, name in _imports(path):
            if name not in SHARED_ALLOWED | SHARED_EXTRA.get(path.name, set()):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in {"open", "print", "input"}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {node.func.id}()")
    assert found == []


def test_environment_is_read_only_in_settings() -> None:
    found = []
    for package in PACKAGES:
        for path in _modules(package):
            if path.name == "settings.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"} \
                        and isinstance(node.value, ast.Name) and node.value.id == "os":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_no_module_is_past_600_lines() -> None:
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for package in (*PACKAGES, "devstack", "benchmarks")
        for p in _modules(package)
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert big == []


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *PACKAGES],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

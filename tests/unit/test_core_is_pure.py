"""controlplane.core takes data and returns data: no Docker, no web, no sockets, no threads,
no processes, no files, no clock. Checked on the source, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import controlplane.core

CORE = Path(controlplane.core.__file__).parent
MODULES = sorted(CORE.glob("*.py"))

FORBIDDEN = frozenset(
    {
        "docker",
        "flask",
        "dnslib",
        "requests",
        "httpx",
        "socket",
        "socketserver",
        "ssl",
        "selectors",
        "threading",
        "_thread",
        "multiprocessing",
        "concurrent",
        "subprocess",
        "asyncio",
        "os",
        "shutil",
        "pathlib",
        "tempfile",
        "time",
        "urllib",
        "http",
    }
)
# The core may use its own package and the error root; the edges depend on it, not the reverse.
ALLOWED_OWN = ("controlplane.core", "controlplane.errors")


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: use absolute imports"
            found.append((node.lineno, node.module or ""))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            found.append((node.lineno, "__import__"))
    return found


def test_core_modules_are_found() -> None:
    assert {p.stem for p in MODULES} >= {
        "model",
        "labels",
        "observe",
        "lifecycle",
        "build",
        "render",
    }


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_core_module_imports_nothing_impure(path: Path) -> None:
    bad = []
    for line, module in imports(path):
        top = module.split(".")[0]
        if module in ("__import__", "importlib") or top in FORBIDDEN:
            bad.append(f"{path.name}:{line}: {module}")
        elif top == "controlplane" and not module.startswith(ALLOWED_OWN):
            bad.append(f"{path.name}:{line}: {module} (an edge module)")
    assert bad == []


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import os", True),
        ("import docker.errors", True),
        ("from time import monotonic", True),
        ("def f():\n    import socket", True),
        ("from controlplane.reconciler import x", True),
        ("import jinja2", False),
        ("import ipaddress", False),
        ("from controlplane.errors import InvalidValue", False),
    ],
    ids=[
        "os",
        "docker-submodule",
        "from-time",
        "lazy-socket",
        "edge",
        "jinja2",
        "stdlib-pure",
        "errors",
    ],
)
def test_the_check_itself(tmp_path: Path, source: str, caught: bool) -> None:
    module = tmp_path / "m.py"
    module.write_text(source + "\n", encoding="utf-8")
    if caught:
        with pytest.raises(AssertionError):
            test_core_module_imports_nothing_impure(module)
    else:
        test_core_module_imports_nothing_impure(module)

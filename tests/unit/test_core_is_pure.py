"""controlplane.core takes data and returns data: no Docker, no web, no sockets, no threads,
no processes, no files, no clock, and no state of its own. Checked on the source, so a lazy
import inside a function counts too, and a memo must be an object its user owns (and bounds),
never a module-level cache shared by every caller in the process."""

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


# ---------------------------------------------------------------- no state of its own

MEMO_DECORATORS = frozenset({"cache", "lru_cache"})
"""functools' process-wide memos: bounded by a count, never by what is alive, and shared by
every caller."""
IMMUTABLE_MAKERS = frozenset(
    {
        "frozenset",
        "tuple",
        "str",
        "int",
        "float",
        "bytes",
        "bool",
        "re.compile",
        "operator.attrgetter",
        "operator.itemgetter",
        "TypeVar",
        "field",
    }
)
"""Calls whose result can't be changed (a tuple or frozenset made by a call is taken as it is:
its elements are not looked into). `field` declares a dataclass field: each instance gets its
own value. A read-only `MappingProxyType` is allowed around a dict literal, which nothing
else can reach."""


def frozen_classes(paths: list[Path]) -> frozenset[str]:
    """The core's classes whose instances can't be changed: frozen dataclasses, NamedTuples
    and enums. Calling one at import time (e.g. for a default argument) keeps no state."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            frozen_dataclass = any(
                isinstance(d, ast.Call)
                and ast.unparse(d.func).endswith("dataclass")
                and any(
                    k.arg == "frozen" and isinstance(k.value, ast.Constant) and k.value.value
                    for k in d.keywords
                )
                for d in node.decorator_list
            )
            if frozen_dataclass or bases & {"NamedTuple", "Enum", "StrEnum", "IntEnum"}:
                found.add(node.name)
    return frozenset(found)


FROZEN_CLASSES = frozen_classes(MODULES)


def immutable(node: ast.expr) -> bool:
    """Whether the value an expression makes at import time can't be changed afterwards.
    A name or attribute refers to a value checked where it is made; a subscript at import
    time is a type alias."""
    if isinstance(node, ast.Constant | ast.JoinedStr | ast.Name | ast.Attribute | ast.Subscript):
        return True
    if isinstance(node, ast.Compare | ast.Lambda):
        return True
    if isinstance(node, ast.Tuple):
        return all(immutable(e) for e in node.elts)
    if isinstance(node, ast.BinOp):
        return immutable(node.left) and immutable(node.right)
    if isinstance(node, ast.UnaryOp):
        return immutable(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(immutable(v) for v in node.values)
    if isinstance(node, ast.IfExp):
        return immutable(node.body) and immutable(node.orelse)
    if isinstance(node, ast.Call):
        name = ast.unparse(node.func)
        if name.rsplit(".", 1)[-1] == "MappingProxyType":
            return (
                len(node.args) == 1
                and isinstance(node.args[0], ast.Dict)
                and all(v is not None and immutable(v) for v in node.args[0].values)
            )
        return name in IMMUTABLE_MAKERS or name.rsplit(".", 1)[-1] in FROZEN_CLASSES
    return False


def import_time(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements a module runs when imported, through `if` and `try` blocks."""
    found = []
    for statement in body:
        if isinstance(statement, ast.If):
            found += import_time(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            blocks = [statement.body, statement.orelse, statement.finalbody]
            blocks += [handler.body for handler in statement.handlers]
            found += import_time([s for block in blocks for s in block])
        else:
            found.append(statement)
    return found


def stateful(statement: ast.stmt) -> str | None:
    """Why a statement of a module or class body keeps state, or None."""
    if isinstance(statement, ast.Assign):
        names = [n for target in statement.targets for n in ast.walk(target)]
        if not all(isinstance(n, ast.Name | ast.Tuple | ast.Store) for n in names):
            return "changes something at import time"
        value: ast.expr | None = statement.value
    elif isinstance(statement, ast.AnnAssign | ast.AugAssign):
        if not isinstance(statement.target, ast.Name):
            return "changes something at import time"
        value = statement.value
    elif isinstance(statement, ast.Expr):
        if isinstance(statement.value, ast.Constant):
            return None  # a docstring
        return "runs code with effects at import time"
    else:
        return None
    if value is not None and not immutable(value):
        return f"{ast.unparse(value)[:60]} can be changed"
    return None


def state_kept(path: Path) -> list[str]:
    """Mutable values in a module or class body, mutable default arguments, `global`, and
    functools' memos anywhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    statements = import_time(tree.body)
    statements += [s for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for s in c.body]
    for statement in statements:
        why = stateful(statement)
        if why:
            bad.append(f"{path.name}:{statement.lineno}: {why}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            bad.append(f"{path.name}:{node.lineno}: global {', '.join(node.names)}")
        elif isinstance(node, ast.ImportFrom) and node.module == "functools":
            bad += [
                f"{path.name}:{node.lineno}: functools.{a.name}"
                for a in node.names
                if a.name in MEMO_DECORATORS
            ]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "functools"
            and node.attr in MEMO_DECORATORS
        ):
            bad.append(f"{path.name}:{node.lineno}: functools.{node.attr}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            bad += [
                f"{path.name}:{d.lineno}: default {ast.unparse(d)[:60]} can be changed"
                for d in defaults
                if not immutable(d)
            ]
    return bad


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_core_module_keeps_no_state(path: Path) -> None:
    """A memo belongs to the object that uses it (e.g. build.BuildMemo, render.RenderCache),
    which bounds it by what is alive; a module-level one outlives every caller."""
    assert state_kept(path) == []


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import functools\n@functools.lru_cache(maxsize=64)\ndef f(x): return x", True),
        ("from functools import cache\n@cache\ndef f(x): return x", True),
        ("def f():\n    import functools\n    return functools.cache(len)", True),
        ("SEEN = {}", True),
        ("_seen: dict[str, int] = {}", True),
        ("NAMES = [1, 2]", True),
        ("IDS = set()", True),
        ("BY_NAME = dict(a=1)", True),
        ("TABLE = MappingProxyType(SOME_DICT)", True),
        ("PAIRS = ((1, []),)", True),
        ("if True:\n    CACHE = {}", True),
        ("class C:\n    instances = []", True),
        ("def f(seen=[]): return seen", True),
        ("def f(*, seen={}): return seen", True),
        ("def f():\n    global X\n    X = 1", True),
        ("registry.append(1)", True),
        ("TABLE['a'] = 1", True),
        ("X = compute()", True),
        ("NAMES = frozenset({'a', 'b'})", False),
        ("TABLE = MappingProxyType({'a': 1})", False),
        ("PREFIX = 'x.'\nROLE = PREFIX + 'role'", False),
        ("LIMITS = (60.0, 3600.0)\nLOW, HIGH = 1, 1000", False),
        ("import re\nNAME_RE = re.compile('[a-z]+')", False),
        ("import operator\nBY_AGE = operator.attrgetter('created')", False),
        ("Alias = tuple[int, str]", False),
        ('"""doc"""\nX = 1\n"""what X is"""', False),
        ("class C:\n    __slots__ = ('a',)\n    def __init__(self):\n        self.a = {}", False),
        ("def f(seen=None, n=(1, 2)):\n    seen = seen or {}\n    return seen", False),
        ("from functools import reduce\nX = 1", False),
    ],
    ids=[
        "lru_cache",
        "from-functools-cache",
        "cache-in-function",
        "dict-literal",
        "annotated-dict",
        "list-literal",
        "set-call",
        "dict-call",
        "proxy-of-a-shared-dict",
        "tuple-holding-a-list",
        "under-if",
        "class-attribute",
        "list-default",
        "kw-dict-default",
        "global",
        "import-time-call",
        "import-time-item",
        "unknown-call",
        "frozenset",
        "proxy-of-a-literal",
        "string-constants",
        "tuples",
        "pattern",
        "attrgetter",
        "type-alias",
        "docstrings",
        "state-per-instance",
        "immutable-defaults",
        "other-functools",
    ],
)
def test_the_state_check_itself(tmp_path: Path, source: str, caught: bool) -> None:
    module = tmp_path / "m.py"
    module.write_text(source + "\n", encoding="utf-8")
    assert bool(state_kept(module)) is caught, state_kept(module)


def test_frozen_classes_are_found() -> None:
    assert {"BuildOptions", "RenderOptions", "ContainerFacts", "Method", "Backend"} <= (
        FROZEN_CLASSES
    )
    assert "BuildMemo" not in FROZEN_CLASSES

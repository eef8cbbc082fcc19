"""The layout holds: imports flow one way (entry points → services → shared core), no
module imports itself in a circle, and no file grows past what a reader can hold."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Where each part of the one installed package lives in the repository: the services
# at the top (the design's folders, linked into hepato/), the entry points in hepato/.
ROOTS = {
    "hepato.common": REPO / "common",
    "hepato.gateway": REPO / "gateway",
    "hepato.worker": REPO / "worker",
    "hepato.cli": REPO / "hepato" / "cli",
    "hepato.bench": REPO / "hepato" / "bench",
    "hepato.client": REPO / "hepato" / "client",
    "hepato.devstack": REPO / "hepato" / "devstack",
}
# Higher imports lower, never the reverse. The two services never import each other:
# the gateway image has no model stack, and a worker serves no HTTP.
RANK = {"hepato.common": 0, "hepato.gateway": 1, "hepato.worker": 1}
ENTRY_RANK = 2
# The SDK is what a lab installs to talk to the service: it needs the API's schemas
# (common) and nothing of the services.
CLIENT_MAY_IMPORT = ("hepato.common", "hepato.client")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {"hepato": REPO / "hepato" / "__init__.py"}
    found["hepato.__main__"] = REPO / "hepato" / "__main__.py"
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def part_of(module: str) -> str:
    return next((p for p in ROOTS if module == p or module.startswith(p + ".")), "hepato")


def rank(module: str) -> int:
    return RANK.get(part_of(module), ENTRY_RANK)


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at import time) for every import in the file, nested
    ones included; `typing.TYPE_CHECKING` blocks are left out of the import-time set."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in targets:
            yield target, getattr(node, "lineno", 0), id(node) not in type_only


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """The import-time graph between the package's modules, and every import that flows
    against the layout."""
    found = modules()
    known = set(found)
    edges: dict[str, set[str]] = {m: set() for m in found}
    wrong: list[str] = []
    for module, path in found.items():
        where = path.relative_to(REPO)
        for target, line, at_import in imports(module, path, known):
            top = target.split(".")[0]
            if top in {"common", "gateway", "worker"}:
                wrong.append(f"{where}:{line} imports {target}: name it hepato.{target}")
                continue
            if top != "hepato":
                continue
            if rank(target) > rank(module):
                wrong.append(f"{where}:{line} ({part_of(module)}) imports {target} upwards")
            elif rank(target) == rank(module) == 1 and part_of(target) != part_of(module):
                wrong.append(f"{where}:{line}: a service imports the other service ({target})")
            elif part_of(module) == "hepato.client" and part_of(target) not in CLIENT_MAY_IMPORT:
                wrong.append(f"{where}:{line}: the client SDK imports {target}")
            if at_import and target in known and target != module:
                edges[module].add(target)
    return edges, wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_flow_one_way() -> None:
    _, wrong = graph()
    assert not wrong, "imports against entry points → services → common:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges, _ = graph()
    assert not cycles(edges), f"import cycles: {cycles(edges)}"


def test_the_checks_see_what_they_guard() -> None:
    """A check over an empty or wrong set of modules passes vacuously: make sure it
    covers every part, and that it catches a planted upward import and cycle."""
    edges, _ = graph()
    assert {part_of(m) for m in edges} == {*ROOTS, "hepato"}
    assert rank("hepato.common.jobs") < rank("hepato.worker.runner") < rank("hepato.cli.main")
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]


def test_no_file_over_the_limit() -> None:
    """Past this a module holds more than one concern: split it along its seams."""
    generated = REPO / "migrations" / "versions"
    roots = [*ROOTS.values(), REPO / "tests", REPO / "scripts", REPO / "migrations"]
    too_long = [
        f"{path.relative_to(REPO)} ({n} lines)"
        for root in roots
        for path in root.rglob("*.py")
        if generated not in path.parents
        for n in [len(path.read_text(encoding="utf-8").splitlines())]
        if n > MAX_LINES
    ]
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"


def test_one_name_in_site_packages() -> None:
    """The distribution installs one top-level package, ``hepato``, holding the services
    the repository keeps at its top: no ``common`` or ``worker`` to collide with."""
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    found = set(find_packages(str(REPO), **config["tool"]["setuptools"]["packages"]["find"]))
    assert {p.split(".")[0] for p in found} == {"hepato"}
    assert {*ROOTS, "hepato.worker.backends"} <= found

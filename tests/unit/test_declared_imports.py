"""Every package the code or the tests import is one pyproject.toml declares (a
dependency or an extra), or a named requirement of one that is part of its API. A
package that only happens to be installed (httpx2 came with huggingface_hub) breaks a
fresh install of the extras the import needs."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, requires

from tests.conftest import REPO

FIRST_PARTY = {"hepato", "tests", "common", "gateway", "worker"}
# Imported directly, declared by the package whose API they are part of.
TRANSITIVE = {
    "anyio": "fastapi",  # starlette's and FastAPI's concurrency
    "starlette": "fastapi",
    "urllib3": "minio",  # minio's HTTP client, configured by us
    "google": "tritonclient",  # protobuf: Triton's ModelConfig message (config.pbtxt)
    "huggingface_hub": "transformers",  # the hub client transformers loads through
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    toml = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = toml["project"]
    reqs = [
        *project["dependencies"],
        *(r for v in project["optional-dependencies"].values() for r in v),
    ]
    # The build requirements too: test_layout reads setuptools' package finder.
    reqs += toml["build-system"]["requires"]
    return {_norm(re.split(r"[\[=<>!~ ;]", r, maxsplit=1)[0]) for r in reqs}


def _imports() -> dict[str, set[str]]:
    """Top-level module imported -> the files that import it."""
    files = [*(REPO / "tests").rglob("*.py"), *(REPO / "hepato").rglob("*.py")]
    files += [p for d in ("common", "gateway", "worker") for p in (REPO / d).rglob("*.py")]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared() -> None:
    declared = _declared()
    owners = packages_distributions()
    undeclared = {}
    for module, where in _imports().items():
        dists = {_norm(d) for d in owners.get(module, [module])}
        if dists & declared:
            continue
        via = TRANSITIVE.get(module)
        if via in declared and any(
            _norm(re.split(r"[\[=<>!~ ;(]", r, maxsplit=1)[0]) in dists for r in requires(via) or []
        ):
            continue
        undeclared[module] = sorted(where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"

"""`docker compose config -q` on docker-compose.yml (it needs no engine, only the CLI
plugin). Where the plugin is missing the check cannot run, and the run says so, by a
ComposeConfigNotRun warning in pytest's summary, rather than pass in silence; the static
checks in test_compose.py run everywhere."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from typing import Any

import pytest

from tests.compose.test_compose import COMPOSE_FILE, REPO


class ComposeConfigNotRun(UserWarning):
    """`docker compose config -q` could not run here; the static checks above still did."""


def compose_config(which: Any = shutil.which) -> str | None:
    """Run `docker compose config -q`; the reason it could not run, or None if it ran
    (and passed)."""
    docker = which("docker")
    if docker is None:
        return "no `docker` on PATH"
    try:
        version = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if version.returncode != 0:
        return f"no `docker compose` plugin: {(version.stderr or version.stdout).strip()}"
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr or result.stdout
    return None


def check_compose_config(which: Any = shutil.which) -> bool:
    """Whether `docker compose config -q` ran (and passed); where it could not run, a
    ComposeConfigNotRun warning says why, in pytest's warnings summary."""
    reason = compose_config(which)
    if reason is not None:
        warnings.warn(ComposeConfigNotRun(f"docker compose config NOT run: {reason}"), stacklevel=2)
    return reason is None


def test_docker_compose_config_when_cli_available() -> None:
    """`docker compose config -q` (no engine needed) where the plugin is installed; where
    it is not, the run says so rather than pass in silence (the schema checks above run
    everywhere)."""
    check_compose_config()


def test_a_missing_docker_cli_is_reported_not_silent() -> None:
    with pytest.warns(ComposeConfigNotRun, match="NOT run: no `docker` on PATH"):
        assert not check_compose_config(which=lambda _: None)

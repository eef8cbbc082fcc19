"""The gateway's and workers' wait-for-schema initContainer, run for real: its check,
as written in the manifest, against a Postgres database before and after `hepato
migrate`. The check is Alembic's own (`alembic current --check-heads`, installed with the
package); no `hepato` command waits for the schema."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from hepato.common.migrate import run_migrations
from tests.deploy.kube import REPO, named, rendered


@pytest.fixture
def empty_database(service_env: dict[str, str]) -> Iterator[str]:
    """A new, empty database on the test Postgres; its URL."""
    url = make_url(service_env["HEPATO_DATABASE_URL"])
    name = f"hepato_wait_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wait_check(scratch: Path) -> str:
    """The loop's condition from the gateway's initContainer, with the image's
    alembic.ini (/app) swapped for this checkout's."""
    spec = named(rendered("overlays/gpu", scratch), "Deployment", "hepato-gateway")["spec"]
    script = spec["template"]["spec"]["initContainers"][0]["command"][2]
    match = re.match(r"until (.+?);\s*do ", script)
    assert match, script
    return match.group(1).replace("/app/alembic.ini", str(REPO / "alembic.ini"))


def run_check(check: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEPATO_")}
    env["HEPATO_DATABASE_URL"] = database_url
    # The venv's console scripts (alembic) first, as the image's PATH has them.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["sh", "-c", check], capture_output=True, text=True, env=env, timeout=120, cwd="/"
    )


def test_wait_holds_until_the_migrations_ran_then_lets_the_pod_start(
    empty_database: str, scratch: Path
) -> None:
    check = wait_check(scratch)
    before = run_check(check, empty_database)
    assert before.returncode != 0, before.stdout + before.stderr
    assert "not on all head revisions" in before.stdout + before.stderr
    run_migrations(empty_database)
    after = run_check(check, empty_database)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "(head)" in after.stdout


def test_wait_holds_while_postgres_is_unreachable(scratch: Path) -> None:
    unreachable = "postgresql+psycopg://hepato@127.0.0.1:9/hepato?connect_timeout=2"
    result = run_check(wait_check(scratch), unreachable)
    assert result.returncode != 0

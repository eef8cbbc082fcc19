"""Running the Alembic migrations: a step of its own (``hepato migrate``, the compose
``migrate`` service, the local stack), never a side effect of an import."""

from __future__ import annotations

from pathlib import Path

from hepato.common.exceptions import HepatoError
from hepato.common.settings import REPO_ROOT


def migrations_dir() -> Path:
    """The repository's migrations/ (a source checkout, or /app in the images), else the
    working directory's."""
    for candidate in (REPO_ROOT / "migrations", Path.cwd() / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise HepatoError("the migrations/ directory was not found")


def run_migrations(database_url: str | None = None) -> None:
    """Upgrade the database to the latest revision; the URL defaults to the settings'."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if database_url:
        config.attributes["database_url"] = database_url
    command.upgrade(config, "head")

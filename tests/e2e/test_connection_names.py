"""Each process names its Postgres connections (common.db.name_connections), so that
pg_stat_activity says which gateway or worker holds a lock or runs a statement. The
chaos suite reads the workers' names (tests/chaos/frozen.py) from a real Postgres."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from hepato.common import db
from hepato.common.settings import Settings


def test_an_engine_made_after_naming_names_its_connections(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "_application_name", None)
    db.name_connections("hepato-worker " + "é" * 60)  # not ASCII, past Postgres's 63
    assert "PGAPPNAME" not in os.environ  # which the process's children would inherit
    engine = db.get_engine.__wrapped__(settings.database_url)
    try:
        with engine.connect() as conn:
            name = conn.execute(text("SELECT current_setting('application_name')")).scalar_one()
    finally:
        engine.dispose()
    assert name == ("hepato-worker " + "?" * 60)[:63]

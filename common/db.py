"""Engine and session factories (sync SQLAlchemy 2 on psycopg 3), and the one bulk insert."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, cast, create_engine, func, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker


@lru_cache
def get_engine(url: str) -> Engine:
    # pre_ping lets every process ride out a Postgres restart without being restarted.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def insert_rows(
    conn: Connection, table: Any, per_row: dict[str, list[Any]], same: dict[str, Any]
) -> None:
    """One INSERT for any number of rows of ``table`` (a mapped class): each per-row
    column goes as one array and unnest() turns the arrays back into rows; ``same`` holds
    the values every row shares. (executemany sends an INSERT per row, and a VALUES list
    takes a parameter per column and row, past Postgres' 65,535 at a few thousand rows.)
    Every value is cast to its column's type: a bare parameter in a SELECT list, NULL
    above all, would be taken as text."""
    columns = table.__table__.c

    def typed(name: str, value: Any, *, array: bool = False) -> Any:
        kind = ARRAY(columns[name].type) if array else columns[name].type
        return cast(bindparam(f"v_{name}", value, type_=kind), kind)

    arrays = (typed(n, v, array=True) for n, v in per_row.items())
    # render_derived: "AS f(id, filename, ...)", naming unnest's output columns.
    rows = func.unnest(*arrays).table_valued(*per_row).render_derived(name="f")
    values = select(*(rows.c[n] for n in per_row), *(typed(n, v) for n, v in same.items()))
    conn.execute(insert(table).from_select([*per_row, *same], values))

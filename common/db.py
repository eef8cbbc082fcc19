"""Engine and session factories (sync SQLAlchemy 2 on psycopg 3), and the one bulk insert."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

# A pooled connection idle longer than this is pinged before it is handed out, s.
IDLE_PING_S = 1.0


# Postgres keeps at most this many characters of a connection's application_name, and
# only printable ASCII (others it shows escaped).
APPLICATION_NAME_CHARS = 63
# This process's name in pg_stat_activity (``name_connections``); None: libpq's default.
_application_name: str | None = None
# The names each process gives its connections.
GATEWAY_CONNECTIONS = "hepato-gateway"


def worker_connections(worker_id: str) -> str:
    """A worker's connections' name (the chaos suite reads them)."""
    return f"hepato-worker {worker_id}"


def name_connections(name: str) -> None:
    """Name the connections of the engines this process makes from now on, in
    ``pg_stat_activity`` (``application_name``): which process holds a lock, a long
    transaction or a running statement is one query away. Passed to each connection
    rather than through libpq's PGAPPNAME, which a process's children would inherit."""
    global _application_name
    _application_name = name.encode("ascii", "replace").decode()[:APPLICATION_NAME_CHARS]


@lru_cache
def get_engine(url: str, *, synchronous_commit: bool = True) -> Engine:
    """The process's engine for ``url``. ``synchronous_commit=False``: its commits return
    before their WAL is on disk (Postgres's ``synchronous_commit = off``), for writes
    that a Postgres crash may undo without harm (the worker's claim: worker.runner)."""
    connect_args: dict[str, str] = {}
    if not synchronous_commit:
        connect_args["options"] = "-c synchronous_commit=off"
    if _application_name is not None:
        connect_args["application_name"] = _application_name
    engine = create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)
    _ping_when_idle(engine, IDLE_PING_S)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pre-ping, only for connections that sat idle: every process rides out a Postgres
    restart without being restarted, and a busy one does not pay a round trip per
    transaction for it. A connection that broke while in use fails its statement;
    SQLAlchemy then drops the whole pool (a disconnect invalidates it), and the caller's
    retry, or the client's, gets fresh connections."""

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _handed_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return
        try:
            dbapi_connection.execute("SELECT 1")  # psycopg 3: a cursor of its own
            dbapi_connection.rollback()
        except Exception as exc:
            # The pool discards this connection and checks out another (the recipe of
            # SQLAlchemy's "pessimistic disconnect handling").
            raise DisconnectionError(str(exc)) from exc


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def unnest_rows(
    table: Any, per_row: dict[str, list[Any]], types: dict[str, Any] | None = None
) -> Any:
    """Rows as a derived table ``v`` with one column per key of ``per_row``: each column
    goes as one array parameter and unnest() turns the arrays back into rows, whatever
    their number. Each array is cast to its column's type (or ``types``' override)."""
    columns = table.__table__.c
    kinds = {name: (types or {}).get(name, columns[name].type) for name in per_row}
    arrays = (
        cast(bindparam(f"v_{name}", values, type_=ARRAY(kinds[name])), ARRAY(kinds[name]))
        for name, values in per_row.items()
    )
    # render_derived: "AS v(id, filename, ...)", naming unnest's output columns.
    return func.unnest(*arrays).table_valued(*per_row).render_derived(name="v")


def insert_rows(
    conn: Connection, table: Any, per_row: dict[str, list[Any]], same: dict[str, Any]
) -> None:
    """One INSERT for any number of rows of ``table`` (a mapped class): see ``rows_insert``."""
    conn.execute(rows_insert(table, per_row, same))


def rows_params(
    per_row: dict[str, list[Any]], same: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The values of ``rows_insert``'s or ``unnest_rows``' parameters, by name: for running
    a statement built beforehand (with other values) on these rows."""
    return {
        **{f"v_{name}": values for name, values in per_row.items()},
        **{f"s_{name}": value for name, value in (same or {}).items()},
    }


def rows_insert(
    table: Any, per_row: dict[str, list[Any]], same: dict[str, Any], joined: Any = None
) -> Insert:
    """One INSERT for any number of rows of ``table`` (a mapped class): the per-row
    columns as ``unnest_rows``; ``same`` holds the values every row shares. (executemany
    sends an INSERT per row, and a VALUES list takes a parameter per column and row, past
    Postgres' 65,535 at a few thousand rows.) Every value is cast to its column's type: a
    bare parameter in a SELECT list, NULL above all, would be taken as text. ``joined``:
    a one-row CTE the rows are joined to, so that it runs before the first is inserted."""
    columns = table.__table__.c
    rows = unnest_rows(table, per_row)
    shared = (
        cast(bindparam(f"s_{n}", v, type_=columns[n].type), columns[n].type)
        for n, v in same.items()
    )
    values = select(*(rows.c[n] for n in per_row), *shared)
    if joined is not None:
        values = values.select_from(rows.join(joined, true()))
    return insert(table).from_select([*per_row, *same], values)

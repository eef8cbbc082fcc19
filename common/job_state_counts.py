"""Jobs per model, tenant and state, kept by triggers so that reading them costs the
same at ten rows or ten million (migration 0012; the tables are common.tables
``JobStateCount`` and ``JobStateDelta``).

How: statement-level triggers on ``jobs`` (AFTER INSERT, UPDATE, DELETE, with
transition tables) append what each statement changed to ``job_state_deltas``, one row
per (model, tenant, state) it moved, e.g. a claim of 64 jobs adds (m, t, pending, -64)
and (m, t, processing, +64). Every ``FOLD_EVERY`` delta rows the writer that drew the
row id at that multiple folds them into ``job_state_counts`` (delete the deltas, add
their sums), unless another fold is still open, in which case it goes on and a later
one folds. A read sums both tables in one statement, so what it returns is exact at its
snapshot: the same numbers ``SELECT model, state, count(*) FROM jobs GROUP BY ...`` would
give at that instant. No code path has to remember it: every writer of ``jobs``
(common.jobs, claim, sweep, slide_jobs, a cascade from ``batches``, psql) is counted.

Why this and not the alternatives:

- One counter row per (model, state) updated in each transaction would be exact but
  would serialise every writer of a model on the row lock of its ``pending`` row, held
  until commit: the global lock of the event log again, per model. Appending deltas
  takes no row lock that another writer waits for; the fold holds the counters' row
  locks, and only one fold runs at a time (a try-lock, so nobody waits for it).
- Estimates from the statistics (``pg_class.reltuples`` times ``pg_stats``' most common
  (model, state) values) cost nothing but are as old as the last ANALYZE and off by its
  sampling error: a drained queue could read as hundreds pending for minutes, and a
  ``hepato_jobs`` gauge that dashboards and alerts read must not do that.

What it costs: per write statement on ``jobs``, the trigger's aggregation of its
transition tables (rows it touched, nothing else) and an insert of one or two small
rows; per ``FOLD_EVERY`` delta rows, one fold (about 2 ms) in one writer's
transaction. A read scans ``job_state_counts`` (models x tenants x states rows) and the
deltas not yet folded (under ``FOLD_EVERY`` plus what is in flight), plus their dead
rows until autovacuum, which is set to visit the deltas after every thousand changes.

What it does not see: rows that leave ``jobs`` without a DELETE (a partition detached
or dropped: call ``forget`` on it first, in the same transaction) or arrive without an
INSERT (a restore with triggers off: call ``rebuild``). TRUNCATE of ``jobs`` empties
the counts."""

from __future__ import annotations

from sqlalchemy import Connection, text

# Delta rows between folds: migration 0012 writes the same number into its trigger.
FOLD_EVERY = 1024

# Both tables in one statement: one snapshot, so a fold committing in between moves
# rows from one side to the other without a row counted twice or missed.
_TOTALS = text("""
    SELECT model, state, sum(n)::bigint AS n FROM (
        SELECT model, state, n FROM job_state_counts
        UNION ALL
        SELECT model, state, n FROM job_state_deltas
    ) AS counted
    GROUP BY model, state
""")


def totals(conn: Connection) -> dict[tuple[str, str], int]:
    """Jobs per (model, state), over every tenant; pairs that have had jobs and have
    none now are there at 0."""
    return {(model, state): int(n) for model, state, n in conn.execute(_TOTALS)}


# A model's pending jobs, all tenants' and one tenant's: the queue bounds' count
# (common.room), at the same cost whatever the queue's length (migration 0016).
_PENDING = text("SELECT everyone, mine FROM hepato_pending(:model, :tenant)")


def pending(conn: Connection, model: str, tenant: str) -> tuple[int, int]:
    """``model``'s pending jobs: of every tenant, and of ``tenant``."""
    everyone, mine = conn.execute(_PENDING, {"model": model, "tenant": tenant}).one()
    return int(everyone), int(mine)


def fold(conn: Connection) -> int:
    """Fold the deltas into the counts now (the triggers do it every ``FOLD_EVERY``
    rows): how many delta rows moved; 0 when another fold is open or ``conn``'s
    transaction is not READ COMMITTED."""
    return int(conn.execute(text("SELECT job_state_counts_fold()")).scalar_one())


def rebuild(conn: Connection) -> None:
    """Count every job again, writers held off meanwhile (a scan of ``jobs``)."""
    conn.execute(text("SELECT job_state_counts_rebuild()"))


def forget(conn: Connection, table: str) -> None:
    """Take the rows of ``table`` (a partition of ``jobs`` about to be detached or
    dropped) off the counts; call it in the transaction that removes them."""
    conn.execute(text("SELECT job_state_counts_forget(CAST(:t AS regclass))"), {"t": table})

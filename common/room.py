"""Queue bounds: how many pending jobs one model may hold, and each tenant's share of
them, so that one tenant's backlog cannot take a model's whole queue. Counted in
Postgres, the source of truth, so a Redis restart cannot reset them; read from the counts
its triggers keep (common.job_state_counts), so a long queue costs a submission nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from hepato.common import job_state_counts
from hepato.common.exceptions import QueueFull
from hepato.common.settings import Settings


@dataclass(frozen=True)
class Room:
    """The bounds a submission must fit in, in pending jobs, and the Retry-After of a
    refusal, s."""

    per_model: int
    per_tenant: int
    retry_after_s: int

    @classmethod
    def of(cls, settings: Settings) -> Room:
        """The bounds the settings give (HEPATO_MAX_QUEUED_PER_MODEL, _PER_TENANT)."""
        return cls(
            settings.max_queued_per_model,
            settings.max_queued_per_tenant,
            settings.queue_full_retry_after_s,
        )


def check_room(engine: Engine, model: str, tenant: str, adding: int, room: Room) -> int:
    """Refuse the whole request up front when it would not fit: before its objects are
    stored, so a refused request costs the store nothing. Concurrent requests may all
    pass here; ``hold_room``, in the transaction that inserts, is the one that holds.
    Returns the model's pending jobs, as counted."""
    # Autocommit: one statement needs no BEGIN and ROLLBACK around it (two round trips).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        return _refuse_by_count(conn, model, tenant, adding, room)


def hold_room(conn: Connection, model: str, tenant: str, adding: int, room: Room) -> int:
    """The same check inside the inserting transaction, under a lock per model: the
    submissions of one model count and insert one after another, so together they never
    pass a bound (the lock is held only for this transaction's few statements). One
    statement (``hepato_hold_room``, migration 0016); returns the model's pending jobs
    before these."""
    with refusal(model, tenant, adding, room):
        return int(conn.execute(HOLD, params(model, tenant, adding, room)).scalar_one())


# The lock, the count and the refusal in one call: a statement of its own, or a
# materialized CTE that an insert joins (common.job_statements.inserting_held).
HOLD = text(
    "SELECT hepato_hold_room(:room_model, :room_tenant, :room_adding, :room_per_model, "
    ":room_per_tenant)"
)
# hepato_hold_room's refusal (its DETAIL: "everyone,mine").
REFUSED = "HQ001"


def params(model: str, tenant: str, adding: int, room: Room) -> dict[str, object]:
    """HOLD's parameters, by name."""
    return {
        "room_model": model,
        "room_tenant": tenant,
        "room_adding": adding,
        "room_per_model": room.per_model,
        "room_per_tenant": room.per_tenant,
    }


@contextmanager
def refusal(model: str, tenant: str, adding: int, room: Room) -> Iterator[None]:
    """QueueFull in place of hepato_hold_room's refusal, from a statement run inside."""
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != REFUSED:
            raise
        detail = exc.orig.diag.message_detail or "0,0"  # type: ignore[union-attr]
        everyone, mine = (int(n) for n in detail.split(","))
        _refuse_past(model, tenant, adding, room, everyone, mine)
        raise  # the function and this check disagree: the database's error stands


def _refuse_by_count(conn: Connection, model: str, tenant: str, adding: int, room: Room) -> int:
    # From the counts the triggers keep, not a count of the queue: 100,000 pending jobs
    # cost a submission what 10 do.
    everyone, mine = job_state_counts.pending(conn, model, tenant)
    _refuse_past(model, tenant, adding, room, everyone, mine)
    return int(everyone)


def _refuse_past(
    model: str, tenant: str, adding: int, room: Room, everyone: int, mine: int
) -> None:
    if everyone + adding > room.per_model:
        raise QueueFull(
            f"the queue of model {model!r} is full ({everyone} of {room.per_model} jobs "
            f"pending; this request adds {adding}); nothing was accepted, retry later",
            room.retry_after_s,
        )
    if mine + adding > room.per_tenant:
        raise QueueFull(
            f"tenant {tenant!r} holds {mine} of its share of {room.per_tenant} pending jobs "
            f"of model {model!r} (this request adds {adding}); nothing was accepted, "
            "retry later",
            room.retry_after_s,
        )

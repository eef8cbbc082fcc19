"""The audit trail: one append-only ``audit_events`` row per call that reads or changes a
tenant's work, saying who (tenant, API key id, client address), when, what and on which
object.

What a row holds. ``tenant``; ``key_id``, the id ``hepato keys list`` shows (never the
key nor its hash; null with ``HEPATO_AUTH=open``, where no key is asked for);
``client``, the peer address as uvicorn gives it (``request.client.host``: uvicorn itself
replaces it by ``X-Forwarded-For`` only for connections from ``FORWARDED_ALLOW_IPS``,
default 127.0.0.1; the gateway adds no proxy trust of its own); ``action`` from
``Action``; ``object_type`` and ``object_id`` (a job, batch or slide; none for a listing);
``detail``, a small JSON of counts and enumerated words (``DETAIL_KEYS``: a tile's
coordinates, a region's rectangle, an export's format, how many jobs a batch took).
Never image bytes, never the client's file names (they may name a patient: the project
keeps them for display only), never question or error text: ``row()`` refuses any other
detail key, and a string detail may only be a short lower-case word.

Which calls. Every submission (``POST /v1/jobs``, ``/v1/batches``, ``/v1/assets``,
``/v1/predict``, ``/v1/detect``, ``/v1/slides``: one row naming the job, batch or slide
and counting its files, however many), every cancel, and every read of a job, batch,
image or image link, export, event stream (one row when it opens), slide, slide listing,
slide tile or descriptor, region, thumbnail or tissue mask and report. Not ``/healthz``,
``/readyz``, ``/metrics``, ``/v1/models``, ``/docs`` or the viewer's static files: they
hold no tenant's data. Only calls that succeed (2xx, and a tile's 304) leave a row: a
refused call (401, 404, 409, 422, 429, 503) read and changed nothing. An Idempotency-Key
replay of a submission creates nothing and leaves no row; the first call has its row.

How it is written. Where the route still holds its session's transaction once it has
succeeded, in that transaction (``commit``: one INSERT, then a COMMIT in place of the
ROLLBACK its close would send); else as one autocommit INSERT on a pooled connection
(``record_now``: one round trip, no BEGIN or COMMIT), after the call's work succeeded.
A read whose row cannot be written is answered 503. An image submission's row commits
with its jobs, in common.jobs.create's transaction (its ``audit_row``). A slide's is
written just after the slide commits (common.slide_jobs owns that transaction:
``record_after_commit``); should that INSERT fail, the slide is still accepted and the
failure logged at ERROR, as a 503 for a committed slide would have the client submit it
twice.

Append-only. Migration 0011 puts a statement-level trigger on the table that raises
(SQLSTATE 42501) on every UPDATE, DELETE and TRUNCATE, whichever role sends them, the
service's own included, and even for statements that match no row. The service's code
only ever inserts. A role that owns the table could still drop the trigger: where that
matters, let a separate role own the schema and grant the service's role only INSERT
and SELECT on ``audit_events`` (and USAGE on its sequence). Pruning is an operator's
act, as the table's owner, in one transaction::

    BEGIN;
    ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only;
    DELETE FROM audit_events WHERE at < now() - interval '6 years';
    ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only;
    COMMIT;

``hepato audit --tenant T --since DATE`` reads it (``query``)."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from hepato.common.tables import AuditEvent

log = logging.getLogger(__name__)


class Action(StrEnum):
    """What a call did. Submissions and cancels change work; every other action reads."""

    submit = "submit"  # jobs, a batch or a slide accepted (detail: accepted, rejected)
    cancel = "cancel"  # a job, batch or slide's pending work canceled (detail: canceled)
    read_job = "read_job"  # GET /v1/jobs/{id}: its state and result
    read_batch = "read_batch"  # GET /v1/batches/{id}: a page of its jobs and results
    read_image = "read_image"  # the uploaded image's bytes
    read_image_url = "read_image_url"  # a presigned link to them
    export = "export"  # a job's, batch's or slide's detections as a file (detail: format)
    watch = "watch"  # a live event stream opened (SSE)
    list_slides = "list_slides"  # GET /v1/slides (detail: count)
    read_slide = "read_slide"  # GET /v1/slides/{id}: state, metadata, summary
    read_slide_dzi = "read_slide_dzi"  # the Deep Zoom descriptor
    read_slide_tile = "read_slide_tile"  # one Deep Zoom tile (detail: level, col, row)
    read_slide_region = "read_slide_region"  # detections of a rectangle (x, y, w, h)
    read_slide_image = "read_slide_image"  # thumbnail or tissue mask (detail: image)
    read_report = "read_report"  # the slide's HTML report


class ObjectType(StrEnum):
    job = "job"
    batch = "batch"
    slide = "slide"


# What ``detail`` may hold: counts, coordinates, flags and enumerated words.
DETAIL_KEYS = frozenset(
    {
        "accepted",
        "rejected",
        "wait",
        "canceled",
        "format",
        "deidentify",
        "size_bytes",
        "page",
        "page_size",
        "jobs",
        "count",
        "level",
        "col",
        "row",
        "x",
        "y",
        "w",
        "h",
        "mode",
        "image",
        "not_modified",
        "expires_in_s",
        "resume_after",
    }
)
# A string detail is an enumerated word (a format, a mode), never free text.
_WORD = re.compile(r"[a-z0-9_-]{1,24}")


@dataclass(frozen=True)
class Caller:
    """Who makes a request: what every row of it names."""

    tenant: str
    key_id: str | None = None
    client: str | None = None


def _checked(detail: dict[str, Any]) -> dict[str, Any]:
    """``detail`` without its None values, refused unless only DETAIL_KEYS and scalars."""
    detail = {name: value for name, value in detail.items() if value is not None}
    for name, value in detail.items():
        if name not in DETAIL_KEYS:
            raise ValueError(f"audit detail {name!r} is not one of DETAIL_KEYS")
        if isinstance(value, str) and not _WORD.fullmatch(value):
            raise ValueError(f"audit detail {name!r}: {value!r} is not a short word")
        if not isinstance(value, str | bool | int | float):
            raise ValueError(f"audit detail {name!r}: a {type(value).__name__}, not a scalar")
    return detail


# Built once: each row is only its parameters (a new construct per row costs more than
# the INSERT's own Python work).
_INSERT = insert(AuditEvent)


def row(
    caller: Caller,
    action: Action,
    object_type: ObjectType | None = None,
    object_id: uuid.UUID | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """The parameters of one row (``detail`` checked against DETAIL_KEYS)."""
    return {
        "tenant": caller.tenant,
        "key_id": caller.key_id,
        "client": caller.client[:64] if caller.client else None,
        "action": action.value,
        "object_type": object_type.value if object_type else None,
        "object_id": object_id,
        "detail": _checked(detail),
    }


def commit(
    session: Session,
    caller: Caller,
    action: Action,
    object_type: ObjectType | None = None,
    object_id: uuid.UUID | None = None,
    **detail: Any,
) -> None:
    """Add the row to the request's session and commit it: in place of the ROLLBACK its
    close would send, so one INSERT more."""
    session.connection().execute(_INSERT, row(caller, action, object_type, object_id, **detail))
    session.commit()


def record_now(
    engine: Engine,
    caller: Caller,
    action: Action,
    object_type: ObjectType | None = None,
    object_id: uuid.UUID | None = None,
    **detail: Any,
) -> None:
    """The row on its own: one autocommit INSERT (no BEGIN, no COMMIT to wait for)."""
    params = row(caller, action, object_type, object_id, **detail)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(_INSERT, params)


def record_after_commit(
    engine: Engine,
    caller: Caller,
    action: Action,
    object_type: ObjectType | None = None,
    object_id: uuid.UUID | None = None,
    **detail: Any,
) -> None:
    """``record_now`` for work already committed elsewhere: a failure is logged, not
    raised (see the module's docstring)."""
    try:
        record_now(engine, caller, action, object_type, object_id, **detail)
    except DBAPIError:
        log.error(
            "audit row not written: %s %s %s of tenant %s (key %s)",
            action.value,
            object_type.value if object_type else "-",
            object_id,
            caller.tenant,
            caller.key_id,
            exc_info=True,
        )


def query(
    engine: Engine,
    *,
    tenant: str | None,
    since: datetime,
    until: datetime | None = None,
    action: Action | None = None,
    object_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> list[AuditEvent]:
    """Rows at or after ``since`` (and before ``until``), oldest first, at most ``limit``."""
    stmt = select(AuditEvent).where(AuditEvent.at >= since)
    if tenant is not None:
        stmt = stmt.where(AuditEvent.tenant == tenant)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    if action is not None:
        stmt = stmt.where(AuditEvent.action == action.value)
    if object_id is not None:
        stmt = stmt.where(AuditEvent.object_id == object_id)
    stmt = stmt.order_by(AuditEvent.at, AuditEvent.id).limit(limit)
    with Session(engine) as session:
        return list(session.scalars(stmt))

"""Postgres schema: the source of truth for every job and result."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    Uuid,
    cast,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import UserDefinedType

from hepato.common.ids import new_job_id


class Base(DeclarativeBase):
    pass


class Xid8(UserDefinedType[int]):
    """Postgres ``xid8``: a 64-bit transaction id that never wraps, read as an int."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def bind_expression(self, bindvalue: Any) -> ColumnElement[int]:
        # psycopg sends the value as text; the server reads it as an xid8.
        return cast(bindvalue, self)

    def bind_processor(self, dialect: Any) -> Any:
        return lambda value: None if value is None else str(value)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        return lambda value: None if value is None else int(value)


# Reflection (the ORM-against-migrations check) then knows the column's type.
ischema_names.setdefault("xid8", Xid8)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # Every read and write is scoped to the tenant of the API key that made it.
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(128))
    priority: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    # Webhook target when every job is finished (common.webhooks).
    callback_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Job(Base):
    """One image, slide plan or tile to run. Partitioned by day on ``id``, a UUIDv7
    (migration 0015, common.partitions): an insert goes to its day's partition."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_job_id)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("batches.id", ondelete="CASCADE")
    )
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    # The client's filename is kept for display only; objects live under server keys.
    filename: Mapped[str] = mapped_column(Text)
    object_key: Mapped[str] = mapped_column(Text)
    image_format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(128))
    # The manifest's task at submission: the shape ``result`` will have.
    task: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    # Fencing: a result is written only while this token is still the job's.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A retry's backoff: no claim takes the job before this time.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Last time the id was pushed to Redis; the sweeper's look for dropped ids considers
    # only jobs pushed over requeue_pending_after_s ago (common.lost_ids).
    enqueued_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker's clock when the image was downloaded and when the model call returned,
    # written with the result (the timeline of GET /v1/jobs/{id}).
    fetched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inferred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    queue_wait_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # The version of the model that produced ``result`` (set with it).
    model_version: Mapped[str | None] = mapped_column(String(64))
    # For vqa models: this job's question; null asks the manifest's.
    question: Mapped[str | None] = mapped_column(Text)
    # Webhook target when this job (one without a batch) is finished.
    callback_url: Mapped[str | None] = mapped_column(Text)
    # A common.results.TaskResult as JSON; its "task" field says which shape.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # 'image' (an upload), or a whole slide's 'plan' (one per slide) or 'tile' job; a
    # slide's jobs carry the slide's id as their batch_id (common.slides.jobs).
    kind: Mapped[str] = mapped_column(String(8), default="image", server_default="image")
    # A tile's level-0 rectangle, read for the model, and its core: the part whose
    # detections it keeps (common.slides.grid). Null for images and plans.
    tile_x: Mapped[int | None] = mapped_column(Integer)
    tile_y: Mapped[int | None] = mapped_column(Integer)
    tile_w: Mapped[int | None] = mapped_column(Integer)
    tile_h: Mapped[int | None] = mapped_column(Integer)
    core_x0: Mapped[int | None] = mapped_column(Integer)
    core_y0: Mapped[int | None] = mapped_column(Integer)
    core_x1: Mapped[int | None] = mapped_column(Integer)
    core_y1: Mapped[int | None] = mapped_column(Integer)
    # A done tile's detections per class in its core, and the level-0 area (px²) their
    # boxes cover there: summed into the slide's summary when its last tile ends.
    tile_stats: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Milliseconds per step of the last run that the gateway and the worker measured
    # themselves (common.stages): the gateway's at submission, the worker's with the result.
    stages: Mapped[dict[str, float] | None] = mapped_column(JSONB)

    __table_args__ = (
        # A batch's jobs by state; in (created_at, id) order for an export's keyset pages
        # (gateway.routes.exports.page_query).
        Index("ix_jobs_batch_state_created", "batch_id", "state", "created_at", "id"),
        Index("ix_jobs_state_enqueued", "state", "enqueued_at"),
        Index("ix_jobs_state_lease", "state", "lease_until"),
        # The queue bound counts a model's pending jobs at every submission.
        Index("ix_jobs_model_state", "model", "state"),
        # A slide's tiles by place: a region query names the viewport's tile rows and a
        # range of columns, and visits only those tiles (gateway.routes.slide_regions).
        Index(
            "ix_jobs_tile_grid",
            "batch_id",
            "tile_y",
            "tile_x",
            postgresql_where=text("kind = 'tile'"),
        ),
    )


class Slide(Base):
    """One whole-slide image: stored as uploaded, planned by a worker into tile jobs
    (whose batch_id is this id: a slide is also a row of ``batches``), finished with a
    summary by the transaction that ends its last tile. Holds nothing read from the
    slide's label, macro or scanner metadata (see common.slides.reader)."""

    __tablename__ = "slides"

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    tenant: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(Text)
    object_key: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(24), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    deidentify: Mapped[bool] = mapped_column(Boolean, default=False)
    deidentified: Mapped[bool] = mapped_column(Boolean, default=False)
    # µm per pixel given with the submission: used only when the slide names none.
    submitted_mpp: Mapped[float | None] = mapped_column(Float)
    # Read at planning.
    mpp_x: Mapped[float | None] = mapped_column(Float)
    mpp_y: Mapped[float | None] = mapped_column(Float)
    mpp_source: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    levels: Mapped[int | None] = mapped_column(Integer)
    objective_power: Mapped[float | None] = mapped_column(Float)
    tile_size: Mapped[int | None] = mapped_column(Integer)
    tile_overlap: Mapped[int | None] = mapped_column(Integer)
    # The tile grid in level-0 px (common.slides.grid.tile_geometry): every tile starts at
    # a multiple of the stride. Null until planned, and for slides planned before 0009.
    tile_w0: Mapped[int | None] = mapped_column(Integer)
    tile_h0: Mapped[int | None] = mapped_column(Integer)
    tile_stride_x: Mapped[int | None] = mapped_column(Integer)
    tile_stride_y: Mapped[int | None] = mapped_column(Integer)
    tissue_area_mm2: Mapped[float | None] = mapped_column(Float)
    tiles_total: Mapped[int] = mapped_column(Integer, default=0)
    thumbnail_key: Mapped[str | None] = mapped_column(Text)
    mask_key: Mapped[str | None] = mapped_column(Text)
    # A common.slide_schemas.SlideSummary as JSON, once finished.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    callback_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    planned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_slides_tenant_created", "tenant", "created_at"),)


class JobEvent(Base):
    """One state change of a job, written in the transaction that made it: the log the
    event streams replay, in ``(xid, id)`` order (the SSE event id is both). ``xid`` is
    the writing transaction's: readers read only below their snapshot's xmin, where no
    transaction is still running, so nothing can later commit below their cursor (see
    common.event_log). Rows older than the column have xid 0.

    Partitioned by day on ``job_id`` as ``jobs`` is on ``id``: an event lives in its
    job's day. The key holds the partition key, as Postgres requires, in the job
    stream's read order; ``id`` alone is unique too (a sequence). The reference to the
    job (ON DELETE CASCADE) is declared between each day's two partitions, not here
    (common.partitions)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    xid: Mapped[int] = mapped_column(Xid8, server_default=func.pg_current_xact_id())

    __table_args__ = (
        PrimaryKeyConstraint("job_id", "xid", "id", name="job_events_pkey"),
        Index("ix_job_events_batch_xid", "batch_id", "xid", "id"),
    )


class WebhookDelivery(Base):
    """One webhook to deliver, written in the transaction that finished its job or batch,
    so a crash after that commit cannot lose it. ``id`` is the webhook-id, the same on
    every attempt, so the receiver can drop duplicates."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    # The exact body signed and sent on every attempt.
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)


class ApiKey(Base):
    """An API key of a tenant. Only the SHA-256 of the key is kept: the key itself is
    shown once, at creation, and cannot be read back."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(Text)
    # The key's first characters, for telling keys apart in listings; not enough to use.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookSecret(Base):
    """A tenant's webhook signing secret (Standard Webhooks, 'whsec_' + base64). Kept as
    is, not hashed: the worker needs the secret itself to sign. After a rotation the
    previous one signs too for a while (HEPATO_WEBHOOK_SECRET_OVERLAP_S)."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyRecord(Base):
    """One Idempotency-Key of a tenant: inserted before the submission runs (so a
    concurrent duplicate collides on the primary key), completed with its answer."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the method, path, form fields and file contents: what "the same request" is.
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_keys"),)


class AuditEvent(Base):
    """One call that read or changed a tenant's work (common.audit): append-only, a
    trigger refuses UPDATE, DELETE and TRUNCATE (migration 0011). Never image content,
    file names or the key itself: ``key_id`` is ``api_keys.id``."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    tenant: Mapped[str] = mapped_column(String(64))
    # Null in the open mode (no key is asked for).
    key_id: Mapped[str | None] = mapped_column(String(32))
    client: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    object_type: Mapped[str | None] = mapped_column(String(16))
    object_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))

    __table_args__ = (
        Index("ix_audit_events_tenant_at", "tenant", "at"),
        Index("ix_audit_events_at", "at"),
        # "Who read this slide": an object's rows without a scan of its tenant's.
        Index("ix_audit_events_object", "object_id", "at"),
    )


class JobStateCount(Base):
    """Jobs of one model and tenant in one state, as of the last fold of the deltas:
    kept by triggers on ``jobs`` (migration 0012, common.job_state_counts)."""

    __tablename__ = "job_state_counts"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class JobStateDelta(Base):
    """What one statement on ``jobs`` changed in one (model, tenant, state), appended by
    the triggers and not yet folded into ``job_state_counts``."""

    __tablename__ = "job_state_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(BigInteger)

"""Webhooks: a signed POST (Standard Webhooks) when a batch, or a job without a batch,
is finished.

Queued durably rather than on rq: Redis may lose everything (see README, "How a job is
never lost"), and an rq enqueue after the commit could be lost to a crash in between.
A ``webhook_deliveries`` row is written in the very transaction that finishes the job or
batch, and every worker's webhook sender (worker.webhook_sender, a thread of its own:
never the sweeper's) claims due rows here (SKIP LOCKED, so many senders never send one
attempt twice) and records each attempt's outcome. The webhook-id is fixed per job or
batch: retries, and an attempt repeated after a worker died mid-send, carry the same id
for receivers to drop. Each tenant's webhooks are signed with that tenant's own secret
(common.tenants), so no tenant can forge another's."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from standardwebhooks import Webhook

from hepato.common import tenants
from hepato.common.constants import TERMINAL_STATES, batch_state
from hepato.common.job_counts import all_finished, state_counts
from hepato.common.schemas import public_error
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job, WebhookDelivery, WebhookSecret

log = logging.getLogger(__name__)


def enqueue_finished(
    conn: Connection, recorded: Sequence[tuple[uuid.UUID, uuid.UUID | None, str]]
) -> None:
    """Queue the webhooks that the state changes ``recorded`` (job, batch, state) make
    due. Called by common.event_log.record once it holds the finish lock of each batch
    with a callback_url among them: transactions that end jobs of one such batch run this
    one after another, each (its reads are statements after the lock) seeing the ones
    before committed, so the last job of a batch is seen finishing by exactly one of them.
    A job without a batch needs no lock: its row is changed by one transaction at a time."""
    finished = [(job, batch) for job, batch, state in recorded if state in TERMINAL_STATES]
    if not finished:
        return
    now = datetime.now(UTC).isoformat()
    rows: list[dict[str, Any]] = []
    lone = [job for job, batch in finished if batch is None]
    if lone:
        for job_id, tenant, url, state, error in conn.execute(
            select(Job.id, Job.tenant, Job.callback_url, Job.state, Job.error).where(
                Job.id.in_(lone), Job.callback_url.is_not(None)
            )
        ):
            # The receiver is the tenant's: what it may see of an error, as in JobOut.
            data = {
                "job_id": str(job_id),
                "batch_id": None,
                "state": state,
                "error": public_error(error),
            }
            rows.append(delivery_row(job_id, tenant, url, "job.finished", now, data))
    batches = {batch for _, batch in finished if batch is not None}
    if batches:
        for batch_id, tenant, url in conn.execute(
            select(Batch.id, Batch.tenant, Batch.callback_url).where(
                Batch.id.in_(batches), Batch.callback_url.is_not(None)
            )
        ):
            counts = state_counts(conn, batch_id=batch_id)
            if not all_finished(counts):
                continue
            summary = {"batch_id": str(batch_id), "state": batch_state(counts).value}
            rows.append(delivery_row(batch_id, tenant, url, "batch.finished", now, summary, counts))
    if rows:
        # The id is per job or batch: a second enqueue of the same one is a no-op.
        conn.execute(insert(WebhookDelivery).on_conflict_do_nothing(), rows)


def delivery_row(
    subject: uuid.UUID,
    tenant: str,
    url: str | None,
    kind: str,
    at: str,
    data: dict[str, Any],
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A webhook_deliveries row; its id is fixed per ``subject`` (job, batch or slide)."""
    if counts is not None:
        data = {**data, "counts": counts}
    body = json.dumps({"type": kind, "timestamp": at, "data": data}, separators=(",", ":"))
    return {
        "id": f"msg_{subject.hex}",
        "tenant": tenant,
        "url": url,
        "body": body,
        "state": "pending",
        "attempts": 0,
    }


def has_secret(engine: Engine, settings: Settings, tenant: str) -> bool:
    """Whether the tenant's webhooks can be signed (a callback_url is refused if not)."""
    if tenant == tenants.PUBLIC_TENANT and settings.webhook_secret:
        return True
    return tenants.has_webhook_secret(engine, tenant)


@dataclass(frozen=True)
class Due:
    """One attempt, claimed: ``attempt`` counts this one; ``secrets`` sign it (none: the
    tenant has no secret, and the delivery fails)."""

    id: str
    tenant: str
    url: str
    body: str
    attempt: int
    secrets: tuple[str, ...]


def claim_due(engine: Engine, settings: Settings, limit: int) -> list[Due]:
    """Claim up to ``limit`` due deliveries, one attempt each."""
    # Claimed by pushing the next attempt past this one's longest run: a worker that dies
    # mid-send leaves the row to be retried then, the attempt counted.
    lease = timedelta(seconds=settings.webhook_timeout_s * 2 + 5)
    overlap = timedelta(seconds=settings.webhook_secret_overlap_s)
    with engine.begin() as conn:
        # Out of attempts yet pending: the worker of its last attempt stopped mid-send.
        conn.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= func.now(),
                WebhookDelivery.attempts >= settings.webhook_max_attempts,
            )
            .values(
                state="failed",
                last_error=func.coalesce(WebhookDelivery.last_error, "")
                + " (the last attempt's worker stopped before it reported)",
            )
        )
        rows = conn.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.tenant,
                WebhookDelivery.url,
                WebhookDelivery.body,
                WebhookDelivery.attempts,
                WebhookSecret.secret,
                WebhookSecret.previous_secret,
                (WebhookSecret.rotated_at > func.now() - overlap).label("overlapping"),
            )
            .outerjoin(WebhookSecret, WebhookSecret.tenant == WebhookDelivery.tenant)
            .where(
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= func.now(),
                WebhookDelivery.attempts < settings.webhook_max_attempts,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(of=WebhookDelivery, skip_locked=True)
        ).all()
        if not rows:
            return []
        conn.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([row.id for row in rows]))
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=func.now() + lease)
        )
    due = []
    for row in rows:
        secrets: tuple[str | None, ...]
        if row.secret is not None:
            secrets = (row.secret, row.previous_secret) if row.overlapping else (row.secret,)
        elif row.tenant == tenants.PUBLIC_TENANT and settings.webhook_secret:
            secrets = (settings.webhook_secret,)
        else:
            secrets = ()
        due.append(
            Due(
                row.id,
                row.tenant,
                row.url,
                row.body,
                row.attempts + 1,
                tuple(filter(None, secrets)),
            )
        )
    return due


def signed_headers(due: Due, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: signed per attempt (the timestamp is
    the attempt's; the id and body never change), by each of the tenant's secrets."""
    return {
        "content-type": "application/json",
        "webhook-id": due.id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(
            Webhook(secret).sign(due.id, at, due.body) for secret in due.secrets
        ),
    }


def record(engine: Engine, settings: Settings, due: Due, error: str | None, final: bool) -> None:
    """The outcome of an attempt: delivered (``error`` None), failed for good (``final``,
    or out of attempts), or due again after an exponential backoff."""
    values: dict[str, Any]
    if error is None:
        values = {"state": "delivered", "delivered_at": func.now(), "last_error": None}
    elif final or due.attempt >= settings.webhook_max_attempts:
        values = {"state": "failed", "last_error": error}
        log.warning("webhook %s of %s failed for good: %s", due.id, due.tenant, error)
    else:
        wait = timedelta(seconds=settings.webhook_backoff_s * 2 ** (due.attempt - 1))
        values = {"next_attempt_at": func.now() + wait, "last_error": error}
    with engine.begin() as conn:
        conn.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == due.id, WebhookDelivery.state == "pending")
            .values(**values)
        )

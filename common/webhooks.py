"""Webhooks: a signed POST (Standard Webhooks) when a batch, or a job without a batch,
is finished.

Queued durably rather than on rq: Redis may lose everything (see README, "How a job is
never lost"), and an rq enqueue after the commit could be lost to a crash in between.
A ``webhook_deliveries`` row is written in the very transaction that finishes the job or
batch, and every worker's sweeper delivers due rows (SKIP LOCKED, so many sweepers never
send one attempt twice). The webhook-id is fixed per job or batch: retries, and an
attempt repeated after a worker died mid-send, carry the same id for receivers to drop."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert
from standardwebhooks import Webhook

from hepato.common.constants import TERMINAL_STATES, batch_state
from hepato.common.job_counts import all_finished, state_counts
from hepato.common.settings import Settings
from hepato.common.tables import Batch, Job, WebhookDelivery

log = logging.getLogger(__name__)


def enqueue_finished(
    conn: Connection, recorded: Sequence[tuple[uuid.UUID, uuid.UUID | None, str]]
) -> None:
    """Queue the webhooks that the state changes ``recorded`` (job, batch, state) make
    due. Called by common.event_log.record under its lock: transactions that finish jobs
    run this one after another, each seeing the ones before committed, so the last job of
    a batch is seen finishing by exactly one of them."""
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
            data = {"job_id": str(job_id), "batch_id": None, "state": state, "error": error}
            rows.append(_row(job_id, tenant, url, "job.finished", now, data))
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
            rows.append(_row(batch_id, tenant, url, "batch.finished", now, summary, counts))
    if rows:
        # The id is per job or batch: a second enqueue of the same one is a no-op.
        conn.execute(insert(WebhookDelivery).on_conflict_do_nothing(), rows)


def _row(
    subject: uuid.UUID,
    tenant: str,
    url: str | None,
    kind: str,
    at: str,
    data: dict[str, Any],
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
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


@dataclass(frozen=True)
class _Due:
    id: str
    url: str
    body: str
    attempts: int


def deliver_due(engine: Engine, settings: Settings, limit: int = 16) -> int:
    """Send the due deliveries (one attempt each); returns how many were attempted."""
    if not settings.webhook_secret:
        return 0
    # Claimed by pushing the next attempt past this one's longest run: a worker that dies
    # mid-send leaves the row to be retried then, the attempt counted.
    lease = timedelta(seconds=settings.webhook_timeout_s * 2 + 5)
    with engine.begin() as conn:
        due = [
            _Due(*row)
            for row in conn.execute(
                select(
                    WebhookDelivery.id,
                    WebhookDelivery.url,
                    WebhookDelivery.body,
                    WebhookDelivery.attempts,
                )
                .where(
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= func.now(),
                )
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ]
        if not due:
            return 0
        conn.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_([d.id for d in due]))
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=func.now() + lease)
        )
    signer = Webhook(settings.webhook_secret)
    with ThreadPoolExecutor(min(8, len(due)), thread_name_prefix="webhook") as pool:
        errors = list(pool.map(lambda d: _send(signer, d, settings.webhook_timeout_s), due))
    with engine.begin() as conn:
        for delivery, error in zip(due, errors, strict=True):
            attempt = delivery.attempts + 1
            values: dict[str, Any]
            if error is None:
                values = {"state": "delivered", "delivered_at": func.now(), "last_error": None}
            elif attempt >= settings.webhook_max_attempts:
                values = {"state": "failed", "last_error": error}
                log.warning(
                    "webhook %s to %s failed for good: %s", delivery.id, delivery.url, error
                )
            else:
                wait = timedelta(seconds=settings.webhook_backoff_s * 2 ** (attempt - 1))
                values = {"next_attempt_at": func.now() + wait, "last_error": error}
            conn.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values)
            )
    return len(due)


def _send(signer: Webhook, delivery: _Due, timeout_s: float) -> str | None:
    """One attempt; None when the receiver answered 2xx, else why not."""
    # Signed per attempt: the timestamp is the attempt's, the id and body never change.
    at = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signer.sign(delivery.id, at, delivery.body),
    }
    try:
        response = httpx.post(
            delivery.url, content=delivery.body, headers=headers, timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"

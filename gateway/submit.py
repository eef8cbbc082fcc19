"""Accepting uploads: validate, store the bytes, record the jobs, dispatch the ids.

Order matters for "never lose an accepted job": the object is stored before the row
commits, and the row commits before the id is pushed. If the push fails, the job is
still pending in Postgres and the worker's sweeper pushes it again."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import func, insert, select

from common import events, queue
from common.constants import JobState, Priority
from common.exceptions import InvalidImage, QueueFull
from common.images import ImageInfo, display_name, inspect_image
from common.manifest import ModelManifest
from common.models import Batch, Job
from common.storage import new_object_key
from gateway.deps import Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass(frozen=True)
class Rejection:
    filename: str
    error: InvalidImage


def _check_room(res: Resources, model: str, adding: int) -> None:
    """Refuse the whole request when the model's queue would pass its bound. Counted in
    Postgres, the source of truth, so a Redis restart cannot reset it; concurrent
    submissions may pass the bound by at most one request's files."""
    limit = res.settings.max_queued_per_model
    with res.engine.connect() as conn:
        pending = conn.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.model == model, Job.state == JobState.pending)
        ).scalar_one()
    if pending + adding > limit:
        raise QueueFull(
            f"the queue of model {model!r} is full ({pending} of {limit} jobs pending; this "
            f"request adds {adding}); nothing was accepted, retry later",
            res.settings.queue_full_retry_after_s,
        )


@dataclass(frozen=True)
class Submission:
    batch_id: uuid.UUID | None
    jobs: list[tuple[uuid.UUID, str]]
    rejected: list[Rejection]


def submit(
    res: Resources,
    uploads: list[Upload],
    *,
    tenant: str,
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    as_batch: bool,
    question: str | None = None,
    callback_url: str | None = None,
) -> Submission:
    settings = res.settings
    # Postgres text cannot hold NUL (it would fail the insert as if the database were down).
    uploads = [Upload(display_name(u.filename), u.data) for u in uploads]
    question = question.replace("\x00", "\ufffd") if question is not None else None
    valid: list[tuple[Upload, ImageInfo]] = []
    rejected: list[Rejection] = []
    for upload in uploads:
        try:
            info = inspect_image(upload.data, settings.max_file_bytes, settings.max_image_pixels)
        except InvalidImage as exc:
            rejected.append(Rejection(upload.filename, exc))
        else:
            valid.append((upload, info))
    if not valid:
        return Submission(None, [], rejected)
    # Refuse up front (503) while the queue is down, so nothing is half-accepted. Should
    # Redis fail between here and the push, the committed jobs are still safe (see below).
    res.redis.ping()
    _check_room(res, model.name, len(valid))

    keys = [new_object_key(info.format) for _, info in valid]
    with ThreadPoolExecutor(max_workers=min(16, len(valid))) as pool:
        # list() re-raises the first failed PUT; the request then answers 503.
        list(
            pool.map(
                lambda item: res.store.put(item[0], item[1][0].data, item[1][1].content_type),
                zip(keys, valid, strict=True),
            )
        )

    batch_id = uuid.uuid4() if as_batch else None
    deadline_at = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
    job_ids = [uuid.uuid4() for _ in valid]
    rows = [
        {
            "id": job_id,
            "batch_id": batch_id,
            "tenant": tenant,
            "filename": upload.filename,
            "object_key": key,
            "image_format": info.format,
            "size_bytes": len(upload.data),
            "width": info.width,
            "height": info.height,
            "model": model.name,
            "task": model.task,
            "priority": priority.value,
            "state": JobState.pending,
            "attempts": 0,
            "max_attempts": settings.max_attempts,
            "deadline_at": deadline_at,
            "question": question,
            # A batch's jobs are reported together, by the batch's webhook.
            "callback_url": None if batch_id else callback_url,
        }
        for job_id, key, (upload, info) in zip(job_ids, keys, valid, strict=True)
    ]
    with events.transaction(res.engine) as conn:
        if batch_id is not None:
            conn.execute(
                insert(Batch).values(
                    id=batch_id,
                    tenant=tenant,
                    model=model.name,
                    priority=priority.value,
                    total=len(rows),
                    callback_url=callback_url,
                )
            )
        conn.execute(insert(Job), rows)
        events.record(conn, job_ids)

    ids = [str(job_id) for job_id in job_ids]
    try:
        queue.push(res.redis, model.name, priority, ids)
    except redis.RedisError:
        # Committed jobs are safe: the sweeper re-pushes pending jobs Redis never saw.
        log.warning("could not push %d job ids to Redis; the sweeper will", len(ids), exc_info=True)
    jobs = [(job_id, upload.filename) for job_id, (upload, _) in zip(job_ids, valid, strict=True)]
    return Submission(batch_id, jobs, rejected)

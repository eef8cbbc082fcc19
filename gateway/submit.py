"""Accepting uploads: validate, store the bytes, record the jobs, dispatch the ids.

Order matters for "never lose an accepted job": the object is stored before the row
commits, and the row commits before the id is pushed. If the push fails, the job is
still pending in Postgres and the worker's sweeper pushes it again.

Runs in a worker thread (never on the event loop). Each upload is read from the file
the multipart parser spooled it to, in bounded chunks, and streamed from there to the
object store, so a request's images are never in memory whole. Postgres sees a fixed
number of statements per request whatever its number of files: the room check, then
one transaction with one multi-row insert per table (common.jobs)."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import redis

from hepato.common import dispatch, jobs, metrics
from hepato.common.constants import Priority
from hepato.common.exceptions import InvalidImage
from hepato.common.images import ImageInfo, display_name, inspect_image
from hepato.common.jobs import NewJob
from hepato.common.manifest import ModelManifest
from hepato.common.storage import new_object_key
from hepato.gateway.deps import Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    filename: str
    file: BinaryIO  # seekable; read from its start


@dataclass(frozen=True)
class Rejection:
    filename: str
    error: InvalidImage


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
    uploads = [Upload(display_name(u.filename), u.file) for u in uploads]
    question = question.replace("\x00", "\ufffd") if question is not None else None
    valid: list[tuple[Upload, ImageInfo]] = []
    rejected: list[Rejection] = []
    for upload in uploads:
        try:
            info = inspect_image(upload.file, settings.max_file_bytes, settings.max_image_pixels)
        except InvalidImage as exc:
            rejected.append(Rejection(upload.filename, exc))
        else:
            valid.append((upload, info))
    if not valid:
        metrics.count_submission(model.name, 0, len(rejected))
        return Submission(None, [], rejected)
    # Refuse up front (503) while the queue is down, so nothing is half-accepted. Should
    # Redis fail between here and the push, the committed jobs are still safe (see below).
    res.redis.ping()
    jobs.check_room(
        res.engine,
        model.name,
        len(valid),
        settings.max_queued_per_model,
        settings.queue_full_retry_after_s,
    )

    keys = [new_object_key(info.format) for _, info in valid]
    with ThreadPoolExecutor(max_workers=min(16, len(valid))) as pool:
        # list() re-raises the first failed PUT; the request then answers 503.
        list(
            pool.map(
                lambda item: res.store.put_file(
                    item[0], item[1][0].file, item[1][1].size, item[1][1].content_type
                ),
                zip(keys, valid, strict=True),
            )
        )

    created = jobs.create(
        res.engine,
        [
            NewJob(upload.filename, key, info)
            for key, (upload, info) in zip(keys, valid, strict=True)
        ],
        as_batch=as_batch,
        tenant=tenant,
        model=model,
        priority=priority,
        max_attempts=settings.max_attempts,
        deadline_s=deadline_s,
        question=question,
        callback_url=callback_url,
    )

    ids = [str(job_id) for job_id in created.job_ids]
    try:
        dispatch.push(res.redis, model.name, priority, ids)
    except redis.RedisError:
        # Committed jobs are safe: the sweeper re-pushes pending jobs Redis never saw.
        log.warning("could not push %d job ids to Redis; the sweeper will", len(ids), exc_info=True)
    accepted = [
        (job_id, upload.filename)
        for job_id, (upload, _) in zip(created.job_ids, valid, strict=True)
    ]
    metrics.count_submission(model.name, len(accepted), len(rejected))
    return Submission(created.batch_id, accepted, rejected)

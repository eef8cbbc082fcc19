"""Accepting uploads: validate, store the bytes, record the jobs, dispatch the ids.

Order matters for "never lose an accepted job": the object is stored before the row
commits, and the row commits before the id is pushed. If the push fails, the job is
still pending in Postgres and the worker's sweeper pushes it again.

Runs in a worker thread (never on the event loop). Each upload is read from the file
the multipart parser spooled it to, in bounded chunks, and streamed from there to the
object store, so a request's images are never in memory whole. Postgres sees a fixed
number of statements per request whatever its number of files: the room check, then
one transaction with one multi-row insert per table."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import redis
from sqlalchemy import Connection, bindparam, cast, func, insert, select
from sqlalchemy.dialects.postgresql import ARRAY

from hepato.common import dispatch, event_log, metrics
from hepato.common.constants import JobState, Priority
from hepato.common.exceptions import InvalidImage, QueueFull
from hepato.common.images import ImageInfo, display_name, inspect_image
from hepato.common.manifest import ModelManifest
from hepato.common.storage import new_object_key
from hepato.common.tables import Batch, Job
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


def _check_room(res: Resources, model: str, adding: int) -> None:
    """Refuse the whole request when the model's queue would pass its bound. Counted in
    Postgres, the source of truth, so a Redis restart cannot reset it; concurrent
    submissions may pass the bound by at most one request's files."""
    limit = res.settings.max_queued_per_model
    # Autocommit: one statement needs no BEGIN and ROLLBACK around it (two round trips).
    # Not in the insert's transaction: the check comes before the objects are stored, so
    # a refused request costs the store nothing, and no connection waits on the uploads.
    with res.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
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


def _insert_jobs(conn: Connection, per_file: dict[str, list[Any]], same: dict[str, Any]) -> None:
    """One INSERT for any number of jobs: each per-file column goes as one array and
    unnest() turns the arrays back into rows. (executemany sends an INSERT per job, and a
    VALUES list takes a parameter per column and job, past Postgres' 65,535 at 3,640
    jobs.) Every value is cast to its column's type: a bare parameter in a SELECT list,
    NULL above all, would be taken as text."""
    columns = Job.__table__.c

    def typed(name: str, value: Any, *, array: bool = False) -> Any:
        kind = ARRAY(columns[name].type) if array else columns[name].type
        return cast(bindparam(f"v_{name}", value, type_=kind), kind)

    arrays = (typed(n, v, array=True) for n, v in per_file.items())
    # render_derived: "AS f(id, filename, ...)", naming unnest's output columns.
    files = func.unnest(*arrays).table_valued(*per_file).render_derived(name="f")
    rows = select(*(files.c[n] for n in per_file), *(typed(n, v) for n, v in same.items()))
    conn.execute(insert(Job).from_select([*per_file, *same], rows))


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
    _check_room(res, model.name, len(valid))

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

    batch_id = uuid.uuid4() if as_batch else None
    deadline_at = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
    job_ids = [uuid.uuid4() for _ in valid]
    per_file: dict[str, list[Any]] = {
        "id": job_ids,
        "filename": [upload.filename for upload, _ in valid],
        "object_key": keys,
        "image_format": [info.format for _, info in valid],
        "size_bytes": [info.size for _, info in valid],
        "width": [info.width for _, info in valid],
        "height": [info.height for _, info in valid],
    }
    same = {
        "batch_id": batch_id,
        "tenant": tenant,
        "model": model.name,
        "task": model.task,
        "priority": priority.value,
        "state": JobState.pending.value,
        "attempts": 0,
        "max_attempts": settings.max_attempts,
        "deadline_at": deadline_at,
        "question": question,
        # A batch's jobs are reported together, by the batch's webhook.
        "callback_url": None if batch_id else callback_url,
    }
    with event_log.transaction(res.engine) as conn:
        if batch_id is not None:
            conn.execute(
                insert(Batch).values(
                    id=batch_id,
                    tenant=tenant,
                    model=model.name,
                    priority=priority.value,
                    total=len(job_ids),
                    callback_url=callback_url,
                )
            )
        _insert_jobs(conn, per_file, same)
        event_log.record(conn, job_ids)

    ids = [str(job_id) for job_id in job_ids]
    try:
        dispatch.push(res.redis, model.name, priority, ids)
    except redis.RedisError:
        # Committed jobs are safe: the sweeper re-pushes pending jobs Redis never saw.
        log.warning("could not push %d job ids to Redis; the sweeper will", len(ids), exc_info=True)
    jobs = [(job_id, upload.filename) for job_id, (upload, _) in zip(job_ids, valid, strict=True)]
    metrics.count_submission(model.name, len(jobs), len(rejected))
    return Submission(batch_id, jobs, rejected)

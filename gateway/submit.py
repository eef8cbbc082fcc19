"""Accepting uploads: validate, store the bytes, record the jobs, dispatch the ids.

Order matters for "never lose an accepted job": the object is stored before the row
commits, and the row commits before the id is pushed. If the push fails, the job is
still pending in Postgres and the worker's sweeper pushes it again.

Runs in a worker thread (never on the event loop). Each upload is read from the file
the multipart parser spooled it to, in bounded chunks, and streamed from there to the
object store, so a request's images are never in memory whole. Postgres sees a fixed
number of statements per request whatever its number of files: the room check, then
one transaction with the room held (common.room) and one multi-row insert per table
(common.jobs). A callback_url is
checked first (common.egress: where it resolves to) and so is the tenant's signing secret,
both before any upload is read. The submission's one audit row (common.audit) is written
after the push, so the worker's start does not wait for it."""

from __future__ import annotations

import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import redis
from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError

from hepato.common import (
    audit,
    dispatch,
    egress,
    jobs,
    metrics,
    room,
    stages,
    wake_publish,
    webhooks,
)
from hepato.common.audit import Action, Caller, ObjectType
from hepato.common.constants import Priority
from hepato.common.exceptions import CallbackRefused, HepatoError, InvalidImage, QueueFull
from hepato.common.images import ImageInfo, display_name, inspect_image
from hepato.common.jobs import NewJob
from hepato.common.manifest import ModelManifest
from hepato.common.settings import Settings
from hepato.common.storage import new_object_key
from hepato.common.tables import Job
from hepato.gateway.deps import Resources

log = logging.getLogger(__name__)

# The single-file PUTs that run alongside their insert (one per concurrent request).
_PUTS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-put")


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
    caller: Caller,
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    as_batch: bool,
    question: str | None = None,
    callback_url: str | None = None,
    job_id: uuid.UUID | None = None,
    wait: bool = False,
) -> Submission:
    """``wait``: the caller waits for the result (/v1/predict), as its audit row says."""
    settings = res.settings
    tenant = caller.tenant
    started = time.perf_counter()
    if callback_url is not None:
        check_callback(res, tenant, callback_url)
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
    # A lone image whose caller waits is announced in that round trip (worker.head_start).
    hinted = job_id is not None and wait and question is None and _hint(res, model, job_id, valid)
    if not hinted:
        res.redis.ping()
    bounds = room.Room.of(settings)
    if len(valid) > 1:
        # Several files: a refusal now saves storing them all. One file is stored first
        # and removed if the insert's own check (hold_room) refuses it: one query less on
        # the real-time path.
        room.check_room(res.engine, model.name, tenant, len(valid), bounds)

    keys = [new_object_key(info.format) for _, info in valid]

    def put(item: tuple[str, tuple[Upload, ImageInfo]]) -> None:
        key, (upload, info) = item
        res.store.put_file(key, upload.file, info.size, info.content_type)

    stored: Future[None] | None = None
    if len(valid) == 1:
        # The real-time path: the PUT runs while the row is inserted, and the insert waits
        # for it before its COMMIT (the order above holds; the request waits for the
        # longer of the two, not their sum). A failed PUT fails the insert: a 503.
        stored = _PUTS.submit(put, (keys[0], valid[0]))
    else:
        # A failed PUT raises here; the request then answers 503.
        with ThreadPoolExecutor(max_workers=min(16, len(valid))) as pool:
            list(pool.map(put, zip(keys, valid, strict=True)))

    passed = [Passed(u.filename, key, info) for key, (u, info) in zip(keys, valid, strict=True)]
    try:
        return record(
            res,
            caller,
            passed,
            rejected,
            model=model,
            priority=priority,
            deadline_s=deadline_s,
            as_batch=as_batch,
            question=question,
            callback_url=callback_url,
            started=started,
            # A caller that waits has subscribed to its job's id before the job exists.
            job_ids=[job_id] if job_id is not None and len(valid) == 1 else None,
            wait=wait,
            # A hint has already put its image inline.
            inline=None if hinted else lambda queued, ids: _inline(settings, queued, ids, valid),
            hinted=hinted,
            before_commit=stored.result if stored is not None else None,
        )
    except QueueFull:
        # Concurrent submissions filled the queue while these uploaded: keep none of it,
        # once a PUT still running has ended.
        _settled(stored)
        res.store.remove(keys)
        raise
    finally:
        # Whatever failed, the PUT ends before the request does: it reads the upload's
        # file, which is closed once the answer is sent.
        _settled(stored)


def _settled(stored: Future[None] | None) -> None:
    if stored is not None:
        concurrent.futures.wait([stored])


@dataclass(frozen=True)
class Passed:
    """A file of a submission that passed its checks, stored under ``key``."""

    filename: str
    key: str
    info: ImageInfo


def record(
    res: Resources,
    caller: Caller,
    passed: list[Passed],
    rejected: list[Rejection],
    *,
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    as_batch: bool,
    question: str | None,
    callback_url: str | None,
    started: float,
    job_ids: list[uuid.UUID] | None = None,
    wait: bool = False,
    inline: Callable[[int | None, list[str]], dict[str, bytes]] | None = None,
    before_commit: Callable[[], object] | None = None,
    hinted: bool = False,
) -> Submission:
    """The jobs of files already stored: their rows and the submission's audit row in one
    transaction, then their ids pushed (the order above), for the multipart path and the
    direct one (gateway.direct) alike. ``inline(queued_before, ids)``: the images that
    also go through Redis. ``before_commit``: called in the transaction after the insert
    (the object's PUT finishing); what it raises rolls the jobs back. ``hinted``: the
    lone job was announced (``_hint``), its id goes to its hint's taker. Raises QueueFull,
    and an IntegrityError (nothing committed) for the caller to answer."""
    settings = res.settings
    tenant = caller.tenant
    keys = [p.key for p in passed]
    detail: dict[str, Any] = {"accepted": len(passed), "rejected": len(rejected)}
    if wait:
        detail["wait"] = True

    def audit_row(batch_id: uuid.UUID | None, job_ids: list[uuid.UUID]) -> dict[str, Any]:
        # Jobs without a batch come one per request.
        if batch_id is not None:
            return audit.row(caller, Action.submit, ObjectType.batch, batch_id, **detail)
        return audit.row(caller, Action.submit, ObjectType.job, job_ids[0], **detail)

    # The wake-ups of the jobs' first events go with their push: one round trip, not two.
    try:
        with wake_publish.gathered(res.engine) as channels:
            created = jobs.create(
                res.engine,
                [NewJob(p.filename, p.key, p.info) for p in passed],
                as_batch=as_batch,
                tenant=tenant,
                model=model,
                priority=priority,
                max_attempts=settings.max_attempts,
                deadline_s=deadline_s,
                question=question,
                callback_url=callback_url,
                room=room.Room.of(settings),
                stages={stages.UPLOAD: (time.perf_counter() - started) * 1000.0},
                job_ids=job_ids,
                audit_row=audit_row,
                before_commit=before_commit,
            )
    except IntegrityError:
        raise  # Postgres answered: nothing of it committed
    except DBAPIError:
        # A connection lost during COMMIT raises here though the rows may be in: answering
        # 503 for jobs that exist would make a retry create them twice.
        found = committed_after_all(res, tenant, keys)
        if found is None:
            raise
        log.warning("the jobs' COMMIT failed on the wire but did commit; accepting them")
        created = found

    ids = [str(job_id) for job_id in created.job_ids]
    try:
        dispatch.push(
            res.redis,
            model.name,
            priority,
            ids,
            tenant,
            inline=inline(created.queued_before, ids) if inline else None,
            inline_ttl_s=settings.inline_ttl_s,
            wakes=channels,
            hinted=hinted,
        )
    except redis.RedisError:
        # Committed jobs are safe: the sweeper re-pushes pending jobs Redis never saw.
        log.warning("could not push %d job ids to Redis; the sweeper will", len(ids), exc_info=True)
    accepted = [(job_id, p.filename) for job_id, p in zip(created.job_ids, passed, strict=True)]
    metrics.count_submission(model.name, len(accepted), len(rejected))
    return Submission(created.batch_id, accepted, rejected)


def _hint(
    res: Resources, model: ModelManifest, job_id: uuid.UUID, valid: list[tuple[Upload, ImageInfo]]
) -> bool:
    """Announce a lone image to an idle worker before its job is stored and committed, so
    that the model runs on it meanwhile (common.dispatch ``hint``); False where it does not
    apply (several files, too large for Redis, head starts off)."""
    settings = res.settings
    if len(valid) != 1 or not settings.head_start:
        return False
    upload, info = valid[0]
    if info.size > settings.inline_max_bytes:
        return False
    dispatch.hint(res.redis, model.name, str(job_id), _read(upload, info), settings.inline_ttl_s)
    return True


def _read(upload: Upload, info: ImageInfo) -> bytes:
    """An upload's bytes (small: up to inline_max_bytes), its file left at its start for
    the PUT that may read it next."""
    upload.file.seek(0)
    data = upload.file.read(info.size)
    upload.file.seek(0)
    return data


def _inline(
    settings: Settings,
    queued: int | None,
    ids: list[str],
    valid: list[tuple[Upload, ImageInfo]],
) -> dict[str, bytes]:
    """The images that go to their worker through Redis too (settings inline_*): small
    ones, while the model's queue is short enough that Redis's share stays bounded."""
    if queued is None or queued + len(ids) > settings.inline_max_queued:
        return {}
    inline = {}
    for job_id, (upload, info) in zip(ids, valid, strict=True):
        if info.size <= settings.inline_max_bytes:
            inline[job_id] = _read(upload, info)
    return inline


class CommitUnknown(HepatoError):
    """Whether a submission's jobs committed cannot be told now (its COMMIT failed and
    Postgres cannot be asked): a 503, and its Idempotency-Key stays held."""


def committed_after_all(res: Resources, tenant: str, keys: list[str]) -> jobs.Created | None:
    """After ``jobs.create`` raised: the jobs it did commit (by their object keys, which
    no other job shares; one transaction, so all or none), or None if it did not."""
    try:
        with res.engine.connect() as conn:
            rows = conn.execute(
                select(Job.id, Job.object_key, Job.batch_id).where(
                    Job.tenant == tenant, Job.object_key.in_(keys)
                )
            ).all()
    except DBAPIError as exc:
        raise CommitUnknown("the database failed while the jobs were committed") from exc
    if not rows:
        return None
    by_key = {key: job_id for job_id, key, _ in rows}
    return jobs.Created(rows[0].batch_id, [by_key[key] for key in keys])


def check_callback(res: Resources, tenant: str, url: str) -> None:
    """422 naming the problem unless the tenant can sign webhooks and ``url`` may be
    called (the worker checks it again at every attempt)."""
    if not webhooks.has_secret(res.engine, res.settings, tenant):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"callback_url: tenant {tenant!r} has no webhook signing secret "
            f"(`hepato keys rotate-webhook-secret {tenant}` makes one; in the open mode, "
            "HEPATO_WEBHOOK_SECRET signs for the tenant 'public')",
        )
    try:
        egress.check(url, res.settings)
    except CallbackRefused as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"callback_url refused: {exc}"
        ) from None

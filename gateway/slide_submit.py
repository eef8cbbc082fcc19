"""Accepting a whole slide: sniff it, stream it to the store, record it, dispatch its
planning job.

The same ordering as images (gateway.submit): the object is stored before the rows
commit, and the rows commit before the planning job's id is pushed. The slide arrives
spooled to disk by the multipart parser; it is sniffed from that file (a truncated or
non-pyramidal file is refused here, naming the problem) and streamed from it to the
store a part at a time, so a slide of several GB never passes through memory. Reading
the slide itself (levels, MPP, tissue) is a worker's job. Its audit row (common.audit)
follows the commit."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import BinaryIO

import redis
from fastapi import HTTPException, status

from hepato.common import audit, dispatch, metrics, room, slide_jobs
from hepato.common.audit import Action, Caller, ObjectType
from hepato.common.constants import Priority
from hepato.common.exceptions import InvalidSlide, QueueFull
from hepato.common.images import display_name
from hepato.common.manifest import ModelManifest
from hepato.common.slides.sniff import file_suffix, sniff_slide
from hepato.common.storage import new_object_key
from hepato.gateway.deps import Resources
from hepato.gateway.submit import check_callback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideUpload:
    filename: str
    file: BinaryIO  # seekable, spooled by the multipart parser


@dataclass(frozen=True)
class SubmittedSlide:
    slide_id: uuid.UUID
    filename: str
    format: str
    size_bytes: int


def check_model(model: ModelManifest) -> None:
    """422 unless ``model`` can take slides: a detector that names its resolution."""
    if model.task != "detect":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"slides go to detection models; {model.name!r} is a {model.task} model",
        )
    if model.mpp is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model {model.name!r} names no mpp (the µm per pixel it was trained at) in its "
            "manifest, so slides cannot be tiled for it",
        )


def submit_slide(
    res: Resources,
    upload: SlideUpload,
    *,
    caller: Caller,
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    callback_url: str | None,
    deidentify: bool,
    mpp: float | None,
) -> SubmittedSlide:
    settings = res.settings
    tenant = caller.tenant
    check_model(model)
    if callback_url is not None:
        check_callback(res, tenant, callback_url)
    filename = display_name(upload.filename)
    size = upload.file.seek(0, os.SEEK_END)
    upload.file.seek(0)
    if size > settings.max_slide_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{filename}: {size} bytes, more than {settings.max_slide_bytes} "
            "(HEPATO_MAX_SLIDE_BYTES)",
        )
    try:
        sniffed = sniff_slide(upload.file)
    except InvalidSlide as exc:
        raise HTTPException(exc.status_code, f"{filename}: {exc}") from None
    res.redis.ping()
    bounds = room.Room.of(settings)
    room.check_room(res.engine, model.name, tenant, 1, bounds)
    fmt = sniffed.format.value
    key = new_object_key(file_suffix(fmt))
    upload.file.seek(0)
    res.store.put_file(key, upload.file, size, "application/octet-stream")
    try:
        accepted = slide_jobs.create(
            res.engine,
            slide_jobs.NewSlide(filename, key, fmt, size, deidentify=deidentify, mpp=mpp),
            tenant=tenant,
            model=model,
            priority=priority,
            max_attempts=settings.max_attempts,
            deadline_s=deadline_s,
            callback_url=callback_url,
            room=bounds,
        )
    except QueueFull:
        res.store.remove([key])
        raise
    audit.record_after_commit(
        res.engine,
        caller,
        Action.submit,
        ObjectType.slide,
        accepted.slide_id,
        format=fmt,
        size_bytes=size,
        deidentify=deidentify,
    )
    try:
        dispatch.push(res.redis, model.name, priority, [str(accepted.plan_job_id)], tenant)
    except redis.RedisError:
        # Committed: the sweeper re-pushes a pending job Redis never saw.
        log.warning("could not push slide %s's planning job; the sweeper will", accepted.slide_id)
    metrics.count_submission(model.name, 1, 0)
    return SubmittedSlide(accepted.slide_id, filename, fmt, size)

"""Direct uploads at the gateway: presigned PUT URLs out, and a commit that makes the
jobs of objects clients put themselves, with the gateway out of the data path.

The commit reads only what the header check needs, with ranged GETs (``HEAD_BYTES``
first, more only where the format puts its header further on, at most
``MAX_HEADER_BYTES``): the size (from the answer's Content-Range), the format sniffed
from the bytes, the dimensions and the pixel limit, as common.images checks them. What
it cannot see without reading the whole file (a truncated body, a broken PNG CRC) is
found by the worker's decode and fails that job alone. Then the jobs are made as
gateway.submit makes them: one transaction (room held, the batch, the jobs, the audit
row, their events), then the ids pushed; no image goes inline through Redis (the
gateway never had the bytes), the worker GETs it from the store. The keys and their
sweep are common.direct_uploads'.

Per file, as the multipart batch refuses a bad file by name and keeps the others: an
upload not found (never put, or another tenant's: the same answer, 404), past its
commit window (410), too large (413), not an accepted image (415, 422). A key already
committed (its job id exists) refuses the whole request (409) and creates nothing; a
full queue (429) keeps the staged objects for a retry, unlike the multipart path's,
which are deleted."""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, cast

from fastapi import HTTPException, status
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from hepato.common import metrics
from hepato.common.audit import Caller
from hepato.common.constants import Priority
from hepato.common.direct_uploads import StagedKey
from hepato.common.exceptions import (
    ImageTooLarge,
    InvalidImage,
    ObjectMissing,
    UnsupportedImageFormat,
    UploadRefused,
)
from hepato.common.images import (
    ALLOWED_FORMATS,
    MIME_TYPES,
    PIL_FORMATS,
    ImageInfo,
    pillow_reading,
    sniff_format,
)
from hepato.common.manifest import ModelManifest
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from hepato.gateway.deps import Resources
from hepato.gateway.submit import Passed, Rejection, Submission, check_callback, record

log = logging.getLogger(__name__)

# The first read covers the header of nearly every PNG, JPEG, BMP and WebP.
HEAD_BYTES = 16 * 1024
# Reads past the first go in blocks of this much (a JPEG's EXIF, a TIFF's IFD).
BLOCK_BYTES = 64 * 1024
MAX_HEADER_BYTES = 1024 * 1024
# What a PUT may have declared: the image's type, or none in particular. Anything else
# (text/html, say) would be served as such by the presigned image link.
_NEUTRAL_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# The one answer for an upload never put and for another tenant's.
NOT_FOUND = "no upload under this key: PUT the file to its URL before the commit"


class HeaderTooLong(InvalidImage):
    """The header check would read past MAX_HEADER_BYTES."""


class RangedFile(io.RawIOBase):
    """A staged object as a seekable file for Pillow: reads are served by ranged GETs,
    in blocks, and counted; past ``budget`` bytes fetched, HeaderTooLong."""

    def __init__(self, store: ObjectStore, key: str, size: int, head: bytes, budget: int):
        self.store, self.key, self.size, self.budget = store, key, size, budget
        self.fetched = len(head)
        self.segments: list[tuple[int, bytes]] = [(0, head)]
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self._span(self.pos, end)
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _span(self, begin: int, end: int) -> bytes:
        for start, data in self.segments:
            if start <= begin and end <= start + len(data):
                return data[begin - start : end - start]
        length = min(self.size - begin, max(end - begin, BLOCK_BYTES))
        if self.fetched + length > self.budget:
            raise HeaderTooLong(
                f"its header is longer than {self.budget} bytes, more than a direct upload "
                "reads; submit it with POST /v1/batches instead"
            )
        data, _, _ = self.store.read_range(self.key, begin, length)
        self.fetched += len(data)
        self.segments.append((begin, data))
        return data[: end - begin]


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """A WebP's canvas from its first chunk (Pillow would read the whole file)."""
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(
            head[28:30], "little"
        ) & 0x3FFF
    return None


def inspect_staged(store: ObjectStore, key: str, max_bytes: int, max_pixels: int) -> ImageInfo:
    """common.images' header checks of a staged object, from ranged reads; raise an
    InvalidImage naming what is wrong (UploadRefused 404 when there is no object)."""
    try:
        head, size, declared = store.read_range(key, 0, HEAD_BYTES)
    except ObjectMissing:
        raise UploadRefused(NOT_FOUND, 404) from None
    if not size:
        raise InvalidImage("empty file")
    if size > max_bytes:
        raise ImageTooLarge(f"file is larger than the limit of {max_bytes} bytes")
    fmt = sniff_format(head[:16])
    if fmt is None:
        raise UnsupportedImageFormat(
            "not an accepted image format (the bytes are not "
            + ", ".join(f.upper() for f in ALLOWED_FORMATS)
            + ")"
        )
    declared = declared.split(";")[0].strip().lower()
    if declared not in _NEUTRAL_TYPES and not declared.startswith("image/"):
        raise UnsupportedImageFormat(
            f"it was put with Content-Type {declared!r}; send an image type, or none"
        )
    if fmt == "webp":
        dims = _webp_size(head)
        if dims is None:
            raise InvalidImage("corrupt WEBP file: cannot read its header")
        width, height = dims
    else:
        width, height = _pillow_size(RangedFile(store, key, size, head, MAX_HEADER_BYTES), fmt)
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} pixels, the limit is {max_pixels} pixels")
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return ImageInfo(fmt, MIME_TYPES[fmt], width, height, size)


def _pillow_size(file: RangedFile, fmt: str) -> tuple[int, int]:
    with pillow_reading(fmt), Image.open(cast(IO[bytes], file), formats=[PIL_FORMATS[fmt]]) as img:
        return img.size


@dataclass(frozen=True)
class Staged:
    """One file of a commit: its key as parsed and the name shown with its job."""

    key: StagedKey
    filename: str


def _check(res: Resources, tenant: str, item: Staged, now: datetime) -> ImageInfo:
    settings = res.settings
    if item.key.tenant != tenant:
        # Another tenant's upload is answered as one that does not exist, unread.
        raise UploadRefused(NOT_FOUND, 404)
    commit_by = item.key.commit_by(settings.upload_url_expiry_s)
    if now >= commit_by:
        raise UploadRefused(
            f"its commit window closed at {commit_by.isoformat()}; upload it again", 410
        )
    return inspect_staged(
        res.store, item.key.key, settings.max_file_bytes, settings.max_image_pixels
    )


def commit(
    res: Resources,
    items: list[Staged],
    *,
    caller: Caller,
    model: ModelManifest,
    priority: Priority,
    deadline_s: float | None,
    as_batch: bool,
    question: str | None = None,
    callback_url: str | None = None,
) -> Submission:
    """Check each staged upload and make the jobs of those that pass (gateway.submit's
    order: the objects are stored already, then the rows commit, then the ids are
    pushed). Runs in a worker thread."""
    started = time.perf_counter()
    tenant = caller.tenant
    if callback_url is not None:
        check_callback(res, tenant, callback_url)
    question = question.replace("\x00", "\ufffd") if question is not None else None
    now = datetime.now(UTC)

    def check(item: Staged) -> ImageInfo | InvalidImage:
        try:
            return _check(res, tenant, item, now)
        except InvalidImage as exc:
            return exc

    if len(items) == 1:
        found = [check(items[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
            found = list(pool.map(check, items))
    valid = [(i, f) for i, f in zip(items, found, strict=True) if isinstance(f, ImageInfo)]
    rejected = [
        Rejection(i.filename, f)
        for i, f in zip(items, found, strict=True)
        if isinstance(f, InvalidImage)
    ]
    if not valid:
        metrics.count_submission(model.name, 0, len(rejected))
        return Submission(None, [], rejected)
    res.redis.ping()  # 503 up front while the queue is down, as gateway.submit does
    try:
        # No image goes inline through Redis: the gateway never had the bytes.
        return record(
            res,
            caller,
            [Passed(i.filename, i.key.key, info) for i, info in valid],
            rejected,
            model=model,
            priority=priority,
            deadline_s=deadline_s,
            as_batch=as_batch,
            question=question,
            callback_url=callback_url,
            started=started,
            job_ids=[i.key.job_id for i, _ in valid],
        )
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != "23505":
            raise
        raise _already_committed(res, tenant, valid) from None


def _already_committed(
    res: Resources, tenant: str, valid: list[tuple[Staged, ImageInfo]]
) -> HTTPException:
    by_id = {i.key.job_id: i.key.key for i, _ in valid}
    with res.engine.connect() as conn:
        taken = conn.execute(
            select(Job.id).where(Job.tenant == tenant, Job.id.in_(list(by_id)))
        ).scalars()
        named = ", ".join(f"{by_id[job_id]} (job {job_id})" for job_id in taken)
    return HTTPException(
        status.HTTP_409_CONFLICT,
        f"already committed, nothing of this request was kept: {named or 'one of its keys'}",
    )

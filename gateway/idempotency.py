"""``Idempotency-Key`` on submissions: a retried request creates nothing new.

A row keyed (tenant, key) is inserted before the submission runs, so of two concurrent
requests with one key exactly one inserts it; the other finds it ``in_progress`` (409).
The first request's 2xx answer is stored with the row and returned again to every
retry of the same request; the same key with a different request is a 422. A request
that fails (4xx, 429, 503: nothing of it was kept) frees its key for a retry; one whose
COMMIT was cut off is resolved by looking for its rows (gateway.submit), and while that
cannot be told its key stays held. Keys expire after ``HEPATO_IDEMPOTENCY_TTL_S``.

A gateway that dies between committing the jobs and storing the answer leaves its key
``in_progress``: retries get 409 until the key expires, never a second set of jobs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from starlette.datastructures import UploadFile

from hepato.common.tables import IdempotencyRecord as Record
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.submit import CommitUnknown

IN_PROGRESS = "in_progress"
COMPLETED = "completed"
# Expired rows removed per claim: enough to keep up with any submission rate.
PURGE_BATCH = 100
CHUNK_BYTES = 1 << 20
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

M = TypeVar("M", bound=BaseModel)


async def request_digest(request: Request) -> str:
    """SHA-256 of the method, path, every form field and every file's name and bytes, in
    order (the multipart boundary and part headers do not count); of any other body, its
    bytes."""
    digest = hashlib.sha256()

    def feed(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big") + data)

    feed(f"{request.method} {request.url.path}".encode())
    if not request.headers.get("content-type", "").startswith(_FORM_TYPES):
        # A JSON body (a direct upload's commit): its bytes are the request.
        feed(b"body:" + await request.body())
        return digest.hexdigest()
    form = await request.form()  # parsed once per request; FastAPI already did
    for name, value in form.multi_items():
        feed(name.encode())
        if isinstance(value, UploadFile):
            content = hashlib.sha256()
            await value.seek(0)
            while chunk := await value.read(CHUNK_BYTES):
                content.update(chunk)
            await value.seek(0)
            feed(b"file:" + (value.filename or "").encode())
            feed(content.digest())
        else:
            feed(b"field:" + value.encode())
    return digest.hexdigest()


@dataclass
class Idempotency:
    res: Resources
    request: Request
    tenant: str
    key: str | None

    async def run(
        self, success_status: int, call: Callable[[], Awaitable[M | Response]]
    ) -> M | Response:
        """Run a submission once per key: ``call`` returns a response model (sent with
        ``success_status``) or a Response."""
        if self.key is None:
            return await call()
        request_hash = await request_digest(self.request)
        replay = await run_in_threadpool(self._claim, request_hash)
        if replay is not None:
            return replay
        try:
            answer = await call()
        except CommitUnknown:
            raise  # the jobs may be in: the key stays held (409) rather than a duplicate
        except Exception:
            await run_in_threadpool(self._release, request_hash)
            raise
        # A cancelled request (BaseException) keeps its key in_progress: whether its jobs
        # were committed is unknown, and a 409 is safer than a duplicate.
        code, body = _as_json(answer, success_status)
        if not 200 <= code < 300:
            await run_in_threadpool(self._release, request_hash)
            return answer
        await run_in_threadpool(self._complete, request_hash, code, body)
        return JSONResponse(status_code=code, content=body)

    def _mine(self) -> Any:
        return (Record.tenant == self.tenant) & (Record.key == self.key)

    def _claim(self, request_hash: str) -> JSONResponse | None:
        """Insert the key as in_progress (None: go on), or the answer for a key already
        there: the stored response, 409 while in progress, 422 for another request."""
        ttl = timedelta(seconds=self.res.settings.idempotency_ttl_s)
        fresh = {
            "request_hash": request_hash,
            "state": IN_PROGRESS,
            "status_code": None,
            "response": None,
            "created_at": func.now(),
            "expires_at": func.now() + ttl,
        }
        claim = (
            insert(Record)
            .values(tenant=self.tenant, key=self.key, **fresh)
            # An expired key is taken over as if it were new.
            .on_conflict_do_update(
                constraint="pk_idempotency_keys", set_=fresh, where=Record.expires_at <= func.now()
            )
            .returning(Record.key)
        )
        with self.res.engine.begin() as conn:
            expired = (
                select(Record.tenant, Record.key)
                .where(Record.expires_at <= func.now())
                .limit(PURGE_BATCH)
                .with_for_update(skip_locked=True)
            )
            conn.execute(delete(Record).where(tuple_(Record.tenant, Record.key).in_(expired)))
            if conn.execute(claim).first() is not None:
                return None
            row = conn.execute(select(Record).where(self._mine())).one()
        if row.request_hash != request_hash:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"Idempotency-Key {self.key!r} was used for a different request; "
                "use a new key for a new request",
            )
        if row.state == IN_PROGRESS:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"a request with Idempotency-Key {self.key!r} is still in progress; retry later",
            )
        return JSONResponse(
            status_code=row.status_code,
            content=row.response,
            headers={"Idempotent-Replayed": "true"},
        )

    def _complete(self, request_hash: str, code: int, body: Any) -> None:
        with self.res.engine.begin() as conn:
            conn.execute(
                update(Record)
                .where(self._mine(), Record.request_hash == request_hash)
                .values(state=COMPLETED, status_code=code, response=body)
            )

    def _release(self, request_hash: str) -> None:
        with self.res.engine.begin() as conn:
            conn.execute(
                delete(Record).where(
                    self._mine(), Record.request_hash == request_hash, Record.state == IN_PROGRESS
                )
            )


def _as_json(answer: BaseModel | Response, success_status: int) -> tuple[int, Any]:
    if isinstance(answer, BaseModel):
        return success_status, answer.model_dump(mode="json")
    body = bytes(answer.body)
    return answer.status_code, json.loads(body) if body else None


async def get_idempotency(
    request: Request,
    res: ResourcesDep,
    tenant: TenantDep,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Retry-safe submission: the same key and request give the first "
            "answer again; the same key with another request is a 422",
        ),
    ] = None,
) -> Idempotency:
    return Idempotency(res=res, request=request, tenant=tenant, key=key)


IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]

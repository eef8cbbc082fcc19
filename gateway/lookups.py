"""Finding a tenant's rows for a request, and the links put in answers."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from hepato.common import schemas
from hepato.common.tables import Batch, Job, Slide
from hepato.gateway.auth import TenantDep
from hepato.gateway.deps import Resources, SessionDep

T = TypeVar("T", Job, Batch, Slide)

# What a route that looks a row up by its id adds to its OpenAPI `responses`: the lookup's 404.
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorOut}}


def public_url(request: Request, res: Resources, name: str, **params: str) -> str:
    if res.settings.public_url:
        return res.settings.public_url.rstrip("/") + request.app.url_path_for(name, **params)
    return str(request.url_for(name, **params))


def job_or_404(session: Session, raw: str, tenant: str) -> Job:
    return _row_or_404(session, Job, raw, tenant, "job")


def batch_or_404(session: Session, raw: str, tenant: str) -> Batch:
    return _row_or_404(session, Batch, raw, tenant, "batch")


def slide_or_404(session: Session, raw: str, tenant: str) -> Slide:
    return _row_or_404(session, Slide, raw, tenant, "slide")


def _row_or_404(session: Session, model: type[T], raw: str, tenant: str, kind: str) -> T:
    """The tenant's row with this id. A malformed id, a missing one and another tenant's
    are one answer, so ids of other tenants cannot be probed."""
    try:
        row = session.get(model, uuid.UUID(raw))
    except ValueError:
        row = None
    if row is None or row.tenant != tenant:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {kind} with id {raw!r}")
    return row


def _path_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    return job_or_404(session, job_id, tenant)


def _path_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> Batch:
    return batch_or_404(session, batch_id, tenant)


# The row named by the route's path, in the request's session (SessionDep: one per
# request). Not for streams: that session would stay open as long as they do.
JobDep = Annotated[Job, Depends(_path_job)]
BatchDep = Annotated[Batch, Depends(_path_batch)]

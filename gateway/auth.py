"""Who is calling: the tenant of the request's API key, as a dependency alias
(``TenantDep``, as full-stack-fastapi-template's deps do), and for the audit trail the
key's id and the client's address with it (``CallerDep``, common.audit.Caller).

The key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A missing,
unknown or revoked key is a 401 with ``WWW-Authenticate``. With ``HEPATO_AUTH=open``
no key is asked for and every request acts as the tenant ``public``."""

from __future__ import annotations

from typing import Annotated

from anyio import to_thread
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from hepato.common.audit import Caller
from hepato.common.db import get_engine
from hepato.common.tenants import PUBLIC_TENANT, key_owner, tenant_of
from hepato.gateway.deps import ResourcesDep

# auto_error=False: the dependency below answers 401 itself, with one message for
# every way a key can be wrong. Declared through Security so /docs offers both schemes.
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


MISSING = "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
# One answer for unknown and revoked keys: which keys exist is not told.
INVALID = "the API key is not valid (unknown or revoked)"


def _unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = 'Bearer realm="hepato"'
    if error:
        challenge += f', error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge}
    )


async def get_tenant(
    request: Request,
    res: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    header_key: Annotated[str | None, Security(api_key_header)],
) -> str:
    """The key's tenant; its id is left on ``request.state.key_id`` for get_caller (one
    lookup per request: FastAPI caches a dependency's value within a request)."""
    request.state.key_id = None
    if res.settings.auth == "open":
        return PUBLIC_TENANT
    key = credentials.credentials if credentials else header_key
    if not key:
        raise _unauthorized(MISSING)
    owner = await to_thread.run_sync(key_owner, res.engine, key)  # a database read
    if owner is None:
        raise _unauthorized(INVALID, "invalid_token")
    request.state.key_id = owner.key_id
    return owner.tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def get_caller(request: Request, tenant: TenantDep) -> Caller:
    client = request.client.host if request.client else None
    return Caller(tenant=tenant, key_id=request.state.key_id, client=client)


# Who the request's audit rows name (common.audit).
CallerDep = Annotated[Caller, Depends(get_caller)]


class KeyBeforeBody:
    """Refuse an upload without a valid key before its body is read. FastAPI parses (and
    spools to disk) the whole multipart body before any dependency runs, so without this
    an anonymous client could make the gateway store gigabytes only to be told 401. The
    route's TenantDep still decides which tenant the request is."""

    def __init__(self, app: ASGIApp, database_url: str) -> None:
        self.app = app
        self.database_url = database_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
        try:
            tenant = key and await to_thread.run_sync(tenant_of, get_engine(self.database_url), key)
        except Exception:  # outside the app's handlers: answer its 503 here
            response = JSONResponse(
                {"detail": "database unavailable; retry later"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)
            return
        if tenant:
            await self.app(scope, receive, send)
            return
        error = _unauthorized(INVALID, "invalid_token") if key else _unauthorized(MISSING)
        response = JSONResponse(
            {"detail": error.detail},
            status_code=error.status_code,
            headers={**(error.headers or {}), "Connection": "close"},
        )
        await response(scope, receive, send)

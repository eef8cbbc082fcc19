"""Who is calling: the tenant of the request's API key, as a dependency alias
(``TenantDep``, as full-stack-fastapi-template's deps do).

The key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A missing,
unknown or revoked key is a 401 with ``WWW-Authenticate``. With ``HEPATO_AUTH=open``
no key is asked for and every request acts as the tenant ``public``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from common.tenants import PUBLIC_TENANT, tenant_of
from gateway.deps import ResourcesDep

# auto_error=False: the dependency below answers 401 itself, with one message for
# every way a key can be wrong. Declared through Security so /docs offers both schemes.
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


def _unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = 'Bearer realm="hepato"'
    if error:
        challenge += f', error="{error}"'
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge}
    )


def get_tenant(
    res: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    header_key: Annotated[str | None, Security(api_key_header)],
) -> str:
    if res.settings.auth == "open":
        return PUBLIC_TENANT
    key = credentials.credentials if credentials else header_key
    if not key:
        raise _unauthorized(
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    tenant = tenant_of(res.engine, key)
    if tenant is None:
        # One answer for unknown and revoked keys: which keys exist is not told.
        raise _unauthorized("the API key is not valid (unknown or revoked)", "invalid_token")
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]

"""Tenants and their API keys.

A key is 256 random bits; Postgres keeps only its SHA-256, looked up by equality, so
neither a database dump nor a timing difference in the comparison gives a usable key
(a hash of a high-entropy token needs no slow KDF). A key is shown once, at creation."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.orm import Session

from hepato.common.exceptions import HepatoError
from hepato.common.tables import ApiKey

# The tenant every request acts as when HEPATO_AUTH=open, and that owns the rows
# written before tenants existed.
PUBLIC_TENANT = "public"
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KEY_MARK = "hpk_"
# Shown in listings: the mark and 8 characters (48 of the key's 256 bits).
PREFIX_CHARS = len(KEY_MARK) + 8


class InvalidTenant(HepatoError):
    """A tenant name outside TENANT_PATTERN."""


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    tenant: str
    name: str | None
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidTenant(
            f"tenant {tenant!r}: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter "
            "or digit"
        )
    return tenant


def create_key(engine: Engine, tenant: str, name: str | None = None) -> CreatedKey:
    check_tenant(tenant)
    key = KEY_MARK + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(6)
    with engine.begin() as conn:
        conn.execute(
            insert(ApiKey).values(
                id=key_id,
                tenant=tenant,
                name=name,
                prefix=key[:PREFIX_CHARS],
                key_hash=hash_key(key),
            )
        )
    return CreatedKey(key_id=key_id, tenant=tenant, name=name, key=key)


def tenant_of(engine: Engine, key: str) -> str | None:
    """The tenant of a live key; None for an unknown or revoked one."""
    with engine.connect() as conn:
        return conn.execute(
            select(ApiKey.tenant).where(
                ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
            )
        ).scalar_one_or_none()


def revoke_key(engine: Engine, key_id: str) -> datetime | None:
    """Revoke a key; its revocation time (the first one, if it already was), None if no
    key has this id."""
    with engine.begin() as conn:
        conn.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
        return conn.execute(
            select(ApiKey.revoked_at).where(ApiKey.id == key_id)
        ).scalar_one_or_none()


def list_keys(engine: Engine, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    with Session(engine) as session:
        return list(session.scalars(query))

"""Tenants and their API keys.

A key is 256 random bits; Postgres keeps only its SHA-256, looked up by equality, so
neither a database dump nor a timing difference in the comparison gives a usable key
(a hash of a high-entropy token needs no slow KDF). A key is shown once, at creation.

Each tenant also has its own webhook signing secret, made with its first key and shown
then, once; rotating it shows the new one. Unlike a key it is stored as is: the worker
signs with the secret itself."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as upsert
from sqlalchemy.orm import Session

from hepato.common.constants import PUBLIC_TENANT
from hepato.common.exceptions import HepatoError
from hepato.common.tables import ApiKey, WebhookSecret

__all__ = ["PUBLIC_TENANT"]  # the open mode's tenant (defined with the queue names)

TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KEY_MARK = "hpk_"
# Shown in listings: the mark and 8 characters (48 of the key's 256 bits).
PREFIX_CHARS = len(KEY_MARK) + 8
# Standard Webhooks' form: the mark, then the base64 of the HMAC key (256 bits here).
WEBHOOK_SECRET_MARK = "whsec_"


class InvalidTenant(HepatoError):
    """A tenant name outside TENANT_PATTERN."""


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    tenant: str
    name: str | None
    key: str
    # The tenant's webhook secret when this key made it (its first key); None when the
    # tenant already had one, which stays as it was.
    webhook_secret: str | None = None


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
        webhook_secret = _first_webhook_secret(conn, tenant)
    return CreatedKey(
        key_id=key_id, tenant=tenant, name=name, key=key, webhook_secret=webhook_secret
    )


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_MARK + base64.b64encode(secrets.token_bytes(32)).decode()


def _first_webhook_secret(conn: Connection, tenant: str) -> str | None:
    """Give the tenant a webhook secret unless it has one; the new secret, else None."""
    secret = new_webhook_secret()
    made = conn.execute(
        upsert(WebhookSecret)
        .values(tenant=tenant, secret=secret)
        .on_conflict_do_nothing(index_elements=[WebhookSecret.tenant])
        .returning(WebhookSecret.tenant)
    ).first()
    return secret if made else None


def rotate_webhook_secret(engine: Engine, tenant: str) -> str:
    """A new webhook secret for the tenant (made if it had none); the old one keeps
    signing alongside for HEPATO_WEBHOOK_SECRET_OVERLAP_S."""
    check_tenant(tenant)
    secret = new_webhook_secret()
    statement = upsert(WebhookSecret).values(tenant=tenant, secret=secret)
    with engine.begin() as conn:
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[WebhookSecret.tenant],
                set_={
                    "secret": statement.excluded.secret,
                    "previous_secret": WebhookSecret.secret,
                    "rotated_at": func.now(),
                },
            )
        )
    return secret


def has_webhook_secret(engine: Engine, tenant: str) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(select(WebhookSecret.tenant).where(WebhookSecret.tenant == tenant)).first()
            is not None
        )


@dataclass(frozen=True)
class KeyOwner:
    tenant: str
    key_id: str  # api_keys.id: what the audit trail names, never the key


def key_owner(engine: Engine, key: str) -> KeyOwner | None:
    """The tenant and id of a live key; None for an unknown or revoked one."""
    with engine.connect() as conn:
        row = conn.execute(
            select(ApiKey.tenant, ApiKey.id).where(
                ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
            )
        ).one_or_none()
    return KeyOwner(row.tenant, row.id) if row is not None else None


def tenant_of(engine: Engine, key: str) -> str | None:
    """The tenant of a live key; None for an unknown or revoked one."""
    owner = key_owner(engine, key)
    return owner.tenant if owner is not None else None


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

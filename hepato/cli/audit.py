"""``hepato audit``: an operator's read of the audit trail (common.audit) in
HEPATO_DATABASE_URL: who read and did what, filtered by tenant, time, action and object."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hepato.common import audit
from hepato.common.audit import Action
from hepato.common.db import get_engine
from hepato.common.settings import get_settings
from hepato.common.tables import AuditEvent


def _when(raw: str, name: str) -> datetime:
    """An ISO 8601 date or time; without a zone, UTC."""
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise typer.BadParameter(
            f"{raw!r} is not an ISO 8601 date or time (2026-11-01, 2026-11-01T09:30:00+01:00)",
            param_hint=name,
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _object(raw: str | None) -> uuid.UUID | None:
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise typer.BadParameter(
            f"{raw!r} is not a job, batch or slide id", param_hint="--object"
        ) from None


def as_dict(row: AuditEvent) -> dict[str, object]:
    return {
        "id": row.id,
        "at": row.at.isoformat(),
        "tenant": row.tenant,
        "key_id": row.key_id,
        "client": row.client,
        "action": row.action,
        "object_type": row.object_type,
        "object_id": str(row.object_id) if row.object_id else None,
        "detail": row.detail,
    }


def audit_command(
    tenant: Annotated[str, typer.Option(help="The tenant whose trail to show")],
    since: Annotated[str, typer.Option(help="From this ISO date or time (UTC unless zoned)")],
    until: Annotated[str | None, typer.Option(help="Before this ISO date or time")] = None,
    action: Annotated[Action | None, typer.Option(help="Only this action")] = None,
    object_id: Annotated[
        str | None, typer.Option("--object", help="Only rows about this job, batch or slide id")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows, oldest first")] = 1000,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of a table")
    ] = False,
) -> None:
    """Who read and did what: a tenant's audit rows from --since, oldest first (key ids,
    never keys; no image content or file names are ever recorded)."""
    rows = audit.query(
        get_engine(get_settings().database_url),
        tenant=tenant,
        since=_when(since, "--since"),
        until=_when(until, "--until") if until is not None else None,
        action=action,
        object_id=_object(object_id),
        limit=limit,
    )
    if as_json:
        for row in rows:
            typer.echo(json.dumps(as_dict(row), separators=(",", ":")))
    else:
        table = Table(title=f"Audit trail of {tenant}")
        for col in ("at", "action", "object", "key id", "client", "detail"):
            table.add_column(col, overflow="fold")
        for row in rows:
            obj = f"{row.object_type} {row.object_id}" if row.object_type else "-"
            table.add_row(
                row.at.isoformat(timespec="milliseconds"),
                row.action,
                obj,
                row.key_id or "-",
                row.client or "-",
                json.dumps(row.detail, separators=(",", ":")) if row.detail else "-",
            )
        Console(width=200).print(table)
    if len(rows) == limit:
        typer.echo(f"{limit} rows shown, the limit: narrow the time or raise --limit", err=True)

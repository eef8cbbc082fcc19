"""``hepato keys``: create, list and revoke tenants' API keys, and rotate their webhook
signing secrets (in HEPATO_DATABASE_URL)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from hepato.common import tenants
from hepato.common.db import get_engine
from hepato.common.settings import get_settings

app = typer.Typer(
    help="Tenants' API keys. Only a key's SHA-256 is stored: a key is shown once, at creation.",
    no_args_is_help=True,
)


def _engine() -> Engine:
    return get_engine(get_settings().database_url)


@app.command()
def create(
    tenant: Annotated[str, typer.Argument(help="Tenant the key acts as ([a-z0-9._-], ≤ 64)")],
    name: Annotated[str | None, typer.Option(help="A label, e.g. who holds the key")] = None,
) -> None:
    """Make a key for TENANT and print it, once: it cannot be shown again."""
    try:
        created = tenants.create_key(_engine(), tenant, name)
    except tenants.InvalidTenant as exc:
        raise typer.BadParameter(str(exc), param_hint="TENANT") from None
    typer.echo(f"key id:  {created.key_id}")
    typer.echo(f"tenant:  {created.tenant}")
    typer.echo(f"api key: {created.key}")
    if created.webhook_secret is not None:
        typer.echo(f"webhook secret: {created.webhook_secret}")
    typer.echo(
        "store the key now: it is shown only this once (the database keeps a hash)", err=True
    )
    if created.webhook_secret is not None:
        typer.echo(
            "the webhook secret verifies this tenant's webhooks; it is shown only now "
            f"(`hepato keys rotate-webhook-secret {created.tenant}` replaces it)",
            err=True,
        )


@app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None,
) -> None:
    """Every key: tenant, id, prefix, name, created, revoked. Never the key itself."""
    table = Table(title="API keys")
    for col in ("tenant", "key id", "prefix", "name", "created", "revoked"):
        table.add_column(col, overflow="fold")
    for key in tenants.list_keys(_engine(), tenant):
        table.add_row(
            key.tenant,
            key.id,
            key.prefix + "…",
            key.name or "-",
            key.created_at.isoformat(timespec="seconds"),
            key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-",
        )
    Console(width=200).print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, from `hepato keys list`")],
) -> None:
    """Revoke a key: from now on it is refused (401)."""
    revoked_at = tenants.revoke_key(_engine(), key_id)
    if revoked_at is None:
        typer.echo(f"no key with id {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"key {key_id} revoked at {revoked_at.isoformat(timespec='seconds')}")


@app.command("rotate-webhook-secret")
def rotate_webhook_secret(
    tenant: Annotated[str, typer.Argument(help="Tenant whose webhooks the secret signs")],
) -> None:
    """Give TENANT a new webhook signing secret and print it, once. Webhooks carry a
    signature by the previous secret too for HEPATO_WEBHOOK_SECRET_OVERLAP_S."""
    try:
        secret = tenants.rotate_webhook_secret(_engine(), tenant)
    except tenants.InvalidTenant as exc:
        raise typer.BadParameter(str(exc), param_hint="TENANT") from None
    typer.echo(f"tenant:         {tenant}")
    typer.echo(f"webhook secret: {secret}")
    typer.echo("store the secret now: it is shown only this once", err=True)

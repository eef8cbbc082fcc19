"""``hepato retention run``: delete finished jobs older than a number of days, with their
events, emptied batches, finished slides and objects (common.retention), after making
the day partitions of the days ahead that are missing (common.partitions)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hepato.common import partitions, retention
from hepato.common.db import get_engine
from hepato.common.settings import get_settings
from hepato.common.storage import ObjectStore

app = typer.Typer(
    help="Retention of finished jobs and their objects (HEPATO_RETENTION_DAYS).",
    no_args_is_help=True,
)


@app.command("run")
def run_pass(
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than",
            help="Days since a job finished [default: HEPATO_RETENTION_DAYS]",
            min=0.0,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; delete nothing")
    ] = False,
    chunk: Annotated[
        int | None,
        typer.Option(help="Jobs per transaction [default: HEPATO_RETENTION_CHUNK]", min=1),
    ] = None,
) -> None:
    """Delete what finished more than --older-than days ago, until none is left, in
    transactions of --chunk jobs; print the counts. Exits 1 if another pass is running."""
    settings = get_settings()
    days = older_than if older_than is not None else settings.retention_days
    if not days:
        raise typer.BadParameter(
            "no age: pass --older-than DAYS (> 0) or set HEPATO_RETENTION_DAYS",
            param_hint="--older-than",
        )
    engine = get_engine(settings.database_url)
    console = Console()
    if not dry_run:
        made = partitions.ensure(engine, settings.partition_days_ahead)
        if made:
            console.print(f"partitions made for {', '.join(map(str, made))}")
    done = retention.run(
        engine,
        ObjectStore(settings, pool_size=4),
        days,
        chunk=chunk or settings.retention_chunk,
        dry_run=dry_run,
    )
    if not done.ran:
        console.print("another retention pass is running; nothing done")
        raise typer.Exit(1)
    verb = "would delete" if dry_run else "deleted"
    table = Table(title=f"{verb} (finished > {days:g} d ago)")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, n in done.counts().items():
        if dry_run and name in ("objects_failed", "transactions"):
            continue
        table.add_row(name.replace("_", " "), str(n))
    console.print(table)

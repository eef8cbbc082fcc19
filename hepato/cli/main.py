"""The ``hepato`` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from hepato.bench.cli import app as bench_app
from hepato.cli.audit import audit_command
from hepato.cli.client import register as register_client_commands
from hepato.cli.keys import app as keys_app
from hepato.cli.models import app as models_app
from hepato.cli.retention import app as retention_app
from hepato.common.settings import REPO_ROOT, get_settings

app = typer.Typer(
    help="HepatoAI: microbatched inference for histopathology images.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")
app.add_typer(retention_app, name="retention")  # old finished jobs (common.retention)
register_client_commands(app)  # hepato submit | status | results
app.command("audit")(audit_command)  # who read and did what (common.audit)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Bind address [default: settings]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: settings]")] = None,
) -> None:
    """Run the HTTP gateway."""
    import uvicorn

    from hepato.common import heap
    from hepato.common.db import GATEWAY_CONNECTIONS, name_connections
    from hepato.gateway.app import create_app

    settings = get_settings()
    _logging()
    name_connections(GATEWAY_CONNECTIONS)
    app = create_app(settings)
    heap.settle()  # everything is loaded: later collections skip it
    uvicorn.run(
        app,
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model to serve; repeat for more [default: settings]"),
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit when no job is left")] = False,
) -> None:
    """Run one worker process: load its models once, then drain their queues in
    microbatches, one model per batch, taking turns."""
    from hepato.common.exceptions import HepatoError
    from hepato.worker.runner import run_worker

    _logging()
    try:
        run_worker(get_settings(), burst=burst, models=model or ())
    except HepatoError as exc:
        logging.getLogger("hepato").error("%s", exc)
        raise typer.Exit(2) from None


@app.command()
def migrate() -> None:
    """Apply the database migrations (Alembic upgrade to head)."""
    from hepato.common.exceptions import HepatoError
    from hepato.common.migrate import run_migrations

    _logging("WARNING")
    try:
        run_migrations()
    except HepatoError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo("database is at the latest revision")


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    port: Annotated[int, typer.Option(help="Gateway port")] = 8000,
    samples: Annotated[Path, typer.Option(help="Images to submit")] = REPO_ROOT / "samples",
    repeat: Annotated[int, typer.Option(min=1, help="Submit the samples this many times")] = 1,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the stack up until Ctrl-C after the run")
    ] = True,
    slide: Annotated[
        bool, typer.Option(help="After the images, run a small synthetic whole slide")
    ] = True,
) -> None:
    """Start the whole stack locally (Postgres, Redis, S3, gateway, workers), run the
    sample images and one small synthetic whole slide through it and show the results."""
    from hepato.devstack.up import run_stack

    _logging("WARNING")
    raise typer.Exit(
        run_stack(
            workers=workers,
            port=port,
            samples=samples,
            repeat=repeat,
            keep_running=keep_running,
            slide=slide,
        )
    )


if __name__ == "__main__":
    app()

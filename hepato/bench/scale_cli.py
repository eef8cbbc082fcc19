"""``hepato bench scale``: the command line of the lab-scale benchmark (hepato.bench.scale)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from hepato.bench.options import BenchOptions
from hepato.common.settings import get_settings

_D = BenchOptions()


def scale(
    out: Annotated[Path, typer.Option(help="Where bench-scale.json and .md go")] = _D.out,
    size: Annotated[
        list[int] | None,
        typer.Option(
            min=1,
            help=(
                "Rows the jobs table is filled to; each run is paired with one on an"
                " empty table; repeatable"
            ),
            show_default="1000000 5000000; 20000 with --quick",
        ),
    ] = None,
    workers: Annotated[
        list[int] | None,
        typer.Option(
            min=1, help="Burst workers per run; repeatable", show_default="1 2 4; 1 2 with --quick"
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Null-model jobs per run", show_default="2000; 300 with --quick"),
    ] = None,
    repeat: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Runs per size and worker count; the targets take their median",
            show_default="3; 1 with --quick",
        ),
    ] = None,
    events_per_job: Annotated[int, typer.Option(min=0, help="job_events rows per filler job")] = 1,
    sample_ms: Annotated[float, typer.Option(help="Lock-wait sampling period, ms")] = 20.0,
    timeout_s: Annotated[float, typer.Option(help="Longest one run may take, s")] = 600.0,
    quick: Annotated[bool, typer.Option(help="Small sizes and few jobs, for the test suite")] = (
        False
    ),
) -> None:
    """Claim + complete with the null model and N burst workers against a jobs table
    filled (in Postgres, not through the API) to each size: jobs/s, p99 claim and complete
    transaction, Postgres lock wait and CPU per job, against issue 18's targets. Starts
    Postgres, Redis and S3 of its own; writes bench-scale.json and bench-scale.md to --out."""
    import sys

    try:
        import psutil  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the scale bench needs psutil: pip install 'hepato[bench]'"
        ) from None
    from hepato.bench.scale import (
        QUICK_JOBS,
        QUICK_REPEAT,
        QUICK_SIZES,
        QUICK_WORKERS,
        ScaleOptions,
        run_scale,
    )
    from hepato.bench.scale_report import print_report
    from hepato.common.exceptions import BenchFailed

    base = ScaleOptions()
    opts = ScaleOptions(
        out=out,
        sizes=tuple(size or (QUICK_SIZES if quick else base.sizes)),
        workers=tuple(workers or (QUICK_WORKERS if quick else base.workers)),
        jobs=jobs or (QUICK_JOBS if quick else base.jobs),
        repeat=repeat or (QUICK_REPEAT if quick else base.repeat),
        events_per_job=events_per_job,
        sample_ms=sample_ms,
        timeout_s=timeout_s,
    )
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_scale(opts, get_settings(), ["hepato", "bench", "scale", *sys.argv[3:]])
    except BenchFailed as exc:
        typer.echo(f"hepato bench scale failed: {exc}", err=True)
        typer.echo(f"partial report in {out}", err=True)
        raise typer.Exit(1) from None
    print_report(result)
    typer.echo(f"report: {', '.join(result['files'])}")

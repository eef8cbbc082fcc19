"""``hepato submit | status | results``: the Python client from the command line, for
images (batches) and whole slides (hepato.cli.slides).

Exit codes: 0 every job done, 1 some job failed (or a file was refused, or a slide
finished with failed tiles, failed or was canceled), 2 a usage or connection error, or an
error answer from the gateway, with its message."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from hepato.cli import slides as slide_cli
from hepato.client import (
    BatchEvent,
    BatchOut,
    BatchRef,
    Event,
    HepatoAPIError,
    HepatoClient,
    HepatoClientError,
    JobEvent,
    SlideFormats,
    find_images,
)
from hepato.common.constants import TERMINAL_STATES, JobState, Priority

OK, SOME_FAILED, ERROR = 0, 1, 2
NOT_DONE = frozenset({JobState.failed, JobState.expired, JobState.canceled})

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar="HEPATO_URL", help="Gateway URL (default: http://127.0.0.1:8000)"),
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="HEPATO_API_KEY", help="API key", show_default=False),
]

err = Console(stderr=True)


class ExportFormat(StrEnum):
    geojson = "geojson"
    coco = "coco"
    csv = "csv"


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(ERROR)


@contextmanager
def _client(url: str | None, api_key: str | None) -> Iterator[HepatoClient]:
    """The client, with every client error turned into exit code 2 and one line."""
    try:
        with HepatoClient(url, api_key) as client:
            yield client
    except HepatoAPIError as exc:
        _fail(f"the gateway answered {exc.status_code}: {exc.detail}")
    except HepatoClientError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(str(exc))


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:6.1f} images/s", style="progress.data.speed")


class Tracker:
    """Progress of a submission: files uploaded, jobs finished (done or not), from
    callbacks that run on the client's thread."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.uploaded: set[Path] = set()  # a retried request sends its files again
        self.accepted = 0
        self.states: dict[uuid.UUID, JobState] = {}
        self.counts: dict[str, int] = {}
        self.upload = progress.add_task("uploaded", total=total, failed="")
        self.finish = progress.add_task("finished", total=None, failed="failed 0")

    def on_uploaded(self, path: Path) -> None:
        with self.lock:
            self.uploaded.add(path)
            self.progress.update(self.upload, completed=len(self.uploaded))

    def on_batch(self, ref: BatchRef) -> None:
        with self.lock:
            self.accepted += ref.accepted
            self.progress.update(self.finish, total=self.accepted)
            if ref.rejected:
                refused = len(ref.rejected)
                self.progress.update(self.upload, failed=f"[red]refused {refused}[/red]")

    def follow(self) -> Callable[[Event], None]:
        """An on_event for ``wait``, shared by every batch of the submission."""

        def on_event(event: Event) -> None:
            with self.lock:
                if isinstance(event, JobEvent):
                    self.states[event.job_id] = event.state
                elif isinstance(event, BatchEvent):
                    self.counts[str(event.batch_id)] = sum(
                        n for s, n in event.counts.items() if s in TERMINAL_STATES
                    )
                self._show()

        return on_event

    def _show(self) -> None:
        ended = [s for s in self.states.values() if s in TERMINAL_STATES]
        failed = sum(1 for s in ended if s != JobState.done)
        # Events cover the jobs that changed while we listened; batch counts cover all.
        finished = max(len(ended), sum(self.counts.values()))
        self.progress.update(self.finish, completed=finished, failed=f"failed {failed}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err,
    )


def _summary(batches: list[BatchOut]) -> tuple[int, dict[str, int]]:
    totals: dict[str, int] = {}
    for b in batches:
        for state, n in b.counts.items():
            totals[state] = totals.get(state, 0) + n
    return sum(b.total for b in batches), totals


def submit(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Image files, directories (walked for images) and whole-slide files"),
    ],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model (default: the gateway's)")
    ] = None,
    priority: Annotated[Priority, typer.Option(help="Queue priority")] = Priority.routine,
    question: Annotated[str | None, typer.Option(help="vqa models: the question")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Image files per request")] = 500,
    wait: Annotated[bool, typer.Option(help="Wait until every job is finished")] = False,
    direct: Annotated[
        bool,
        typer.Option(
            help="Images: put each file on the object store itself (presigned URLs) and "
            "commit, instead of sending it through the gateway"
        ),
    ] = False,
    deidentify: Annotated[
        bool, typer.Option(help="Slides: keep no label, macro or scanner metadata")
    ] = False,
    mpp: Annotated[
        float | None,
        typer.Option(help="Slides: µm per pixel (> 0), used where a slide names none"),
    ] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Submit images as batches (one per request of --batch-size files); print each batch
    id. A file named here that is a whole slide (SVS, NDPI, OME-TIFF, tiled TIFF, DICOM:
    told by its bytes) is submitted as a slide, streamed from disk; its id is printed with
    the word "slide". Directories are walked for images only. With --wait, follow them
    until every job is finished (slides: a bar of tiles, then the summary table)."""
    if mpp is not None and mpp <= 0:
        _fail("--mpp must be more than 0")
    try:
        slides, others = slide_cli.split_slides(paths)
        total = len(find_images(others)) if others else 0
    except OSError as exc:  # a path that is not there, or a file that cannot be read
        _fail(str(exc))
    if not total and not slides:
        _fail("no image files or slides in " + " ".join(map(str, paths)))
    code = OK
    with _client(url, api_key) as client:
        if total:
            code = _submit_images(
                client, others, total, model, priority, question, batch_size, wait, direct
            )
        if slides:
            slide_code = slide_cli.submit_slides(
                client,
                slides,
                model=model,
                priority=priority,
                deidentify=deidentify,
                mpp=mpp,
                wait=wait,
            )
            code = max(code, slide_code)
    raise typer.Exit(code)


def _submit_images(
    client: HepatoClient,
    paths: list[Path],
    total: int,
    model: str | None,
    priority: Priority,
    question: str | None,
    batch_size: int,
    wait: bool,
    direct: bool = False,
) -> int:
    finals: list[BatchOut] = []
    with _progress() as progress:
        tracker = Tracker(progress, total)
        refs = client.submit(
            paths,
            model,
            priority,
            question,
            batch_size,
            on_uploaded=tracker.on_uploaded,
            on_batch=tracker.on_batch,
            direct=direct,
        )
        refused = sum(len(r.rejected) for r in refs)
        if wait:
            on_event = tracker.follow()
            finals = [client.wait(r.batch_id, on_event) for r in refs]
    for ref in refs:
        typer.echo(f"{ref.batch_id}\t{ref.accepted} accepted\t{len(ref.rejected)} refused")
        for bad in ref.rejected:
            err.print(f"  refused {bad.filename}: {bad.error}", highlight=False, markup=False)
    if not wait:
        return SOME_FAILED if refused else OK
    jobs, counts = _summary(finals)
    typer.echo(f"{jobs} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return OK if counts.get(JobState.done, 0) == jobs and not refused else SOME_FAILED


def status(
    target_id: Annotated[str, typer.Argument(metavar="ID", help="Slide id or batch id")],
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """A slide's state, tiles and summary table; or a batch's state and counts per job
    state, with the error of every failed job (ID is looked up as a slide first, then as
    a batch). Exit 1 if a slide did not finish whole, or a job failed, expired or was
    canceled."""
    bad = []
    with _client(url, api_key) as client:
        slide = slide_cli.find_slide(client, target_id)
        if slide is None:
            batch = slide_cli.or_neither(lambda: client.batch(target_id, page_size=1), target_id)
            if any(batch.counts.get(s, 0) for s in NOT_DONE):
                bad = [j for j in client.results(target_id) if j.state in NOT_DONE]
    if slide is not None:
        slide_cli.show(slide)
        raise typer.Exit(slide_cli.exit_code(slide))
    typer.echo(f"batch {batch.id}: {batch.state} ({batch.total} jobs, model {batch.model})")
    typer.echo("  " + ", ".join(f"{n} {s}" for s, n in batch.counts.items() if n))
    for job in bad:
        typer.echo(f"  {job.state} {job.id} {job.filename}: {job.error or ''}")
    raise typer.Exit(SOME_FAILED if bad else OK)


def results(
    target_id: Annotated[str, typer.Argument(metavar="ID", help="Slide id or batch id")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (default: ID.FORMAT here)", dir_okay=False),
    ] = None,
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="A slide's: geojson or csv")
    ] = ExportFormat.csv,
    url: UrlOption = None,
    api_key: KeyOption = None,
) -> None:
    """Write a slide's detections (level-0 coordinates) as GeoJSON or CSV, or a batch's
    results as GeoJSON, COCO or CSV: the gateway's export, streamed (ID is looked up as a
    slide first, then as a batch)."""
    target = out or Path(f"{target_id}.{format.value}")
    with _client(url, api_key) as client:
        slide = slide_cli.find_slide(client, target_id)
        if slide is not None:
            if format is ExportFormat.coco:
                _fail("a slide exports as geojson or csv, not coco")
            fmt: SlideFormats = "geojson" if format is ExportFormat.geojson else "csv"
            client.download_slide_export(target_id, target, fmt)
        else:
            slide_cli.or_neither(lambda: client.export(target_id, format.value, target), target_id)
            batch = client.batch(target_id, page_size=1)
    if slide is not None:
        line = {"slide_id": str(slide.id), "format": format.value, "out": str(target)}
        typer.echo(json.dumps(line))
        raise typer.Exit(slide_cli.exit_code(slide))
    typer.echo(json.dumps({"batch_id": str(batch.id), "format": format.value, "out": str(target)}))
    raise typer.Exit(SOME_FAILED if any(batch.counts.get(s, 0) for s in NOT_DONE) else OK)


def register(app: typer.Typer) -> None:
    for command in (submit, status, results):
        app.command()(command)

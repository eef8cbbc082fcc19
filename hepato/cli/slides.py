"""Whole slides in ``hepato submit | status | results``: telling a slide file from an
image, submitting and following slides, and printing a slide's summary."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from hepato.client import HepatoAPIError, HepatoClient, SlideAccepted, SlideOut, SlideState
from hepato.common.constants import Priority
from hepato.common.slide_schemas import SLIDE_TERMINAL_STATES, SlideSummary

OK, SOME_FAILED = 0, 1
NOT_ALL_DONE = frozenset({SlideState.done_with_failures, SlideState.failed, SlideState.canceled})

T = TypeVar("T")

# The summary table; plain lines go through typer.echo (rich would expand their tabs).
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def split_slides(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(whole-slide files, everything else) among the paths as given: a file is a slide
    when its bytes say so (any InvalidSlide means it is not). Directories are left to
    the image walk."""
    from hepato.common.exceptions import InvalidSlide
    from hepato.common.slides.sniff import sniff_slide

    slides: list[Path] = []
    others: list[Path] = []
    for path in paths:
        if path.is_file():
            try:
                sniff_slide(path)
            except InvalidSlide:
                pass
            else:
                slides.append(path)
                continue
        others.append(path)
    return slides, others


def find_slide(client: HepatoClient, target: str) -> SlideOut | None:
    """The slide of that id, or None where the gateway has none (404). Looked up before
    any batch: a slide's tile jobs form a batch of the same id, which is not the slide's
    view (its summary, its level-0 export)."""
    try:
        return client.slide(target)
    except HepatoAPIError as exc:
        if exc.status_code != 404:
            raise
        return None


def or_neither(batch: Callable[[], T], target: str) -> T:
    """``batch()``, where no slide has the id; its 404 names both."""
    try:
        return batch()
    except HepatoAPIError as exc:
        if exc.status_code != 404:
            raise
        raise HepatoAPIError(404, f"no batch or slide {target}") from None


def exit_code(slide: SlideOut) -> int:
    return SOME_FAILED if slide.state in NOT_ALL_DONE else OK


class SlideTracker:
    """One bar per slide: tiles finished of the slide's tiles (unknown until it is
    planned), fed by ``wait_slide``'s on_progress on the client's thread."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.tasks: dict[uuid.UUID, TaskID] = {}

    def add(self, accepted: SlideAccepted) -> None:
        name = accepted.filename if len(accepted.filename) <= 24 else accepted.filename[:23] + "…"
        self.tasks[accepted.slide_id] = self.progress.add_task(
            name, total=None, state="pending", failed=""
        )

    def on_progress(self, slide: SlideOut) -> None:
        tiles = slide.tiles
        finished = tiles.done + tiles.failed + tiles.expired + tiles.canceled
        bad = tiles.failed + tiles.expired
        with self.lock:
            self.progress.update(
                self.tasks[slide.id],
                total=tiles.total or None,
                completed=finished,
                state=slide.state.value,
                failed=f"[red]failed {bad}[/red]" if bad else "",
            )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TextColumn("{task.fields[state]}"),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err,
    )


def submit_slides(
    client: HepatoClient,
    slides: Sequence[Path],
    *,
    model: str | None,
    priority: Priority,
    deidentify: bool,
    mpp: float | None,
    wait: bool,
) -> int:
    """Submit each slide (streamed from disk), print its id; with ``wait``, follow each
    with a progress bar of its tiles and print its summary. The exit code: 1 when a
    slide finished with failed tiles, failed or was canceled."""
    accepted: list[SlideAccepted] = []
    for path in slides:
        with err.status(f"uploading {path.name}"):
            accepted.append(
                client.submit_slide(
                    path, model=model, priority=priority, deidentify=deidentify, mpp=mpp
                )
            )
        a = accepted[-1]
        typer.echo(f"{a.slide_id}\tslide {a.filename}\t{a.format}\t{a.size_bytes} bytes")
    if not wait:
        return OK
    finals: list[SlideOut] = []
    with _progress() as progress:
        tracker = SlideTracker(progress)
        for a in accepted:
            tracker.add(a)
        for a in accepted:
            finals.append(client.wait_slide(a.slide_id, on_progress=tracker.on_progress))
    for slide in finals:
        show(slide)
    return max(map(exit_code, finals), default=OK)


def show(slide: SlideOut) -> None:
    """The slide's state, its geometry and tiles, and its summary as a table."""
    typer.echo(
        f"slide {slide.id}: {slide.state.value} ({slide.filename}, {slide.format}, "
        f"model {slide.model})"
    )
    if slide.width and slide.height:
        mpp = f", {slide.mpp[0]:.3g} µm/px ({slide.mpp_source})" if slide.mpp else ""
        typer.echo(f"  {slide.width} x {slide.height} px{mpp}")
    tiles = slide.tiles
    counts = {
        name: getattr(tiles, name)
        for name in ("done", "failed", "expired", "canceled", "processing", "pending")
    }
    if tiles.total:
        parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        typer.echo(f"  tiles: {tiles.total} ({parts})")
    if slide.error:
        typer.echo(f"  error: {slide.error}")
    if slide.summary is not None:
        out.print(summary_table(slide.summary, slide.filename))
        band = slide.summary.steatosis_band or "n/a"
        typer.echo(f"  tissue area: {slide.summary.tissue_area_mm2:.2f} mm²")
        typer.echo(f"  steatosis band (NASH CRN): {band}")
        typer.echo(f"  {slide.summary.notice}")
    elif slide.state not in SLIDE_TERMINAL_STATES:
        typer.echo("  no summary yet: the slide is not finished")


def summary_table(summary: SlideSummary, title: str) -> Table:
    table = Table(title=Text(f"{title}: detections per class"))
    table.add_column("class")
    table.add_column("count", justify="right")
    table.add_column("per mm²", justify="right")
    table.add_column("area fraction", justify="right")
    for row in summary.classes:
        table.add_row(
            Text(row.label), str(row.count), f"{row.per_mm2:.2f}", f"{row.area_fraction:.2%}"
        )
    return table

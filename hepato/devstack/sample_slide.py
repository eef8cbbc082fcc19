"""The local stack's slide job: one small synthetic whole slide through the service,
from POST /v1/slides to its summary, after the sample images."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hepato.cli.slides import show
from hepato.client import HepatoClient
from hepato.common.slide_schemas import SlideOut, SlideState
from hepato.common.slides.synthetic import write_synthetic_slide

# Small enough for a 2-core laptop to finish in a minute or two with the demo model.
SIDE_PX = (4096, 3072)


def run_slide_job(base: str, folder: Path, console: Console) -> int:
    path = folder / "sample-slide.svs"
    if not path.exists():
        with console.status("writing a synthetic whole slide..."):
            write_synthetic_slide(path, *SIDE_PX, mpp=0.5, seed=1, fmt="svs")
    with HepatoClient(base) as client:
        accepted = client.submit_slide(path)
        console.print(
            f"slide {accepted.slide_id}: {accepted.format}, {accepted.size_bytes} bytes, "
            f"{accepted.status_url}"
        )
        with Progress(
            TextColumn("[bold]tiles"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("slide", total=None, state="planning")

            def on_progress(slide: SlideOut) -> None:
                tiles = slide.tiles
                finished = tiles.done + tiles.failed + tiles.expired + tiles.canceled
                progress.update(
                    task, total=tiles.total or None, completed=finished, state=slide.state.value
                )

            slide = client.wait_slide(accepted.slide_id, timeout=900, on_progress=on_progress)
    show(slide)
    console.print(
        f"level-0 detections for QuPath: {accepted.status_url}/export?format=geojson "
        f"(CSV: ?format=csv); thumbnail: {accepted.status_url}/thumbnail"
    )
    return 0 if slide.state is SlideState.done else 1

"""Response bodies of the whole-slide API (``/v1/slides``), and the slide's states.

Kept apart from common.slides so that the client SDK reads these shapes without
importing the slide readers (OpenSlide, tiffslide)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field


class SlideState(StrEnum):
    # Stored, its planning job queued.
    pending = "pending"
    # Planned: its tile jobs are in the queue.
    processing = "processing"
    done = "done"
    # Finished, but some tiles failed or expired (their areas have no detections).
    done_with_failures = "done_with_failures"
    # Could not be planned (unreadable, no MPP, ...): ``error`` says why.
    failed = "failed"
    canceled = "canceled"


SLIDE_TERMINAL_STATES = frozenset(
    {SlideState.done, SlideState.done_with_failures, SlideState.failed, SlideState.canceled}
)

# NASH CRN steatosis grade cut-offs, as the fraction of tissue covered by steatosis.
STEATOSIS_BANDS: tuple[tuple[float, str], ...] = (
    (0.05, "<5%"),
    (0.335, "5-33%"),
    (0.665, "34-66%"),
    (float("inf"), ">66%"),
)
RESEARCH_USE_ONLY = "Research use only: not for diagnosis."


def steatosis_band(fraction: float) -> str:
    """The NASH CRN band (<5%, 5-33%, 34-66%, >66%) of a steatosis area fraction."""
    for upper, band in STEATOSIS_BANDS:
        if fraction < upper:
            return band
    return STEATOSIS_BANDS[-1][1]


class SlideAccepted(BaseModel):
    slide_id: uuid.UUID
    status_url: str
    events_url: str
    filename: str
    format: str = Field(description="Sniffed from the bytes: aperio-svs, ome-tiff, ...")
    size_bytes: int


class TileCounts(BaseModel):
    """A slide's tile jobs by state; ``total`` is 0 until the slide is planned."""

    total: int = 0
    pending: int = 0
    processing: int = 0
    done: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0


class ClassSummary(BaseModel):
    label: str
    count: int
    per_mm2: float = Field(description="Detections per mm² of tissue")
    area_fraction: float = Field(description="Fraction of the tissue area its boxes cover, 0..1")


class SlideSummary(BaseModel):
    tissue_area_mm2: float
    tiles: TileCounts
    classes: list[ClassSummary]
    steatosis_band: str | None = Field(
        None, description="NASH CRN band of the steatosis area fraction; research use only"
    )
    notice: str = RESEARCH_USE_ONLY


class SlideOut(BaseModel):
    id: uuid.UUID
    state: SlideState
    filename: str
    format: str
    size_bytes: int
    model: str
    model_version: str | None = None
    width: int | None = Field(None, description="Level-0 width, px; null until planned")
    height: int | None = None
    mpp: tuple[float, float] | None = Field(None, description="µm per level-0 pixel (x, y)")
    mpp_source: str | None = Field(None, description="'slide' (its metadata) or 'submitted'")
    levels: int | None = None
    objective_power: float | None = None
    tile_size: int | None = Field(None, description="Model input side, px")
    tile_overlap: int | None = Field(None, description="Overlap of neighbouring tiles, model px")
    deidentified: bool = False
    tiles: TileCounts
    summary: SlideSummary | None = None
    error: str | None = None
    created_at: datetime
    planned_at: datetime | None = None
    finished_at: datetime | None = None

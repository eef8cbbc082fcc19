"""Whole slides in the worker: planning a slide into tile jobs, reading a tile's pixels
from the local copy, and placing a tile's detections on the slide.

Planning runs on a thread of its own (a slide may take minutes to copy), under the plan
job's lease; its outcome is committed through the fence (common.slide_jobs). A tile is
read at the pyramid level closest above the model's resolution and shrunk to the model's
input size. Its boxes are mapped to level-0 pixels and kept only when their centre lies
in the tile's core, so every object is reported by exactly one tile whichever worker ran
which; the area the boxes cover is measured inside the core for the same reason."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import Engine

from hepato.common import jobs, slide_jobs
from hepato.common.exceptions import InvalidSlide, ObjectFetchError, ObjectMissing
from hepato.common.jobs import ClaimedJob, JobResult
from hepato.common.manifest import ModelManifest
from hepato.common.results import Box, DetectResult
from hepato.common.settings import Settings
from hepato.common.slides.cache import SlideCache
from hepato.common.slides.deidentify import deidentify_slide
from hepato.common.slides.grid import plan_tiles, tile_geometry
from hepato.common.slides.sniff import file_suffix
from hepato.common.slides.tissue import compute_tissue_mask, png_bytes, render_thumbnail
from hepato.common.storage import ObjectStore, new_object_key
from hepato.worker.pipeline import LeaseKeeper
from hepato.worker.recovery import db_retry

log = logging.getLogger(__name__)

NO_MPP = (
    "the slide names no microns per pixel (MPP) in its metadata; submit it again with "
    "mpp=<µm per pixel at level 0>"
)


def read_tile(cache: SlideCache, job: ClaimedJob, size: int) -> np.ndarray:
    """The tile's RGB pixels at the model's input size (``size`` x ``size``)."""
    assert job.tile is not None
    x, y, w, h = job.tile
    try:
        with cache.reader(job.object_key) as reader:
            level = reader.best_level_for_downsample(max(w, h) / size)
            ds = reader.level_downsamples[level]
            region = reader.read_region(level, x, y, math.ceil(w / ds), math.ceil(h / ds))
    except InvalidSlide:
        cache.reopen(job.object_key)
        raise
    if region.shape[:2] == (size, size):
        return region
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)


def place(result: JobResult, job: ClaimedJob, size: int, labels: Sequence[str]) -> JobResult:
    """The tile's result on the slide: boxes in level-0 pixels, only those centred in
    the core, and per class their count and the level-0 area (px²) the boxes cover in
    the core (boxes centred outside it included: they cover it too)."""
    assert job.tile is not None and job.core is not None
    detect = result.result
    if not isinstance(detect, DetectResult):
        return result
    x, y, w, h = job.tile
    cx0, cy0, cx1, cy1 = job.core
    sx, sy = w / size, h / size
    boxes = [
        b.model_copy(
            update={
                "x1": x + b.x1 * sx,
                "y1": y + b.y1 * sy,
                "x2": x + b.x2 * sx,
                "y2": y + b.y2 * sy,
            }
        )
        for b in detect.boxes
    ]
    kept = [b for b in boxes if cx0 <= (b.x1 + b.x2) / 2 < cx1 and cy0 <= (b.y1 + b.y2) / 2 < cy1]
    # The core in the model's pixels, where coverage is measured.
    core = (
        max(0, math.floor((cx0 - x) / sx)),
        max(0, math.floor((cy0 - y) / sy)),
        min(size, math.ceil((cx1 - x) / sx)),
        min(size, math.ceil((cy1 - y) / sy)),
    )
    stats = {
        label: {
            "count": sum(1 for b in kept if b.label == label),
            "cover": _cover(detect.boxes, label, core, size) * sx * sy,
        }
        for label in labels
    }
    return replace(result, result=DetectResult(boxes=kept), tile_stats={"classes": stats})


def _cover(boxes: Sequence[Box], label: str, core: tuple[int, int, int, int], size: int) -> int:
    """Pixels of the core (model px) under at least one box of ``label``."""
    mine = [b for b in boxes if b.label == label]
    if not mine:
        return 0
    mask = np.zeros((size, size), np.bool_)
    for b in mine:
        x1, y1 = max(0, math.floor(b.x1)), max(0, math.floor(b.y1))
        x2, y2 = min(size, math.ceil(b.x2)), min(size, math.ceil(b.y2))
        mask[y1:y2, x1:x2] = True
    x0, y0, x1, y1 = core
    return int(mask[y0:y1, x0:x1].sum())


class Planner:
    """Plans slides, one at a time, on a thread of its own; the plan job's lease is kept
    by the worker's lease keeper until the plan is committed or given up."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: ObjectStore,
        leases: LeaseKeeper,
        push: Callable[[Sequence[jobs.Requeue]], None],
        worker_id: str,
    ) -> None:
        self.settings, self.engine, self.store = settings, engine, store
        self.leases, self.push = leases, push
        self.backoff = jobs.Backoff(settings.retry_backoff_s, settings.retry_backoff_max_s)
        # The worker's local copies of slides: its tile reads use them too.
        self.cache = SlideCache.for_worker(
            settings.slide_cache_path, worker_id, settings.slide_cache_bytes, store
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="planner")

    def submit(self, token: uuid.UUID, job: ClaimedJob, manifest: ModelManifest) -> None:
        key = ("plan", job.id)
        self.leases.hold(token, [job.id], key=key)
        self._pool.submit(self._run, token, job, manifest, key)

    def close(self) -> None:
        # A stopping worker finishes the plans it holds, as it finishes its microbatches.
        self._pool.shutdown(wait=True)

    def _run(self, token: uuid.UUID, job: ClaimedJob, manifest: ModelManifest, key: object) -> None:
        try:
            self._plan(token, job, manifest)
        except (InvalidSlide, ObjectMissing) as exc:
            log.warning("slide %s cannot be planned: %s", job.batch_id, exc)
            self._fail(token, job, str(exc), retry=False)
        except Exception as exc:
            # The store or the disk, not the slide: worth another attempt.
            log.exception("planning slide %s failed", job.batch_id)
            reason = str(exc) if isinstance(exc, ObjectFetchError) else f"planning failed: {exc!r}"
            self._fail(token, job, reason, retry=True)
        finally:
            self.leases.drop(key)

    def _fail(self, token: uuid.UUID, job: ClaimedJob, reason: str, *, retry: bool) -> None:
        try:
            fail = db_retry(self.settings.lease_s)(jobs.fail)
            self.push(fail(self.engine, token, {job.id: reason}, retry=retry, backoff=self.backoff))
        except Exception:
            log.exception("could not record the planning failure; the sweeper will retry it")

    def _plan(self, token: uuid.UUID, job: ClaimedJob, manifest: ModelManifest) -> None:
        assert job.batch_id is not None
        slide = slide_jobs.to_plan(self.engine, job.batch_id)
        if slide is None:
            raise InvalidSlide("the slide's record is gone")
        if manifest.mpp is None:
            raise InvalidSlide(f"model {manifest.name!r} names no mpp; it cannot take slides")
        key, deidentified = slide.object_key, False
        if slide.deidentify:
            key, deidentified = self._deidentify(slide.object_key, slide.format), True
        with self.cache.reader(key) as reader:
            width, height = reader.dimensions
            if width * height > self.settings.max_slide_pixels:
                raise InvalidSlide(
                    f"the slide has {width * height} level-0 pixels, more than "
                    f"{self.settings.max_slide_pixels} (HEPATO_MAX_SLIDE_PIXELS)"
                )
            mpp, source = reader.mpp, "slide"
            if mpp is None:
                if slide.submitted_mpp is None:
                    raise InvalidSlide(NO_MPP)
                mpp, source = (slide.submitted_mpp, slide.submitted_mpp), "submitted"
            mask = compute_tissue_mask(reader, mpp)
            thumbnail = render_thumbnail(reader)
            levels, power = reader.level_count, reader.objective_power
        tiles = plan_tiles(
            width, height, mpp, manifest.mpp, manifest.input_size, manifest.tile_overlap, mask
        )
        geometry = tile_geometry(mpp, manifest.mpp, manifest.input_size, manifest.tile_overlap)
        prefix = f"slides/{slide.slide_id.hex}"
        self.store.put(f"{prefix}/thumbnail.png", png_bytes(thumbnail), "image/png")
        self.store.put(f"{prefix}/tissue_mask.png", png_bytes(mask.mask), "image/png")
        plan = slide_jobs.Plan(
            width=width,
            height=height,
            levels=levels,
            mpp=mpp,
            mpp_source=source,
            objective_power=power,
            tile_size=manifest.input_size,
            tile_overlap=manifest.tile_overlap,
            tissue_area_mm2=mask.tissue_area_mm2(mpp),
            thumbnail_key=f"{prefix}/thumbnail.png",
            mask_key=f"{prefix}/tissue_mask.png",
            tiles=tiles,
            object_key=key,
            deidentified=deidentified,
            geometry=geometry,
        )
        commit = db_retry(self.settings.lease_s)(slide_jobs.commit_plan)
        requeue = commit(self.engine, token, job.id, slide.slide_id, plan)
        if requeue is None:
            log.warning("slide %s: the plan job's lease passed to another worker", job.batch_id)
            return
        log.info("slide %s planned: %d tiles of tissue", slide.slide_id, len(tiles))
        if deidentified:
            # Only now is the copy the slide's object: the original, with its label, goes.
            self.store.remove([slide.object_key])
            self.cache.forget(slide.object_key)
        self.push(requeue)

    def _deidentify(self, key: str, fmt: str) -> str:
        original = self.cache.path(key)
        scrubbed = Path(f"{original}.deid")
        try:
            deidentify_slide(original, scrubbed)
            new_key = new_object_key(file_suffix(fmt))
            self.store.put_path(new_key, scrubbed, "application/octet-stream")
            self.cache.adopt(new_key, scrubbed)
        finally:
            scrubbed.unlink(missing_ok=True)
        return new_key


def split_kinds(claimed: Sequence[ClaimedJob]) -> dict[str, list[ClaimedJob]]:
    out: dict[str, list[ClaimedJob]] = {"image": [], "plan": [], "tile": []}
    for job in claimed:
        out.setdefault(job.kind, []).append(job)
    return out


def tile_error(exc: Exception) -> tuple[bool, str]:
    """(permanent, reason) of a tile read that failed. A slide gone from the store is
    permanent; a read error is retried (with a fresh reader: see SlideCache.reopen), so a
    tile that is really damaged fails after its attempts and its neighbours do not."""
    if isinstance(exc, ObjectMissing):
        return True, str(exc)
    return False, f"reading the tile failed: {exc}"

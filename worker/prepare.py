"""Intake's work on a claimed microbatch before the model: download its images (a slide's
tiles: read them from the local copy of the slide), decode them in the isolated decoder
processes, and pre-process them for a model with phases. A slide's plan job goes to the
planner instead. An image sent inline through Redis (common.dispatch) is not downloaded:
it is taken and decoded while its job's claim runs. Each step is timed into the
microbatch's stages (common.stages)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime

import redis

from hepato.common import dispatch, stages
from hepato.common.exceptions import InvalidImage, ObjectFetchError, ObjectMissing
from hepato.common.jobs import ClaimedJob
from hepato.common.slides.cache import SlideCache
from hepato.common.storage import ObjectStore
from hepato.worker import inference
from hepato.worker.accounting import timed
from hepato.worker.backends.base import Model
from hepato.worker.decode import DecoderFault, IsolatedDecoder, Outcome
from hepato.worker.microbatch import MicroBatch
from hepato.worker.slides import Planner, read_tile, split_kinds, tile_error

log = logging.getLogger(__name__)


class Preparer:
    def __init__(
        self,
        redis_client: redis.Redis,
        models: Mapping[str, Model],
        store: ObjectStore,
        decoder: IsolatedDecoder,
        planner: Planner,
        fetch_pool: ThreadPoolExecutor,
        tile_pool: ThreadPoolExecutor,
    ) -> None:
        self.redis = redis_client
        self.models = models
        self.store = store
        self.decoder = decoder
        self.planner = planner
        self.slide_cache: SlideCache = planner.cache
        self.fetch_pool = fetch_pool
        self.tile_pool = tile_pool

    def early(self, ids: list[str]) -> Future[dict[str, Outcome]]:
        """Start taking the images of popped ``ids`` that came inline through Redis, and
        decoding them, while their claim (a Postgres round trip) runs: a lone real-time
        job then waits for the longer of the two, not their sum. The images of ids the
        claim does not give this worker are decoded for nothing; the store still has them."""
        return self.fetch_pool.submit(self._take_and_decode, ids)

    def _take_and_decode(self, ids: list[str]) -> dict[str, Outcome]:
        """The inline images of ``ids`` still in Redis, taken and decoded, by id (none when
        Redis cannot be read: they are then downloaded)."""
        try:
            inline = dispatch.take_inline(self.redis, ids)
        except redis.RedisError:
            log.debug("inline images unreadable; downloading them", exc_info=True)
            return {}
        return self.decode_taken(inline)

    def decode_taken(self, inline: dict[str, bytes]) -> dict[str, Outcome]:
        """Images already taken from Redis, decoded, by id."""
        if not inline:
            return {}
        taken = list(inline)
        return dict(zip(taken, self.decoder.decode_all([inline[i] for i in taken]), strict=True))

    def __call__(self, batch: MicroBatch, early: Future[dict[str, Outcome]] | None = None) -> None:
        """Download concurrently, then decode; a job whose image is gone or unreadable is
        marked permanent, one whose download or decoder failed transient. ``early``: the
        inline images ``early()`` took and decoded (without it, they are taken now); the
        others are downloaded."""
        model = self.models[batch.model]
        kinds = split_kinds(batch.claimed)
        for job in kinds["plan"]:
            self.planner.submit(batch.token, job, model.manifest)
        batch.claimed = [*kinds["image"], *kinds["tile"]]
        size = model.manifest.input_size
        decoded: dict[str, Outcome] = {}
        if kinds["image"]:
            # With ``early``: what is left of the decode once the claim is done.
            with timed(batch.model, stages.DECODE, batch.stages):
                if early is None:
                    decoded = self._take_and_decode([str(job.id) for job in kinds["image"]])
                else:
                    decoded = early.result()
        rest = [job for job in kinds["image"] if str(job.id) not in decoded]
        with timed(batch.model, stages.DOWNLOAD, batch.stages):
            tiles = [
                self.tile_pool.submit(read_tile, self.slide_cache, j, size) for j in kinds["tile"]
            ]
            datas = list(self.fetch_pool.map(self._fetch, rest))
            for job, future in zip(kinds["tile"], tiles, strict=True):
                if (exc := future.exception()) is None:
                    batch.ready.append(job)
                    batch.images.append(future.result())
                else:
                    permanent, reason = tile_error(exc)  # type: ignore[arg-type]
                    (batch.permanent if permanent else batch.transient)[job.id] = reason
        batch.fetched_at = datetime.now(UTC)
        for job in kinds["image"]:
            if (outcome := decoded.get(str(job.id))) is not None:
                place_outcome(batch, job, outcome)
        fetched: list[tuple[ClaimedJob, bytes]] = []
        for job, data in zip(rest, datas, strict=True):
            if isinstance(data, ObjectMissing):
                batch.permanent[job.id] = str(data)
            elif isinstance(data, ObjectFetchError):
                batch.transient[job.id] = str(data)
            else:
                fetched.append((job, data))
        if fetched:
            with timed(batch.model, stages.DECODE, batch.stages):
                outcomes = self.decoder.decode_all([data for _, data in fetched])
            for (job, _), outcome in zip(fetched, outcomes, strict=True):
                place_outcome(batch, job, outcome)
        if inference.phases(model):
            with timed(batch.model, stages.PREPROCESS, batch.stages):
                batch.prepared = inference.prepare(model, batch.ready, batch.images)

    def _fetch(self, job: ClaimedJob) -> bytes | ObjectFetchError:
        try:
            return self.store.get(job.object_key)
        except ObjectFetchError as exc:
            return exc


def place_outcome(batch: MicroBatch, job: ClaimedJob, outcome: Outcome) -> None:
    """A decoded image into the batch; an undecodable one fails its job (permanent), a
    decoder fault retries it (transient)."""
    if isinstance(outcome, InvalidImage):
        batch.permanent[job.id] = str(outcome)
    elif isinstance(outcome, DecoderFault):
        batch.transient[job.id] = str(outcome)
    else:
        batch.ready.append(job)
        batch.images.append(outcome)

"""The worker: stages joined by bounded hand-offs, so the model is never kept waiting.

    intake (thread)            model (calling thread)      write (thread)
    collect → claim →     ──▶  batch k on the model   ──▶  batch k-1: post-process,
    download → decode →        (time-bounded)              results to Postgres,
    pre-process batch k+1                                  notices, metrics

Pre- and post-processing move out of the model stage for models with phases
(worker.backends.calls.Phased); other models do them inside their model call.
Intake works ahead by at most ``prefetch_batches`` microbatches: claimed jobs sitting in
a worker are jobs no other worker can take. A stopping worker claims nothing more and
finishes what it has claimed (at most ``prefetch_batches`` + 1 microbatches).

How a microbatch is formed (collect, rotation across models, claim) is in
worker.microbatch; the sweeper, heartbeat and re-pushes in worker.recovery; webhooks in
worker.webhook_sender, a thread of their own."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime

import redis
from sqlalchemy.exc import OperationalError

from hepato.common import heap, jobs, metrics, stages, wake_publish
from hepato.common.db import get_engine, name_connections, worker_connections
from hepato.common.job_counts import count_unfinished
from hepato.common.settings import Settings
from hepato.common.storage import ObjectStore
from hepato.worker import inference
from hepato.worker.accounting import count_outcome, timed
from hepato.worker.backends.base import Model, load_models
from hepato.worker.decode import Decode, IsolatedDecoder, decode_rgb
from hepato.worker.head_start import HeadStarts
from hepato.worker.microbatch import Batcher, Hint, MicroBatch, model_queue
from hepato.worker.pipeline import Closed, Handoff, LeaseKeeper, Occupancy, Quarantine
from hepato.worker.prepare import Preparer
from hepato.worker.recovery import Recovery, db_retry
from hepato.worker.slides import Planner, place
from hepato.worker.webhook_sender import WebhookSender

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Model],
        *,
        burst: bool = False,
        decode: Decode = decode_rgb,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.burst = burst
        self.id = settings.worker_name
        self.engine = get_engine(settings.database_url)
        # The usual claim commits without waiting for the disk (1 ms on a lone request's
        # path): one a Postgres crash undoes leaves its jobs pending, their results are
        # refused by the fence, and they run again. A result's commit makes it durable.
        self.claim_engine = get_engine(settings.database_url, synchronous_commit=False)
        self.redis = redis.Redis.from_url(settings.redis_url)
        wake_publish.attach(self.engine, self.redis)
        wake_publish.attach(self.claim_engine, self.redis)
        self.store = ObjectStore(settings, pool_size=settings.fetch_concurrency)
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="fetch")
        # Reading a slide's tiles is JPEG decoding, CPU work like decoding uploads: as many
        # threads as decoder processes, not the download pool's 16.
        self.tile_pool = ThreadPoolExecutor(settings.decode_processes, thread_name_prefix="tile")
        self.decoder = IsolatedDecoder(
            settings.decode_processes,
            settings.decode_timeout_s,
            decode,
            arena_bytes=settings.decode_arena_mib * 2**20,
        )
        # stopping: finish what is in hand, take nothing new. abort: a stage died; every
        # wait gives up at once.
        self.stopping = threading.Event()
        self.abort = threading.Event()
        self.recovery = Recovery(
            settings, self.engine, self.redis, self.id, list(self.models), self.stopping
        )
        self.batcher = Batcher(
            self.redis,
            self.engine,
            [model_queue(name, m.manifest, settings) for name, m in self.models.items()],
            worker_id=self.id,
            settings=settings,
            requeue=self.recovery.push,
            fast_engine=self.claim_engine,
        )
        ahead = settings.prefetch_batches
        # One slot per batch between claim and the end of its model call.
        self.slots = threading.Semaphore(ahead + 1)
        self.to_model: Handoff[MicroBatch] = Handoff(ahead + 1, self.abort)
        self.to_write: Handoff[MicroBatch] = Handoff(1, self.abort)
        self.leases = LeaseKeeper(
            settings.lease_extend_every_s,
            lambda token, ids: jobs.extend_leases(self.engine, token, ids, settings.lease_s),
        )
        self.quarantine = Quarantine(self.abort)
        self.webhooks = WebhookSender(settings, self.engine)
        self.backoff = jobs.Backoff(settings.retry_backoff_s, settings.retry_backoff_max_s)
        self.planner = Planner(
            settings, self.engine, self.store, self.leases, self.recovery.push, self.id
        )
        self.slide_cache = self.planner.cache
        self.prepare = Preparer(
            self.redis,
            self.models,
            self.store,
            self.decoder,
            self.planner,
            self.fetch_pool,
            self.tile_pool,
        )
        self.head_starts = HeadStarts(self.models, self.prepare, self.redis, self.id)
        # Batches handed to the model stage, not yet through: stragglers waited for if busy.
        self.in_model = Occupancy()
        self.batches = 0
        self.jobs_done = 0

    # --- lifecycle -------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        # Decoder processes start, and models run once, before the heartbeat that tells
        # hepato up we are ready.
        self.decoder.warm()
        if self.settings.model_warmup:
            for q in self.batcher.queues:
                if self.stopping.is_set():  # SIGTERM while warming up: leave now
                    break
                inference.warm_up(
                    self.models[q.model], (1, q.max_batch), self.settings.model_timeout_s
                )
        self.recovery.start()
        # Not in burst mode: it leaves once drained, and would cut its deliveries short.
        if not self.burst:
            self.webhooks.start()
        self.leases.start()
        self.batcher.log_serving(self.settings.prefetch_batches)
        stages = [
            threading.Thread(target=self._intake_stage, name="intake"),
            threading.Thread(target=self._write_stage, name="write"),
        ]
        for stage in stages:
            stage.start()
        try:
            self._model_stage()
        except BaseException:
            log.exception("the model stage died; stopping")
            self.abort.set()
            raise
        finally:
            self.stopping.set()
            for stage in stages:
                stage.join()
            self.planner.close()
            self.slide_cache.close()
            self.leases.stop()
            self.recovery.stop()
            self.webhooks.stop()
            self.fetch_pool.shutdown(wait=False)
            self.tile_pool.shutdown(wait=False)
            self.decoder.close()
        log.info(
            "worker %s stopped after %d batches, %d jobs", self.id, self.batches, self.jobs_done
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        self.stopping.set()

    def sweep_once(self) -> None:
        self.recovery.sweep_once()

    def _drained(self) -> bool:
        self.sweep_once()
        return count_unfinished(self.engine, list(self.models)) == 0

    # --- stage 1: intake -------------------------------------------------------
    def _intake_stage(self) -> None:
        backoff = 0.1
        try:
            while not self.stopping.is_set() and not self.abort.is_set():
                # Wait for room before popping: ids popped but unclaimed would sit here.
                if not self.slots.acquire(timeout=self.settings.poll_timeout_s):
                    continue
                handed_on = False
                try:
                    handed_on = self._intake_one()
                    backoff = 0.1
                except (redis.RedisError, OperationalError) as exc:
                    # Popped, unclaimed ids are safe: still pending in Postgres, re-pushed.
                    log.warning("service unavailable (%s); retrying in %.1fs", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    if not handed_on:
                        self.slots.release()
            self.batcher.hand_back(self.head_starts.taken_back())
        except Closed:
            return
        except BaseException:
            log.exception("the intake stage died; stopping")
            self.abort.set()
            raise
        with contextlib.suppress(Closed):
            self.to_model.close()

    def _intake_one(self) -> bool:
        """Collect, claim and prepare one microbatch; True once it is handed to the model."""
        self.quarantine.wait_to_claim()
        got = self.batcher.collect(busy=self.in_model.busy, alone=self.head_starts.has)
        if got is None:
            if self.burst and self._drained():
                self.stopping.set()
            return False
        if isinstance(got, Hint):  # a head start only with the model idle: it would wait
            kept = self.batcher.keep(got, self.in_model.idle())
            head = self.head_starts.start(got) if kept else None
            return head is not None and self._hand_on(head)
        stopping = self.stopping.is_set()
        early = None if stopping else self.prepare.early(self.head_starts.without(got[1]))
        batch = self.batcher.claim(got, stopping=stopping)
        if batch is None:
            return False
        self.batches += 1
        self.leases.hold(batch.token, batch.ids)
        try:
            if not self.head_starts.adopt(batch):
                self.prepare(batch, early)
        except Exception as exc:
            self._give_up(batch, exc)
            return False
        return self._hand_on(batch)

    def _hand_on(self, batch: MicroBatch) -> bool:
        self.quarantine.handing_on(batch.attempts)
        batch.handed_at = time.perf_counter()
        self.in_model.enter(not batch.speculative)
        try:
            self.to_model.put(batch)
        except Closed:
            self.in_model.leave(not batch.speculative)
            raise
        return True

    # --- stage 2: the model ----------------------------------------------------
    def _model_stage(self) -> None:
        try:
            while True:
                try:
                    batch = self.to_model.get()
                except Closed:
                    return
                try:
                    self.quarantine.before_model(batch.attempts)
                    batch.waited(stages.TO_MODEL)
                    if not HeadStarts.reuse(batch):
                        self._infer(batch)
                except Exception as exc:
                    if not batch.speculative:  # a head start holds no job
                        self._give_up(batch, exc)
                    continue
                finally:
                    self.in_model.leave(not batch.speculative)
                    self.slots.release()
                    self.quarantine.after_model(batch.attempts)
                if batch.speculative:
                    continue  # kept by self.head_starts for its claim
                self.quarantine.to_write()
                batch.handed_at = time.perf_counter()
                self.to_write.put(batch)
        finally:
            with contextlib.suppress(Closed):
                self.to_write.close()

    def _infer(self, batch: MicroBatch) -> None:
        model, timeout_s = self.models[batch.model], self.settings.model_timeout_s
        errors: dict[uuid.UUID, str] = {}
        with timed(batch.model, "inference"):
            if batch.prepared is not None:
                batch.raws, batch.infer_ms, errors = inference.run_prepared(
                    model, batch.ready, batch.prepared, timeout_s
                )
            if batch.raws is None and not errors:
                batch.results, errors = inference.infer(model, batch.ready, batch.images, timeout_s)
        batch.inferred_at = datetime.now(UTC)
        batch.transient.update(errors)
        if batch.raws is None:
            # Free the pixels before the batch waits for its write; post-processing may
            # still need them to find a culprit.
            batch.images = []

    # --- stage 3: write --------------------------------------------------------
    def _write_stage(self) -> None:
        while True:
            try:
                batch = self.to_write.get()
            except Closed:
                return
            try:
                batch.waited(stages.TO_WRITE)
                self._write(batch)
            except Exception as exc:
                self._give_up(batch, exc)
            finally:
                self.leases.drop(batch.token)
                self.quarantine.written()

    def _write(self, batch: MicroBatch) -> None:
        model = self.models[batch.model]
        if batch.raws is not None and batch.prepared is not None:
            with timed(batch.model, stages.POSTPROCESS, batch.stages):
                batch.results, errors = inference.finish(
                    model,
                    batch.ready,
                    batch.images,
                    batch.prepared,
                    batch.raws,
                    batch.infer_ms,
                    self.settings.model_timeout_s,
                )
            batch.transient.update(errors)
        tiles = {j.id: j for j in batch.ready if j.kind == "tile"}
        batch.results = [
            replace(
                place(r, tiles[r.id], model.manifest.input_size, model.manifest.labels)
                if r.id in tiles
                else r,
                fetched_at=batch.fetched_at,
                inferred_at=batch.inferred_at,
                stages=batch.stages,
            )
            for r in batch.results
        ]
        write = db_retry(self.settings.lease_s)
        with timed(batch.model, "write"):
            written = write(jobs.complete)(
                self.engine,
                batch.token,
                batch.results,
                model.manifest.version,
                alone=jobs.ends_alone(batch.claimed),
            )
            write(jobs.fail)(self.engine, batch.token, batch.permanent, retry=False)
            retried = write(jobs.fail)(
                self.engine, batch.token, batch.transient, retry=True, backoff=self.backoff
            )
        self.recovery.push(retried)
        lost = len(batch.results) - len(written)
        if lost:
            log.warning("%d results refused: their lease passed to another worker", lost)
        self.jobs_done += len(written)
        count_outcome(self.engine, batch, written, retried)

    def _give_up(self, batch: MicroBatch, exc: Exception) -> None:
        """A stage failed on the whole batch: back to the queue now rather than after the
        lease. The attempt counts, so an input that breaks the model ends failed after
        max_attempts, not in a loop."""
        log.exception("batch of %d failed", len(batch.claimed), exc_info=exc)
        # A job already known bad (its object gone, its image undecodable) fails for good:
        # another attempt would only find the same.
        errors = {
            j.id: f"batch failed: {exc!r}" for j in batch.claimed if j.id not in batch.permanent
        }
        try:
            jobs.fail(self.engine, batch.token, batch.permanent, retry=False)
            self.recovery.push(
                jobs.fail(self.engine, batch.token, errors, retry=True, backoff=self.backoff)
            )
        except Exception:
            log.exception("could not return the batch; the sweeper will recover it")
        finally:
            self.leases.drop(batch.token)


def run_worker(settings: Settings, *, burst: bool = False, models: Sequence[str] = ()) -> Worker:
    """``hepato worker``: models loaded, heap settled (common.heap) before decoders fork."""
    name_connections(worker_connections(settings.worker_name))
    loaded = inference.load_pinned(settings, lambda: load_models(settings, models))
    worker = Worker(settings, loaded, burst=burst)
    metrics.serve_worker_metrics(settings.worker_metrics_port, settings.worker_metrics_host)
    heap.settle()
    worker.run()
    return worker

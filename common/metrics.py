"""Prometheus metrics of the workers and the gateway, on prometheus_client's default
registry.

No multiprocess mode: every worker is one process and serves its own registry on its
own port (``serve_worker_metrics``), and the gateway runs as one uvicorn process (no
``--workers``), whose ``/metrics`` reads the same default registry. Should the gateway
ever fork several processes, its counters would need ``PROMETHEUS_MULTIPROC_DIR``.

Both kinds of process import this module, so each exposes the other's families too,
without samples (or at zero): sums over all targets stay right.

Worker side (the lead's worker loop records these): batch sizes, per-microbatch stage
times, per-job queue wait and end-to-end latency, outcomes, retries, dead letters and
reclaimed leases. Gateway side: submissions and rejected files (counted by
``gateway.submit``), callers waiting on ``/v1/predict`` (gateway.finish_watch), and
``GatewayCollector``, which reads queue depths from Redis and
job counts from Postgres at scrape time, so they are right whichever process changed
them.

A scrape never reads the ``jobs`` table: ``hepato_jobs`` comes from the counts that
triggers keep per model, tenant and state (common.job_state_counts, which says why
counters and not estimates), exact at the scrape's snapshot and as cheap at 10^7 jobs
as at ten."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from hepato.common import dispatch, job_state_counts
from hepato.common.constants import JobState, Priority

log = logging.getLogger(__name__)

# From a millisecond (a Redis pop, a small decode) to a minute (a large model call on CPU).
STAGE_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# A job may wait behind a long queue for many minutes: the stage buckets from 5 ms, then
# on to an hour.
JOB_BUCKETS_S = (
    *STAGE_BUCKETS_S[STAGE_BUCKETS_S.index(0.005) :],
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

# --- worker ---------------------------------------------------------------------------

BATCH_SIZE = Histogram(
    "hepato_batch_size",
    "Images in one model call (microbatch).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STAGE_SECONDS = Histogram(
    "hepato_stage_seconds",
    "Time of one microbatch in a worker stage (download, decode, preprocess, inference, "
    "postprocess, write), seconds.",
    ["model", "stage"],
    buckets=STAGE_BUCKETS_S,
)
QUEUE_WAIT_SECONDS = Histogram(
    "hepato_queue_wait_seconds",
    "Per job: submission (created) to the claim that ran it, seconds.",
    ["model"],
    buckets=JOB_BUCKETS_S,
)
LATENCY_SECONDS = Histogram(
    "hepato_job_latency_seconds",
    "Per job, end to end: submission (created) to its result written, seconds.",
    ["model"],
    buckets=JOB_BUCKETS_S,
)
JOBS = Counter(
    "hepato_worker_jobs",
    "Job runs a worker ended, by outcome: done, failed (for good) or retried.",
    ["model", "outcome"],
)
RETRIES = Counter("hepato_retries", "Jobs put back on their queue for another attempt.", ["model"])
DEAD_LETTERED = Counter(
    "hepato_dead_lettered",
    "Jobs failed for good: out of attempts, or a permanent error (a bad image).",
    ["model"],
)
HEAD_STARTS = Counter(
    "hepato_head_starts",
    "Hints a worker popped (worker.head_start), by outcome: started (the model ran on its "
    "image), used (its claimed job took those results), passed_on (the model was busy: put "
    "back for another worker), void (no image to run on: gone with its job, or undecodable).",
    ["model", "outcome"],
)
LEASES_RECLAIMED = Counter(
    "hepato_leases_reclaimed",
    "Jobs whose lease ran out (their worker presumed dead) that the sweeper took back.",
)


def serve_worker_metrics(port: int, host: str) -> int | None:
    """Serve the default registry on ``http://host:port/metrics`` from a daemon thread.
    Returns the bound port, or None when ``port`` is 0 (off) or the port is taken:
    several workers on one host must not die for want of a metrics port."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("worker metrics not served: cannot listen on %s:%d (%s)", host, port, exc)
        return None
    bound = int(server.server_port)
    log.info("worker metrics on http://%s:%d/metrics", host, bound)
    return bound


# --- gateway --------------------------------------------------------------------------

SUBMITTED = Counter("hepato_submitted", "Jobs the gateway accepted.", ["model"])
REJECTED_FILES = Counter(
    "hepato_rejected_files",
    "Files the gateway refused in a submission (bad or oversized).",
    ["model"],
)


# A waiter holds its connection open: this is what a load balancer's connection count
# sees of a gateway whose workers are slow or down.
PREDICT_WAITING = Gauge(
    "hepato_predict_waiting",
    "Callers of /v1/predict whose job is accepted and who wait for its result, in this "
    "gateway process.",
)


def count_submission(model: str, accepted: int, rejected: int) -> None:
    """Called by gateway.submit once it knows what it kept and what it refused."""
    SUBMITTED.labels(model).inc(accepted)
    REJECTED_FILES.labels(model).inc(rejected)


# A scrape must answer even while a service hangs: Prometheus' own timeout is 10 s.
SCRAPE_TIMEOUT_S = 2.0

QUEUE_DEPTH_DOC = "Job ids waiting in Redis, per model and priority."
JOBS_DOC = "Jobs in Postgres, per model and state."


@dataclass(frozen=True)
class _Sources:
    engine: Engine
    redis: redis.Redis
    models: tuple[str, ...]


class GatewayCollector(Collector):
    """Queue depths (Redis LLEN) and job counts (common.job_state_counts), read at
    scrape time. A service that is down drops its family from that scrape, never the
    scrape. Every known model and state is reported, at 0 when empty, so a series does
    not vanish when its queue drains."""

    def __init__(self) -> None:
        self._sources: _Sources | None = None

    def attach(self, engine: Engine, client: redis.Redis, models: Iterable[str]) -> None:
        """Read from these from now on (the gateway's lifespan calls it)."""
        self._sources = _Sources(engine, client, tuple(sorted(models)))

    def detach(self, client: redis.Redis) -> None:
        """Stop reading, unless another app attached since (tests run several)."""
        if self._sources is not None and self._sources.redis is client:
            self._sources = None

    def describe(self) -> Iterator[Metric]:
        # Declared so that registering does not call collect() (and reach the services).
        yield GaugeMetricFamily("hepato_queue_depth", QUEUE_DEPTH_DOC, labels=["model", "priority"])
        yield GaugeMetricFamily("hepato_jobs", JOBS_DOC, labels=["model", "state"])

    def collect(self) -> Iterator[Metric]:
        sources = self._sources
        if sources is None:
            return
        depth = self._queue_depth(sources)
        if depth is not None:
            yield depth
        jobs = self._jobs(sources)
        if jobs is not None:
            yield jobs

    @staticmethod
    def _queue_depth(sources: _Sources) -> GaugeMetricFamily | None:
        labels = [(m, p.value) for m in sources.models for p in Priority]
        try:
            # Summed over the tenants' lists: one series per model and priority.
            lengths = [dispatch.depth(sources.redis, m, p) for m, p in labels]
        except redis.RedisError:
            log.debug("queue depth not scraped: Redis unavailable", exc_info=True)
            return None
        family = GaugeMetricFamily(
            "hepato_queue_depth", QUEUE_DEPTH_DOC, labels=["model", "priority"]
        )
        for (model, priority), length in zip(labels, lengths, strict=True):
            family.add_metric([model, priority], float(length))
        return family

    @staticmethod
    def _jobs(sources: _Sources) -> GaugeMetricFamily | None:
        counts = {(m, s.value): 0 for m in sources.models for s in JobState}
        try:
            with sources.engine.connect() as conn:
                # Bounded, so a slow count cannot hold the scrape (or a pool connection).
                conn.execute(text(f"SET LOCAL statement_timeout = {int(SCRAPE_TIMEOUT_S * 1000)}"))
                found = job_state_counts.totals(conn)
        except Exception:  # any database error: the family is left out of this scrape
            log.debug("job counts not scraped: Postgres unavailable", exc_info=True)
            return None
        for key, n in found.items():
            # A model no manifest names any more shows while it still has jobs.
            if n or key in counts:
                counts[key] = n
        family = GaugeMetricFamily("hepato_jobs", JOBS_DOC, labels=["model", "state"])
        for (model, state), n in sorted(counts.items()):
            family.add_metric([model, state], float(n))
        return family


GATEWAY_COLLECTOR = GatewayCollector()
_registered = False
_register_lock = threading.Lock()


def register_gateway_collector() -> GatewayCollector:
    """Put the gateway collector on the default registry, once per process (tests build
    many apps in one process; the last one attached is the one scraped)."""
    global _registered
    with _register_lock:
        if not _registered:
            REGISTRY.register(GATEWAY_COLLECTOR)
            _registered = True
    return GATEWAY_COLLECTOR


def scrape_redis(url: str) -> redis.Redis:
    """A Redis client for scrapes only: short timeouts, so a hung Redis costs a scrape
    at most ``SCRAPE_TIMEOUT_S`` instead of the OS's TCP timeout."""
    return redis.Redis.from_url(
        url, socket_timeout=SCRAPE_TIMEOUT_S, socket_connect_timeout=SCRAPE_TIMEOUT_S
    )

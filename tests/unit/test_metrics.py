"""Metrics on their own: the gateway collector against fakeredis and an unreachable
Postgres, and a worker's metrics server on a real port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import fakeredis
import httpx
import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine

from hepato.common import metrics
from hepato.common.constants import queue_key

# Nothing listens on port 1: connections are refused at once.
NO_POSTGRES = "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
NO_REDIS = "redis://127.0.0.1:1/0"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def no_postgres() -> Iterator[Engine]:
    engine = create_engine(NO_POSTGRES)
    yield engine
    engine.dispose()


def scraped(collector: metrics.GatewayCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return samples(registry)


def test_queue_depth_per_model_and_priority_from_redis(no_postgres: Engine) -> None:
    r = fakeredis.FakeRedis()
    r.rpush(queue_key("a", "urgent"), "j1")
    r.rpush(queue_key("a", "routine"), "j2", "j3")
    collector = metrics.GatewayCollector()
    collector.attach(no_postgres, r, ["a", "b"])
    got = scraped(collector)
    depth = {
        (dict(labels)["model"], dict(labels)["priority"]): value
        for (name, labels), value in got.items()
        if name == "hepato_queue_depth"
    }
    # Every model and priority, empty ones at 0, so a series never vanishes when drained.
    assert depth == {
        ("a", "urgent"): 1,
        ("a", "routine"): 2,
        ("b", "urgent"): 0,
        ("b", "routine"): 0,
    }
    # Postgres is down: its family is left out, the scrape still answers.
    assert not any(name == "hepato_jobs" for name, _ in got)


def test_a_scrape_answers_with_redis_and_postgres_down(no_postgres: Engine) -> None:
    collector = metrics.GatewayCollector()
    collector.attach(no_postgres, redis.Redis.from_url(NO_REDIS), ["a"])
    got = scraped(collector)
    assert not any(name in ("hepato_queue_depth", "hepato_jobs") for name, _ in got)


def test_registering_reaches_no_service() -> None:
    # describe() names the families, so registering never calls collect().
    collector = metrics.GatewayCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(metrics.GatewayCollector())
    assert samples(registry) == {}


def test_the_gateway_collector_is_registered_once() -> None:
    assert metrics.register_gateway_collector() is metrics.register_gateway_collector()


def test_submissions_are_counted() -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("hepato_submitted_total", model="unit-model")
    rejected = value("hepato_rejected_files_total", model="unit-model")
    metrics.count_submission("unit-model", 3, 2)
    assert value("hepato_submitted_total", model="unit-model") == before + 3
    assert value("hepato_rejected_files_total", model="unit-model") == rejected + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_zero_serves_nothing() -> None:
    assert metrics.serve_worker_metrics(0, "127.0.0.1") is None


def test_worker_metrics_are_scraped_over_http() -> None:
    port = free_port()
    assert metrics.serve_worker_metrics(port, "127.0.0.1") == port
    metrics.BATCH_SIZE.labels("unit-model").observe(8)
    metrics.STAGE_SECONDS.labels("unit-model", "inference").observe(0.02)
    metrics.JOBS.labels("unit-model", "done").inc(8)
    metrics.LEASES_RECLAIMED.inc()
    metrics.HEAD_STARTS.labels("unit-model", "started").inc()

    response = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "hepato_batch_size",
        "hepato_stage_seconds",
        "hepato_queue_wait_seconds",
        "hepato_job_latency_seconds",
        "hepato_worker_jobs",
        "hepato_retries",
        "hepato_dead_lettered",
        "hepato_leases_reclaimed",
        "hepato_head_starts",
    ):
        assert name in families, name
    stage = {
        s.labels["le"]
        for s in families["hepato_stage_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert {"0.001", "60.0"} <= stage
    done = [
        s
        for s in families["hepato_worker_jobs"].samples
        if s.name == "hepato_worker_jobs_total"
        and s.labels == {"model": "unit-model", "outcome": "done"}
    ]
    assert done and done[0].value >= 8


def test_a_busy_port_is_skipped_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        assert metrics.serve_worker_metrics(port, "127.0.0.1") is None


def test_an_app_stopping_detaches_only_its_own_sources(no_postgres: Engine) -> None:
    first, second = fakeredis.FakeRedis(), fakeredis.FakeRedis()
    second.rpush(queue_key("a", "urgent"), "j1")
    collector = metrics.GatewayCollector()
    collector.attach(no_postgres, first, ["a"])
    collector.attach(no_postgres, second, ["a"])
    collector.detach(first)
    key = ("hepato_queue_depth", frozenset({"model": "a", "priority": "urgent"}.items()))
    assert scraped(collector)[key] == 1
    collector.detach(second)
    assert scraped(collector) == {}

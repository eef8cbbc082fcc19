"""The FastAPI application factory.

The gateway is one uvicorn process: its /metrics serves prometheus_client's default
registry as is, with no multiprocess mode (see common.metrics)."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import urllib3
from fastapi import FastAPI, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from minio.error import MinioException
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from hepato.common import metrics, wake_publish
from hepato.common.db import get_engine, session_factory
from hepato.common.exceptions import ObjectFetchError, ObjectMissing, QueueFull, UnknownModel
from hepato.common.manifest import load_registry
from hepato.common.settings import Settings, get_settings
from hepato.common.slides.cache import SlideCache
from hepato.common.storage import ObjectStore
from hepato.gateway.auth import KeyBeforeBody
from hepato.gateway.deps import Resources, ResourcesDep
from hepato.gateway.finish_watch import FinishWatch
from hepato.gateway.limits import install_limits
from hepato.gateway.routes import (
    batches,
    exports,
    jobs,
    live,
    slide_regions,
    slide_report,
    slide_results,
    slide_view,
    slides,
    submissions,
    uploads,
)
from hepato.gateway.routes import models as model_list
from hepato.gateway.submit import CommitUnknown
from hepato.gateway.viewer import router as viewer_router
from hepato.gateway.wakeups import WakeupHub

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


def _unavailable(what: str) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": RETRY_AFTER_S},
        content={"detail": f"{what} is unavailable; nothing of this request was kept, retry later"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # A bad manifest stops the gateway here, with the file and field named.
    models = load_registry(settings.models_dir)
    if settings.default_model not in models:
        raise UnknownModel(
            f"default model {settings.default_model!r} has no manifest in {settings.models_dir}"
        )
    if settings.auth == "open":
        log.warning(
            "auth is OFF (HEPATO_AUTH=open): anyone who can reach the gateway reads every job"
        )

    collector = metrics.register_gateway_collector()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ObjectStore(settings)
        try:
            await run_in_threadpool(store.ensure_bucket)
        except Exception:  # readiness reports it; the gateway still starts
            log.warning("object store not reachable at start", exc_info=True)
        app.state.resources = Resources(
            settings=settings,
            engine=get_engine(settings.database_url),
            sessions=session_factory(settings.database_url),
            redis=redis.Redis.from_url(settings.redis_url, health_check_interval=30),
            store=store,
            models=models,
            slide_cache=SlideCache.for_worker(
                settings.slide_cache_path,
                # Unique per app: two apps in one process (tests) must not share copies.
                f"gateway-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                settings.slide_cache_bytes,
                store,
            ),
        )
        wake_publish.attach(app.state.resources.engine, app.state.resources.redis)
        # Every waiter of this process (SSE streams, /v1/predict) on one Redis connection.
        app.state.wakeups = hub = WakeupHub(settings.redis_url)
        app.state.finish_watch = watch = FinishWatch(app.state.resources.engine, hub)
        await hub.start()
        await watch.start()
        scrape_redis = metrics.scrape_redis(settings.redis_url)
        collector.attach(app.state.resources.engine, scrape_redis, models)
        yield
        collector.detach(scrape_redis)
        scrape_redis.close()
        await watch.close()
        await hub.close()
        app.state.resources.redis.close()
        app.state.resources.slide_cache.close()

    app = FastAPI(
        title="HepatoAI",
        version="0.1.0",
        summary="Microbatched inference for liver histopathology images",
        lifespan=lifespan,
        # Starlette's default of 1,000 files per form would cap a batch.
        form_limits={"max_files": settings.max_files_per_request, "max_fields": 100},
    )
    # In this order the paths stand in /openapi.json as they always have.
    for routes in (submissions, model_list, jobs, batches, live, exports, slides, slide_results):
        app.include_router(routes.router)
    app.include_router(slide_view.router)
    app.include_router(slide_regions.router)
    app.include_router(slide_report.router)
    app.include_router(viewer_router)
    app.include_router(uploads.router)  # direct uploads (gateway.direct)
    install_limits(app, settings)
    if settings.auth == "required":
        app.add_middleware(KeyBeforeBody, database_url=settings.database_url)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(exc.retry_after_s)},
            content={"detail": str(exc)},
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", exc)
        return _unavailable("the database")

    @app.exception_handler(CommitUnknown)
    async def commit_unknown(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s", exc, exc_info=exc)
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": RETRY_AFTER_S},
            content={
                "detail": "the database failed while the jobs were committed: whether they "
                "were kept is not known yet; retry with the same Idempotency-Key, or look "
                "them up before submitting again"
            },
        )

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        return _unavailable("the queue (Redis)")

    # Before store_down: a handler is chosen by the exception's class first, then its bases.
    @app.exception_handler(ObjectMissing)
    async def object_gone(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "the uploaded image is gone from the object store"}, status_code=404
        )

    # MinioException: S3Error, and the InvalidResponseError / ServerError a store behind
    # a failing proxy or restarting answers with.
    @app.exception_handler(MinioException)
    @app.exception_handler(ObjectFetchError)
    @app.exception_handler(urllib3.exceptions.HTTPError)
    async def store_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("object store error: %s", exc)
        return _unavailable("the object store")

    # Async: liveness never waits for a thread-pool slot.
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # A plain (sync) route: the collector's Redis and Postgres reads run in the thread
    # pool, not on the event loop. Open in every auth mode, like the health checks.
    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of this gateway")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", tags=["health"], summary="Postgres, Redis and the object store reachable")
    def readyz(res: ResourcesDep) -> JSONResponse:
        checks = {"postgres": False, "redis": False, "object_store": False}
        try:
            with res.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["postgres"] = True
        except Exception:
            log.debug("postgres not ready", exc_info=True)
        with contextlib.suppress(redis.RedisError):
            checks["redis"] = bool(res.redis.ping())
        checks["object_store"] = res.store.ping()
        ok = all(checks.values())
        return JSONResponse(
            status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"status": "ready" if ok else "not ready", "checks": checks},
        )

    return app

"""One settings class for every process. Each field reads ``HEPATO_<NAME>`` from the
environment (or a ``.env`` file). Units are part of the field names or stated."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hepato.common import cpus

REPO_ROOT = Path(__file__).resolve().parent.parent

LIVER_CLASSES = ("fibrosis", "inflammation", "steatosis", "ballooning")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEPATO_", env_file=".env", extra="ignore")

    # --- services -------------------------------------------------------------
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/hepato",
        description="SQLAlchemy URL of Postgres (psycopg 3 driver).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (dispatch only).")
    s3_endpoint: str = Field("127.0.0.1:8333", description="S3 host:port (MinIO, SeaweedFS).")
    s3_access_key: str = "hepato"
    s3_secret_key: str = "hepato-secret"
    s3_bucket: str = "hepato"
    s3_secure: bool = Field(False, description="Use HTTPS to reach the object store.")
    s3_region: str = "us-east-1"
    s3_public_endpoint: str = Field(
        "",
        description="S3 host:port (no scheme, no path) that clients reach the object store "
        "at, named in presigned image links: MinIO's published port, or a proxy in front "
        "of it that passes the Host header through unchanged (links are signed for this "
        "host); empty = s3_endpoint, the address the services use.",
    )
    s3_public_secure: bool | None = Field(
        None,
        description="HTTPS in presigned image links, e.g. true for a TLS-terminating proxy "
        "in front of a plain-HTTP store; unset = s3_secure.",
    )
    data_dir: Path = Field(
        REPO_ROOT / ".data", description="Local state: embedded services, ultralytics config."
    )

    # --- gateway --------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = Field("", description="Base URL put in links; empty = from the request.")
    max_file_bytes: int = Field(50 * 1024 * 1024, description="Largest accepted image, bytes.")
    max_files_per_request: int = Field(10_000, description="Most files in one batch request.")
    max_request_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Largest request body, bytes (all files and fields together); a larger one "
        "is refused with 413 before it is read, by its Content-Length or as it streams in.",
    )
    max_image_pixels: int = Field(
        178_956_970, description="Largest decoded image, pixels (Pillow's own bomb limit)."
    )
    max_slide_bytes: int = Field(
        20 * 1024**3,
        ge=1,
        description="Largest accepted whole-slide file, bytes (POST /v1/slides; its own limit, "
        "not max_request_bytes).",
    )
    max_slide_pixels: int = Field(
        40_000_000_000,
        ge=1,
        description="Largest whole slide, level-0 pixels; a larger one fails at planning.",
    )
    detect_timeout_s: float = Field(30.0, description="How long /v1/detect waits for a result, s.")
    max_queued_per_model: int = Field(
        100_000,
        ge=1,
        description="Pending jobs one model may hold; a submission past it is refused (429).",
    )
    max_queued_per_tenant: int = Field(
        50_000,
        ge=1,
        description="Pending jobs one tenant may hold in one model's queue, its share of "
        "max_queued_per_model; a submission past it is refused (429).",
    )
    inline_max_bytes: int = Field(
        256 * 1024,
        ge=0,
        description="An image up to this size also travels through Redis with its job id, so "
        "its worker need not download it from the object store (the store keeps the "
        "original); 0 turns it off, bytes.",
    )
    inline_max_queued: int = Field(
        256,
        ge=0,
        description="Images travel inline only while the model has fewer pending jobs than "
        "this: Redis holds at most about inline_max_queued x inline_max_bytes of them per "
        "model, jobs.",
    )
    inline_ttl_s: float = Field(
        120.0,
        gt=0,
        description="How long an inline image waits in Redis for its worker; past it, or after "
        "a retry, the worker downloads it from the object store, s.",
    )
    head_start: bool = Field(
        True,
        description="A lone image whose caller waits for its result (/v1/detect, /v1/predict "
        "without a question) is announced to an idle worker before its job commits, and "
        "that worker runs the model on it meanwhile; its results are written only once the "
        "worker has claimed the job (worker.head_start).",
    )
    queue_full_retry_after_s: int = Field(
        10, ge=1, description="Retry-After of a 429 for a full queue, s."
    )
    batch_page_size: int = Field(100, description="Jobs per page in GET /v1/batches/{id}.")
    export_page_size: int = Field(
        100, ge=1, description="Jobs read per query while an export streams (bounds its memory)."
    )
    auth: Literal["required", "open"] = Field(
        "required",
        description="'required': every call but health, /metrics, docs and /v1/models needs a "
        "tenant's API key (Authorization: Bearer or X-API-Key). 'open': no key, every request "
        "acts as the tenant 'public', so anyone who reaches the gateway reads every job.",
    )
    idempotency_ttl_s: float = Field(
        86_400.0, gt=0, description="How long an Idempotency-Key's answer is kept, s."
    )
    presign_expiry_s: int = Field(
        300,
        ge=1,
        le=604_800,
        description="Lifetime of a presigned image link (GET /v1/jobs/{id}/image_url), s.",
    )
    upload_url_expiry_s: int = Field(
        3600,
        ge=1,
        le=604_800,
        description="Lifetime of a direct upload's presigned PUT URL (POST /v1/uploads); the "
        "upload is committed by the end of its hour plus twice this, or swept, s.",
    )

    events_poll_interval_s: float = Field(
        2.0,
        gt=0,
        description="An event stream re-reads Postgres at least this often even with no "
        "Redis wake-up (a lost wake-up costs at most this much latency), s.",
    )
    events_keepalive_s: float = Field(
        15.0, gt=0, description="Keep-alive comment on an idle event stream every this many s."
    )

    webhook_secret: str = Field(
        "",
        description="Signing secret (Standard Webhooks, 'whsec_' + base64) of the tenant "
        "'public' (the open mode's) while it has no secret of its own; every other tenant "
        "signs with its own (hepato keys). Empty: the open mode refuses a callback_url (422).",
    )
    webhook_secret_overlap_s: float = Field(
        86_400.0,
        ge=0,
        description="After a tenant's secret is rotated, webhooks carry a signature by the "
        "previous secret too, for this long, so receivers can switch over, s.",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Callback hosts allowed although they resolve to loopback, link-local, "
        "private or other non-public addresses, or to the stack's own Postgres, Redis or "
        "object store: a JSON list of host names (matched exactly, case-insensitively) and "
        'IP addresses or CIDR networks, e.g. ["hooks.lab.internal", "10.20.0.0/16"]; '
        "empty = public addresses only.",
    )
    webhook_concurrency: int = Field(
        16, ge=1, description="Webhook attempts one worker keeps in flight at once."
    )
    webhook_max_attempts: int = Field(6, ge=1, description="Attempts per webhook before it fails.")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="Wait before a webhook's 2nd attempt, doubling after each, s."
    )
    webhook_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Total deadline of one webhook attempt (resolve, connect, send, answer "
        "status), s; the answer's body is never read.",
    )

    # --- models ---------------------------------------------------------------
    models_dir: Path = Field(
        REPO_ROOT / "models" / "manifests",
        description="Directory of model manifests (*.yaml); weights are local files only.",
    )
    default_model: str = Field("hepato-yolov8n", description="Model of a job that names none.")
    worker_models: list[str] = Field(
        default_factory=list,
        description="Models a worker serves (JSON list); empty = the default model.",
    )
    device: str = Field("", description="'cuda', 'cuda:1' or 'cpu'; empty = CUDA when present.")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="CPU threads per model runtime; 0 = one per core the model may use (the "
        "worker's CPU affinity, or model_cpus).",
    )
    model_cpus: str = Field(
        "",
        description="Cores for a worker's model threads (Linux CPU list, e.g. '2-7', or "
        "'last:N', the last N of the cores the worker may use at start); its other threads "
        "and processes run on the rest. Empty: no pinning.",
    )

    # --- worker ---------------------------------------------------------------
    max_batch_size: int | None = Field(
        None, ge=1, description="Caps every model's max_batch_size (images); unset = manifests'."
    )
    max_wait_ms: float | None = Field(
        None, ge=0, description="Overrides every model's max_wait_ms (ms); unset = manifests'."
    )
    poll_timeout_s: float = Field(1.0, gt=0, description="BLPOP timeout; bounds shutdown, s.")
    lease_s: float = Field(60.0, gt=0, description="A claimed job's lease, s.")
    lease_extend_every_s: float = Field(10.0, gt=0, description="Lease renewal period, s.")
    max_attempts: int = Field(3, ge=1, description="Claims before a job is failed for good.")
    retry_backoff_s: float = Field(
        1.0,
        ge=0,
        description="First wait before a failed attempt is retried, s; doubles per attempt, "
        "jittered to 50-100%.",
    )
    retry_backoff_max_s: float = Field(60.0, ge=0, description="Longest retry wait, s.")
    fetch_concurrency: int = Field(16, ge=1, description="Parallel object-store downloads.")
    sweep_interval_s: float = Field(5.0, gt=0, description="Period of the recovery sweeper, s.")
    retention_days: float | None = Field(
        None,
        ge=0,
        description="Finished jobs (done, failed, canceled, expired) are deleted this long "
        "after they finished, with their events, emptied batches, finished slides and "
        "objects; also expired idempotency keys and settled webhook deliveries "
        "(common.retention). Unset or 0 = kept forever, days.",
    )
    retention_chunk: int = Field(
        1000, ge=1, description="Jobs deleted per retention transaction, jobs."
    )
    retention_chunks_per_sweep: int = Field(
        10,
        ge=1,
        description="Retention transactions one worker's sweep may run (the rate: at most "
        "this x retention_chunk jobs per sweep_interval_s, by one worker at a time).",
    )
    retention_interval_s: float = Field(
        300.0,
        gt=0,
        description="Once retention has caught up, the next pass starts this much later, s.",
    )
    partition_days_ahead: int = Field(
        7,
        ge=1,
        le=365,
        description="Days after today whose partitions of jobs and job_events the sweeper "
        "(and hepato retention run) keeps made ahead of need (common.partitions); a job of a "
        "day without one goes to the default partition, days.",
    )
    requeue_pending_after_s: float = Field(
        30.0,
        gt=0,
        description="Period of the look for single ids Redis dropped (a worker dead between "
        "pop and claim): a pending job this old, missing from its queue at two looks in a "
        "row, is pushed again, s. A Redis restart or flush is repaired at the next sweep.",
    )
    decode_processes: int = Field(
        2, ge=1, description="Processes that decode images, isolated from the worker."
    )
    decode_timeout_s: float = Field(
        30.0, gt=0, description="Longest a microbatch's decoding may take before it is cut, s."
    )
    decode_arena_mib: int = Field(
        16,
        ge=0,
        description="Shared memory of each decoder process, through which images go to it "
        "and pixels come back, MiB (a 2048 px RGB image is 12). A larger image, or all with "
        "0, goes through a pipe instead. /dev/shm must hold decode_processes times this.",
    )
    model_timeout_s: float = Field(
        600.0, gt=0, description="Longest one model call may take before its jobs retry, s."
    )
    model_warmup: bool = Field(
        True,
        description="Before it says it is ready, a worker runs each model it serves on blank "
        "images, at batch 1 and at its largest microbatch: its first jobs do not pay the "
        "runtime's first-run costs (memory planning; on a GPU, kernel loading and tuning).",
    )
    prefetch_batches: int = Field(
        1,
        ge=0,
        description="Microbatches a worker claims, downloads and decodes ahead of the one on "
        "the model; 0 runs the stages one after another.",
    )
    slide_cache_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="Disk the local copies of slides may take per process (a worker's, for "
        "its tiles; a gateway's, for deep-zoom tiles), bytes; the least "
        "recently read are deleted past it (a slide being read is never deleted).",
    )
    slide_cache_dir: Path | None = Field(
        None,
        description="Where workers and gateways keep local copies of slides (a folder "
        "each); empty = data_dir/slides.",
    )
    worker_id: str = Field("", description="Worker name in the job rows; empty = host:pid.")
    worker_metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="TCP port of a worker's Prometheus /metrics; 0 = not served. A port "
        "already taken (several workers on one host) is logged and the worker runs without.",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="Address a worker's /metrics listens on; loopback by default, "
        "docker-compose.yml sets 0.0.0.0 so Prometheus can reach the container.",
    )

    @field_validator("s3_public_endpoint")
    @classmethod
    def _host_port_only(cls, value: str) -> str:
        # minio-py refuses "https://host" as "path in endpoint is not allowed": say why.
        value = value.strip()
        if "://" in value or "/" in value:
            raise ValueError(
                "s3_public_endpoint is host[:port], without scheme or path "
                "(HTTPS: s3_public_secure=true)"
            )
        return value

    @field_validator("model_cpus")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        if value.strip():
            cpus.check(value)  # its ValueError names what is wrong
        return value

    @property
    def worker_name(self) -> str:
        """A worker's name in its job rows and its connections: worker_id, else host:pid."""
        return self.worker_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def ultralytics_dir(self) -> Path:
        return self.data_dir / "ultralytics"

    @property
    def slide_cache_path(self) -> Path:
        return self.slide_cache_dir or self.data_dir / "slides"


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""``GET /v1/models``: the models jobs can name, from the manifests the gateway loaded,
and how many live workers serve each (their heartbeats in Redis)."""

from __future__ import annotations

from collections import Counter

import redis
from fastapi import APIRouter

from hepato.common import schemas
from hepato.common.constants import WORKER_KEY_PATTERN
from hepato.gateway.deps import ResourcesDep

router = APIRouter(prefix="/v1")


def live_workers(client: redis.Redis) -> Counter[str] | None:
    """Workers per model, from the heartbeat each sets (its models, comma-separated,
    with a TTL); None when Redis cannot say."""
    try:
        keys = list(client.scan_iter(WORKER_KEY_PATTERN, count=1000))
        served = client.mget(keys) if keys else []
    except redis.RedisError:
        return None
    counts: Counter[str] = Counter()
    for raw in served:
        if raw:  # expired between SCAN and MGET
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            counts.update(set(text.split(",")))
    return counts


@router.get("/models", response_model=list[schemas.ModelOut], summary="Models jobs can name")
def list_models(res: ResourcesDep) -> list[schemas.ModelOut]:
    workers = live_workers(res.redis)
    return [
        schemas.ModelOut(
            name=m.name,
            version=m.version,
            task=m.task,
            backend=m.backend,
            description=m.description,
            labels=m.labels,
            input_size=m.input_size,
            max_batch_size=m.max_batch_size,
            default=m.name == res.settings.default_model,
            workers=None if workers is None else workers[m.name],
        )
        for m in sorted(res.models.values(), key=lambda m: m.name)
    ]

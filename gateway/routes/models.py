"""``GET /v1/models``: the models jobs can name, from the manifests the gateway loaded."""

from __future__ import annotations

from fastapi import APIRouter

from hepato.common import schemas
from hepato.gateway.deps import ResourcesDep

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=list[schemas.ModelOut], summary="Models jobs can name")
def list_models(res: ResourcesDep) -> list[schemas.ModelOut]:
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
        )
        for m in sorted(res.models.values(), key=lambda m: m.name)
    ]

"""FastAPI dependencies as Annotated aliases (as full-stack-fastapi-template does)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

import redis
from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from hepato.common.manifest import ModelManifest
from hepato.common.settings import Settings
from hepato.common.slides.cache import SlideCache
from hepato.common.slides.deepzoom import TileCache
from hepato.common.storage import ObjectStore


@dataclass
class Resources:
    """Clients made once per process in the app's lifespan."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis
    store: ObjectStore
    models: dict[str, ModelManifest]
    # Local copies of the slides viewed through this gateway, and their rendered tiles.
    slide_cache: SlideCache
    tiles: TileCache = field(default_factory=TileCache)


# Async (here and in the other cheap dependencies): FastAPI runs a plain ``def`` in its
# thread pool, and each such hop cost a request a thread hand-off each way.
async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


def get_session(resources: Annotated[Resources, Depends(get_resources)]) -> Iterator[Session]:
    with resources.sessions() as session:
        yield session


ResourcesDep = Annotated[Resources, Depends(get_resources)]
SessionDep = Annotated[Session, Depends(get_session)]

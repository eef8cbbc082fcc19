"""The Python client of the HepatoAI API: ``HepatoClient`` and ``AsyncHepatoClient``, the
errors they raise and the events they yield.

Layout: ``transport`` (one API call with bounded retries, uploads streamed from disk,
event streams resumed), ``async_client`` (``AsyncHepatoClient``: the methods), ``slides``
(its whole-slide methods), ``sync_client`` (``HepatoClient``: the same methods, run on an
event loop of its own), ``types`` (errors, events), ``uploads`` (the files found and
streamed)."""

from hepato.client.async_client import AsyncHepatoClient
from hepato.client.sync_client import HepatoClient
from hepato.client.types import (
    BatchEvent,
    BatchRef,
    Event,
    HepatoAPIError,
    HepatoClientError,
    HepatoConnectionError,
    JobEvent,
    OnEvent,
    OnSlideProgress,
    SlideFormats,
)
from hepato.client.uploads import IMAGE_SUFFIXES, find_images
from hepato.common.schemas import BatchOut, JobOut, ModelOut
from hepato.common.slide_schemas import (
    SLIDE_TERMINAL_STATES,
    SlideAccepted,
    SlideOut,
    SlideState,
    SlideSummary,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SLIDE_TERMINAL_STATES",
    "AsyncHepatoClient",
    "BatchEvent",
    "BatchOut",
    "BatchRef",
    "Event",
    "HepatoAPIError",
    "HepatoClient",
    "HepatoClientError",
    "HepatoConnectionError",
    "JobEvent",
    "JobOut",
    "ModelOut",
    "OnEvent",
    "OnSlideProgress",
    "SlideAccepted",
    "SlideFormats",
    "SlideOut",
    "SlideState",
    "SlideSummary",
    "find_images",
]

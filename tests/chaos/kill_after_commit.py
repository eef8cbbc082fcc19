"""A worker that dies by SIGKILL the moment its first results commit, before any of its
own bookkeeping (failing the rest, re-pushing, publishing notices): the narrowest crash
window a redelivery must survive. Run as ``python -m tests.chaos.kill_after_commit
worker``; the product code is untouched, only ``common.jobs.complete`` is wrapped."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

from hepato.cli.main import app
from hepato.common import jobs
from hepato.common.jobs import JobResult

_commit = jobs.complete


def _commit_then_die(
    engine: Engine,
    token: uuid.UUID,
    results: Sequence[JobResult],
    model_version: str,
    **options: Any,
) -> set[uuid.UUID]:
    written = _commit(engine, token, results, model_version, **options)
    if written:
        os.kill(os.getpid(), signal.SIGKILL)
    return written


# The worker looks the function up on the module at each call, so this reaches it.
jobs.complete = _commit_then_die

if __name__ == "__main__":
    app()

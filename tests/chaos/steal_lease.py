"""A decoder for the fence case: while it decodes, the jobs being decoded are taken from
their worker (as a sweeper and another worker would: a new lease, and done), then it
rejects the image, so the worker's write of that failure is refused by the fence. It
runs in the worker's decoder processes; the database is named by HEPATO_TEST_STEAL_DB."""

from __future__ import annotations

import os

import numpy as np
from sqlalchemy import create_engine, text

from hepato.common.exceptions import InvalidImage


def steal_then_reject(data: bytes) -> np.ndarray:
    engine = create_engine(os.environ["HEPATO_TEST_STEAL_DB"])
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE jobs SET lease_token = gen_random_uuid(), worker_id = 'thief', "
                    "state = 'done', finished_at = now(), lease_until = NULL "
                    "WHERE state = 'processing'"
                )
            )
    finally:
        engine.dispose()
    raise InvalidImage("rejected after its lease was taken")

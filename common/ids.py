"""Job ids: UUIDv7 (RFC 9562 §5.7), whose first 48 bits are the job's creation time in
Unix milliseconds and the rest random. ``jobs`` and ``job_events`` are partitioned by
day on the job id (common.partitions), so a new job lands in its day's partition and a
lookup by id reads one partition.

Every job id is made here (``new_job_id``), from ``_clock_ms``: a test that needs jobs
made days ago patches that one function. Ids made before migration 0015 are UUIDv4:
random over the whole space, they live in the default and legacy partitions.

Built here rather than taken from a package: the bounds of a day (``day_bound``), the
bench's filler (the same layout in SQL) and back-dated test jobs all need an id for a
given instant, which the packages' ``uuid7()`` does not take. Ids made in the same
millisecond are not ordered among themselves: nothing reads jobs in id order."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, date, datetime, timedelta

_EPOCH = date(1970, 1, 1)
_MS_PER_DAY = 86_400_000


def _clock_ms() -> int:
    return time.time_ns() // 1_000_000


def new_job_id() -> uuid.UUID:
    """A fresh UUIDv7 for a job created now."""
    return uuid7_at(_clock_ms())


def uuid7_at(ms: int) -> uuid.UUID:
    """A UUIDv7 for the instant ``ms`` (Unix milliseconds), with 74 random bits."""
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"{ms} ms is outside UUIDv7's 48-bit time")
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 62) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


def day_bound(day: date) -> uuid.UUID:
    """The smallest id of ``day`` (UTC): its first millisecond, zeros after. Every id made
    that day is at or above it and below the next day's."""
    return uuid.UUID(int=((day - _EPOCH).days * _MS_PER_DAY) << 80)


def made_at(job_id: uuid.UUID) -> datetime | None:
    """When a UUIDv7 job id was made; None for an older (v4) id, which tells nothing."""
    if job_id.version != 7:
        return None
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=job_id.int >> 80)


def uuid7_sql(at: str) -> str:
    """SQL for a UUIDv7 of the timestamptz expression ``at``, laid out as ``uuid7_at``'s,
    its random bits from ``random()``: for rows made in SQL (the bench's filler, tests)
    that should land in their day's partition as jobs made by ``new_job_id`` do."""
    ms = f"CAST(floor(extract(epoch FROM {at}) * 1000) AS bigint)"
    return (
        f"CAST(lpad(to_hex({ms}), 12, '0') || '7' || substr(md5(random()::text), 1, 3)"
        " || substr('89ab', 1 + floor(random() * 4)::int, 1)"
        " || substr(md5(random()::text), 1, 15) AS uuid)"
    )

"""The scale bench's targets judge the median of repeated runs at each size and worker
count, not whichever run came last (hepato.bench.scale_report)."""

from __future__ import annotations

from typing import Any

from hepato.bench.scale_report import markdown, medians, targets


def _run(
    rows: int,
    workers: int,
    jobs_per_s: float,
    repeat: int,
    lock: float = 0.0,
    paired: int = 0,
    by_kind: dict[str, float] | None = None,
) -> dict:
    wait: dict[str, Any] = {"total_s": 0.0, "event_log_share": None, "ms_per_job": lock}
    if by_kind is not None:
        wait["by_kind_s"] = by_kind
    return {
        "rows": rows,
        "paired_with": paired or rows,
        "workers": workers,
        "repeat": repeat,
        "submitted": 10,
        "done": 10,
        "jobs_per_s": jobs_per_s,
        "claim": None,
        "complete": {"p99_ms": 1.0, "write_statements": [1], "jobs_write_statements": [1]},
        "lock_wait": wait,
        "postgres_cpu_ms_per_job": 0.2,
    }


def _ratio(runs: list[dict[str, Any]]) -> dict[int, float]:
    return targets(runs)[0]["value"]


def test_the_throughput_ratio_is_of_the_medians_of_each_point() -> None:
    # One slow run at the large size (the last one) and one fast run at the empty table:
    # the median of three ignores both.
    runs = [
        _run(0, 1, 1000, 1, paired=5_000_000),
        _run(0, 1, 1400, 2, paired=5_000_000),
        _run(0, 1, 1000, 3, paired=5_000_000),
        _run(5_000_000, 1, 980, 1),
        _run(5_000_000, 1, 960, 2),
        _run(5_000_000, 1, 600, 3),
    ]
    assert _ratio(runs) == {1: 0.96}
    assert targets(runs)[0]["met"] is True
    assert medians(runs)[(0, 1, 5_000_000)] == {
        "runs": 3,
        "jobs_per_s": 1000,
        "lock_wait": {"ms_per_job": 0.0, "locks_ms_per_job": 0.0, "latches_ms_per_job": None},
    }


def test_each_filled_size_is_compared_with_the_empty_runs_made_beside_it() -> None:
    # The machine halved its speed between the two sizes: each size's own empty runs
    # say so, and the ratio at the largest size uses those, not the 1,000,000's.
    runs = [_run(0, 1, 2000, 1, paired=1_000_000), _run(1_000_000, 1, 1900, 1)]
    runs += [_run(0, 1, 1000, 1, paired=5_000_000), _run(5_000_000, 1, 950, 1)]
    ratio = targets(runs)[0]
    assert ratio["target"].startswith("throughput at 5,000,000 rows / at 0 rows")
    assert ratio["value"] == {1: 0.95}
    assert set(medians(runs)) == {
        (0, 1, 1_000_000),
        (1_000_000, 1, 1_000_000),
        (0, 1, 5_000_000),
        (5_000_000, 1, 5_000_000),
    }


def test_lock_wait_growth_is_judged_on_medians_too() -> None:
    runs = [_run(0, 1, 1000, r, lock=0.01) for r in (1, 2, 3)]
    runs += [_run(0, 4, 1000, 1, lock=0.5), _run(0, 4, 1000, 2, lock=0.02)]
    runs += [_run(0, 4, 1000, 3, lock=0.03)]
    (growth,) = [t for t in targets(runs) if t["target"].startswith("heavyweight lock")]
    assert growth["value"] == {"0": "0.01 -> 0.03"}
    assert growth["met"] is True


def test_heavyweight_locks_and_latches_are_judged_apart() -> None:
    # 10 jobs a run: 0.1 ms/job is one millisecond of wait. Four workers wait on WAL
    # flushes (a latch) far more than one, but on no transaction's lock.
    one = {"LWLock: WALWrite": 0.001}
    four = {"LWLock: WALWrite": 0.01, "Lock: extend": 0.0001}
    runs = [_run(0, 1, 1000, r, lock=0.1, by_kind=one) for r in (1, 2, 3)]
    runs += [_run(0, 4, 1000, r, lock=1.01, by_kind=four) for r in (1, 2, 3)]
    found = {t["target"].split(" ms/job")[0]: t for t in targets(runs)}
    locks, latches = found["heavyweight lock wait"], found["latch (LWLock) wait"]
    assert (locks["value"], locks["met"]) == ({"0": "0.0 -> 0.01"}, True)
    assert (latches["value"], latches["met"]) == ({"0": "0.1 -> 1.0"}, False)
    text = markdown(
        {
            "command": ["hepato", "bench", "scale"],
            "machine": {"cpu": "test", "cores": 2},
            "started_at": "now",
            "runs": runs,
            "targets": targets(runs),
        }
    )
    assert "| 0 | 4 | 3 | 1000.0 | 1.010 | 0.010 | 1.000 |" in text


def test_the_markdown_has_every_run_and_the_medians() -> None:
    runs = [_run(0, 1, v, r) for r, v in enumerate((900, 1000, 1100), start=1)]
    result = {
        "command": ["hepato", "bench", "scale"],
        "machine": {"cpu": "test", "cores": 2},
        "started_at": "now",
        "runs": runs,
        "targets": targets(runs),
    }
    text = markdown(result)
    assert text.count("| 10/10 |") == 3
    assert "| 0 | 1 | 3 | 1000.0 | 0.000 |" in text
    paired = [_run(0, 1, 900, 1, paired=20_000), _run(20_000, 1, 800, 1)]
    text = markdown({**result, "runs": paired, "targets": targets(paired)})
    assert "| 0 (beside 20,000) | 1 | 1 | 900.0 |" in text

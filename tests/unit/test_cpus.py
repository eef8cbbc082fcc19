"""Cores of its own for the model (settings.model_cpus): the CPU list read as Linux
writes it, refused with its problem named, and a worker whose model threads (its
runtime's pool and its model-call threads) run there while the rest runs elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from hepato.common import cpus
from hepato.common.settings import Settings
from tests.conftest import REPO


def test_a_cpu_list_reads_as_linux_writes_it() -> None:
    assert cpus.parse("1") == {1}
    assert cpus.parse("0,2") == {0, 2}
    assert cpus.parse("4-7, 12") == {4, 5, 6, 7, 12}


@pytest.mark.parametrize(
    ("text", "named"),
    [("a", "not a CPU list"), ("1-", "not a CPU list"), ("3-1", "counts down"), ("-1", "not")],
)
def test_a_bad_cpu_list_is_refused_naming_the_problem(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        cpus.parse(text)
    with pytest.raises(ValidationError, match="model_cpus"):
        Settings(model_cpus=text)


def test_no_list_pins_nothing_and_cores_out_of_reach_are_refused() -> None:
    assert cpus.split("") is None and cpus.split("  ") is None
    allowed = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="may not use"):
        cpus.split(str(max(allowed) + 1))
    # The model on every core: nothing to keep apart, the rest shares them.
    every = cpus.split(cpus.format_list(allowed))
    assert every is not None and every.model == every.rest == allowed


# In a process of its own: pinning is per thread, and would pin the test runner's.
PROBE = """
import json, os
from hepato.common.settings import Settings
from hepato.worker import inference
from hepato.worker.backends.base import load_models

def cores():
    return {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}

before = cores()
settings = Settings(model_cpus="MODEL", cpu_threads=2)
models = inference.load_pinned(settings, lambda: load_models(settings, ["hepato-yolov8n"]))
pools = {t: c for t, c in cores().items() if t not in before}
call = inference.with_timeout(lambda: sorted(os.sched_getaffinity(0)), 30)
print(json.dumps({"pools": pools, "call": call, "main": sorted(os.sched_getaffinity(0))}))
"""


def test_a_workers_model_threads_run_on_their_cores_and_the_rest_elsewhere() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert len(allowed) >= 2, "needs two cores to keep apart"
    model, rest = allowed[-1], allowed[:-1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE.replace("MODEL", str(model))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # ONNX Runtime's intra-op pool started while loading, on the model's core.
    assert found["pools"] and all(c == [model] for c in found["pools"].values())
    assert found["call"] == [model]  # the thread the model is called on
    assert found["main"] == rest  # and what the worker starts after: intake, decoders


def test_last_n_takes_the_last_cores_the_process_may_use() -> None:
    """For a container whose cores are only known at start (Kubernetes' static CPU
    manager gives a pod its exclusive cores when it runs)."""
    allowed = sorted(os.sched_getaffinity(0))
    last = cpus.split("last:1")
    assert last is not None and last.model == {allowed[-1]}
    assert last.rest == (set(allowed[:-1]) or set(allowed))
    assert Settings(model_cpus="last:1").model_cpus == "last:1"
    with pytest.raises(ValueError, match="at least one core"):
        cpus.split("last:0")
    with pytest.raises(ValueError, match=f"asks for {len(allowed) + 1} cores"):
        cpus.split(f"last:{len(allowed) + 1}")
    with pytest.raises(ValidationError, match="model_cpus"):
        Settings(model_cpus="last:0")


# A process on one core (a container's cpuset, or model_cpus while the model loads).
ONE_CORE = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from hepato.worker.backends.base import Runtime
print(Runtime().cpu_threads, Runtime(threads=3).cpu_threads)
"""


def test_a_runtimes_default_threads_are_the_cores_it_may_use_not_the_machines() -> None:
    """0 threads meant os.cpu_count(): in a cpuset of one core on a larger machine, a pool
    of a thread per core of the machine, all taking turns on that one."""
    assert len(os.sched_getaffinity(0)) >= 2, "needs a machine larger than the cpuset"
    out = subprocess.run(
        [sys.executable, "-c", ONE_CORE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["1", "3"]

"""ONNX Runtime provider choice and the one-install rule."""

from __future__ import annotations

from importlib import metadata

import pytest

from hepato.common.exceptions import BackendError
from hepato.worker.backends import onnx_runtime
from hepato.worker.backends.base import Runtime

BOTH = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_when_present_cpu_otherwise() -> None:
    assert onnx_runtime.providers(Runtime(), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    chosen = onnx_runtime.providers(Runtime(), BOTH)
    assert chosen[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_runtime.providers(Runtime(device="cuda:1"), BOTH)[0][1] == {"device_id": 1}
    assert onnx_runtime.providers(Runtime(device="cpu"), BOTH) == ["CPUExecutionProvider"]


def test_onnxruntime_and_onnxruntime_gpu_side_by_side_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    onnx_runtime.check_single_install()  # this environment has exactly one
    monkeypatch.setattr(metadata, "version", lambda dist: "1.31.1")
    with pytest.raises(BackendError, match=r"both onnxruntime==1\.31\.1 and onnxruntime-gpu"):
        onnx_runtime.check_single_install()


def test_no_install_recipe_puts_both_runtimes_together() -> None:
    import tomllib

    from tests.conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name, deps in extras.items():
        runtimes = {d.split("==")[0] for d in deps if d.startswith("onnxruntime")}
        assert len(runtimes) <= 1, f"extra {name} installs {runtimes}"

    def installs(dockerfile: str) -> str:
        text = (REPO / dockerfile).read_text()
        return " ".join(ln for ln in text.splitlines() if "pip install" in ln)

    assert "onnx-gpu" in installs("Dockerfile.worker")
    assert "onnx-cpu" not in installs("Dockerfile.worker")
    assert "onnx" not in installs("Dockerfile.gateway")

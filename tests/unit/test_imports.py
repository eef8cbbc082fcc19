"""The gateway image has no torch: importing the app must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_imports_no_model_stack() -> None:
    code = (
        "import sys, hepato.gateway.app, hepato.cli.main; "
        "bad = [m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_onnx_worker_imports_no_torch() -> None:
    """The local stack's default worker serves the demo detector on ONNX Runtime; with
    only hepato[worker,onnx-cpu] installed it must load and predict without torch."""
    code = (
        "import sys, numpy as np; "
        "from hepato.common.settings import Settings; "
        "from hepato.worker.backends.base import load_models; "
        "models = load_models(Settings()); "
        "[m.predict([np.zeros((300, 200, 3), np.uint8)]) for m in models.values()]; "
        "bad = [m for m in ('torch', 'ultralytics', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

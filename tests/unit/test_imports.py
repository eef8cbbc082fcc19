"""The gateway image has no torch: importing the app must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_gateway_imports_no_model_stack() -> None:
    code = (
        "import sys, gateway.app, common.cli; "
        "bad = [m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Keep ultralytics offline. It reaches for the network to sync settings, fetch fonts,
check requirements and download missing weights; this must run before it is imported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def configure_ultralytics(config_dir: Path) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    # Requirement checks would otherwise pip-install what they miss (e.g. onnxslim on export).
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    # Plots in training/validation want Arial.ttf and download it when it is missing;
    # matplotlib's bundled DejaVu Sans stands in, placed where ultralytics looks first
    # (its settings dir is the "Ultralytics" folder inside YOLO_CONFIG_DIR).
    import matplotlib

    fonts_dir = config_dir / "Ultralytics"
    fonts_dir.mkdir(exist_ok=True)
    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = fonts_dir / name
        if not target.exists() and dejavu.exists():
            shutil.copyfile(dejavu, target)
    from ultralytics import settings

    if settings.get("sync", True):
        settings.update({"sync": False})

"""A worker whose model kills its process (SIGKILL, as the OOM killer or a segfault in
native code would) when a microbatch holds the poison pixel. Run as ``python -m
tests.chaos.die_on_poison worker``; only model loading is wrapped, the rest is the real
worker."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from hepato.cli.main import app
from hepato.worker import runner
from tests.chaos.poison import DEATH_PIXEL

_load = runner.load_models


class DiesOnPoison:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.manifest = model.manifest

    def predict(self, images: list[np.ndarray]) -> Any:
        if any(tuple(image[0, 0]) == DEATH_PIXEL for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model.predict(images)


def _load_dying(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {name: DiesOnPoison(m) for name, m in _load(*args, **kwargs).items()}


# run_worker looks load_models up on the module at each call, so this reaches it.
runner.load_models = _load_dying

if __name__ == "__main__":
    app()

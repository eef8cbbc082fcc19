"""Model backends: one module per (task, backend), loaded on demand (see base.BACKENDS)."""

import os

# Runs before any backend module, so before transformers or huggingface_hub is imported:
# they read these once, at import. Nothing is ever downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

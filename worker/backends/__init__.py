"""Model backends: one module per (task, backend), loaded on demand (see base.BACKENDS)."""

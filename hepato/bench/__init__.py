"""The benchmark: `hepato bench models` (bare models) and `hepato bench e2e` (the stack)."""

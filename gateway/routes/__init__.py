"""The public API (v1), one module per resource; gateway.app includes their routers."""

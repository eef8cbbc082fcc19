"""The `hepato` command: one typer app, with the services, keys, models, bench and client
commands."""

"""``python -m hepato``: the ``hepato`` command."""

from hepato.cli.main import app

app()

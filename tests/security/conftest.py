"""The end-to-end fixtures (real services, a clean database and Redis per test) serve the
security tests too; pytest finds fixtures by the module attributes that hold them."""

from tests.e2e import conftest as e2e

base_settings = e2e.base_settings
settings = e2e.settings

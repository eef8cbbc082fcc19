"""The local stack's SeaweedFS takes half the cores (Go would spin on all of them),
unless GOMAXPROCS says otherwise."""

from __future__ import annotations

import pytest

from hepato.devstack.localstack import weed_env


def test_seaweedfs_takes_half_the_cores_and_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert weed_env(2)["GOMAXPROCS"] == "1"
    assert weed_env(1)["GOMAXPROCS"] == "1"
    assert weed_env(16)["GOMAXPROCS"] == "8"


def test_a_gomaxprocs_set_by_the_operator_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOMAXPROCS", "3")
    assert weed_env(2)["GOMAXPROCS"] == "3"

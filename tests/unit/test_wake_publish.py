"""common.wake_publish: what commits inside ``gathered`` is left to the caller, unless the
block fails (something may have committed before the error): then it is published."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine

from hepato.common import wake_publish


class Recorder:
    """A Redis client that records the pipelines it executes."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.messages: dict[str, str] = {}

    def pipeline(self, transaction: bool = False) -> Any:
        recorder, commands = self, list[str]()

        class Pipe:
            def publish(self, channel: str, message: str) -> None:
                commands.append(channel)
                recorder.messages[channel] = message

            def execute(self) -> None:
                recorder.sent.append(commands)

        return Pipe()


@pytest.fixture
def recorder() -> Any:
    engine, client = create_engine("sqlite://"), Recorder()
    wake_publish.attach(engine, client)  # type: ignore[arg-type]
    return engine, client


def test_gathered_wakes_are_left_to_the_caller(recorder: Any) -> None:
    engine, client = recorder
    with wake_publish.gathered(engine) as channels:
        wake_publish.publish(engine, {"b", "a"})
    assert channels == {"a", "b"} and client.sent == []
    wake_publish.publish(engine, {"c"})  # outside: at once
    assert client.sent == [["c"]]


def test_a_failing_block_publishes_what_it_gathered(recorder: Any) -> None:
    engine, client = recorder
    with pytest.raises(RuntimeError), wake_publish.gathered(engine):
        wake_publish.publish(engine, {"b", "a"})
        raise RuntimeError("after the commit")
    assert client.sent == [["a", "b"]]


def test_another_engines_commits_publish_at_once(recorder: Any) -> None:
    engine, client = recorder
    other = create_engine("sqlite://")
    wake_publish.attach(other, client)  # type: ignore[arg-type]
    with wake_publish.gathered(engine) as channels:
        wake_publish.publish(other, {"x"})
    assert channels == set() and client.sent == [["x"]]


def test_a_channel_with_a_message_carries_it_and_the_others_carry_one(recorder: Any) -> None:
    engine, client = recorder
    wake_publish.publish(engine, {"a", "b"}, {"b": '{"id": 1}', "not woken": "x"})
    assert client.sent == [["a", "b"]]
    assert client.messages == {"a": "1", "b": '{"id": 1}'}

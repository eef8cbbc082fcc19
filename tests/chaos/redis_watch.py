"""What the workers do on Redis, seen from the server: which clients are blocked in a
BLPOP (CLIENT LIST), and every command sent while a MONITOR runs. Chaos cases await
these instead of sleeping and hoping a worker has reached the step they fault."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis


def blocked_in_blpop(client: redis.Redis) -> list[dict[str, str]]:
    """The connections the server holds blocked in a BLPOP."""
    return [
        c
        for c in client.client_list()
        if c.get("cmd") == "blpop" and "b" in str(c.get("flags", ""))
    ]


@dataclass
class Monitor:
    """Every command the server ran, as ``(client "addr:port", [name, *args])``."""

    commands: list[tuple[str, list[str]]] = field(default_factory=list)

    def sent(self, name: str) -> list[tuple[str, list[str]]]:
        return [(who, args) for who, args in list(self.commands) if args[0].upper() == name]


@contextlib.contextmanager
def monitored(url: str) -> Iterator[Monitor]:
    """Record commands from entry to exit (MONITOR, on a connection of its own)."""
    client = redis.Redis.from_url(url)
    seen = Monitor()
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with client.monitor() as monitor:  # on once entered: its OK has been read
            ready.set()
            while not stop.is_set():
                try:
                    got = monitor.next_command()
                except (redis.ConnectionError, ValueError):
                    return
                words = got["command"].split(" ")
                if words[0].upper() == "PING":
                    continue
                address = f"{got.get('client_address')}:{got.get('client_port')}"
                seen.commands.append((address, words))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield seen
    finally:
        stop.set()
        # Any command wakes the listener so that it sees the stop.
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(url).ping()
        thread.join(5)
        client.close()

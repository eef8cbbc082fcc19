"""A TCP proxy in front of Postgres that loses a connection during COMMIT: once armed,
the first COMMIT after an ``INSERT INTO jobs`` reaches Postgres (which commits it) and
the client's connection is cut before the answer comes back, so the client cannot
know whether its transaction committed. Every other byte passes through."""

from __future__ import annotations

import contextlib
import socket
import threading

INSERT_JOBS = b"INSERT INTO jobs ("
COMMIT = b"COMMIT"


class CommitCutter:
    def __init__(self, upstream: str | tuple[str, int]) -> None:
        """``upstream``: a unix socket path, or (host, port)."""
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if isinstance(self.upstream, str):
                server = socket.socket(socket.AF_UNIX)
                server.connect(self.upstream)
            else:
                server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        """Client to server here; server to client in a thread of its own."""
        cutting = threading.Event()

        def back() -> None:
            with contextlib.suppress(OSError):
                while data := server.recv(65536):
                    if cutting.is_set():
                        break  # the COMMIT's answer: dropped, and the line cut
                    client.sendall(data)
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            if cutting.is_set():
                self.cut.set()

        threading.Thread(target=back, daemon=True).start()
        seen_insert = False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.armed.is_set() and not self.cut.is_set():
                    seen_insert = seen_insert or INSERT_JOBS in data
                    if seen_insert and COMMIT in data.split(INSERT_JOBS)[-1]:
                        with self._lock:
                            if self.armed.is_set():
                                self.armed.clear()
                                cutting.set()
                server.sendall(data)

"""The worker's webhook sender: a thread of its own running an asyncio loop, so a slow
or hostile receiver costs a coroutine, never the sweeper (heartbeat, lease recovery,
re-push) nor a thread. At most HEPATO_WEBHOOK_CONCURRENCY attempts are in flight. Each
has a total deadline (resolve, connect, send, status line and headers) rather than
httpx's per-read timeout, which a receiver trickling a byte a second never trips, and the
answer's body is never read. Whatever one attempt raises is that attempt's outcome: the
other deliveries of the round are recorded as they went."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
from sqlalchemy import Engine

from hepato.common import egress, webhooks
from hepato.common.exceptions import CallbackRefused
from hepato.common.settings import Settings
from hepato.common.webhooks import Due

log = logging.getLogger(__name__)

# Outcomes no retry can change: the attempt fails the delivery for good.
_FINAL_ERRORS = (CallbackRefused, httpx.InvalidURL, httpx.UnsupportedProtocol)


class WebhookSender:
    """Delivers due webhooks until ``stop``; ``deliver_once`` runs one round in the
    caller's thread (tests, and a worker that only drains)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._resolvers = self._resolver_pool()

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Claim nothing more and abandon the attempts in flight: each is tried again
        once its claim runs out, under the same webhook-id."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def deliver_once(self) -> int:
        """Claim what is due (up to the concurrency), attempt all of it, and record the
        outcomes; how many were attempted."""

        async def one_round() -> int:
            async with self._client() as client:
                due = await self._claim(self.settings.webhook_concurrency)
                await asyncio.gather(*(self._attempt(client, d) for d in due))
                return len(due)

        if not self._thread.is_alive():
            self._resolvers = self._resolver_pool()
        try:
            return asyncio.run(one_round())
        finally:
            if not self._thread.is_alive():
                self._resolvers.shutdown(wait=False, cancel_futures=True)

    # --- the loop --------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            log.exception("the webhook sender stopped")
        finally:
            self._started.set()
            # A resolver stuck past its attempt's deadline is not waited for.
            self._resolvers.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._started.set()
        slots = self.settings.webhook_concurrency
        running: set[asyncio.Task[None]] = set()
        async with self._client() as client:
            try:
                while not self._stopping.is_set():
                    free = slots - len(running)
                    got = await self._claim(free) if free else []
                    for due in got:
                        task = asyncio.create_task(self._attempt(client, due))
                        running.add(task)
                        task.add_done_callback(running.discard)
                    # A full claim or full slots: more is due, so claim again as soon as
                    # an attempt ends; otherwise look again after the sweep interval.
                    more = len(running) >= slots or (free > 0 and len(got) == free)
                    await self._pause(running if more else set())
            finally:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)

    async def _pause(self, ends: set[asyncio.Task[None]]) -> None:
        assert self._stopping is not None
        stopped = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait(
                {stopped, *ends},
                timeout=self.settings.sweep_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopped.cancel()

    async def _claim(self, limit: int) -> list[Due]:
        try:
            return await asyncio.to_thread(webhooks.claim_due, self.engine, self.settings, limit)
        except Exception:
            log.warning("could not claim due webhooks; trying again", exc_info=True)
            return []

    # --- one attempt -----------------------------------------------------------
    def _resolver_pool(self) -> ThreadPoolExecutor:
        # Name resolution blocks; threads of its own keep a hanging resolver from holding
        # up the claims and outcome writes, and bound how many it can take.
        return ThreadPoolExecutor(
            self.settings.webhook_concurrency, thread_name_prefix="webhook-dns"
        )

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s,
            # No connection is reused: each attempt connects to the address its own check
            # approved, and a TLS session made for one tenant's host never carries
            # another's request. Redirects are not followed (they would skip the check),
            # and no proxy from the environment stands between.
            limits=httpx.Limits(
                max_connections=self.settings.webhook_concurrency, max_keepalive_connections=0
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def _attempt(self, client: httpx.AsyncClient, due: Due) -> None:
        try:
            error = await self._send(client, due)
            final = False
        except _FINAL_ERRORS as exc:
            error, final = f"{type(exc).__name__}: {exc}", True
        except Exception as exc:  # one receiver's fault is its delivery's, and only its
            error, final = f"{type(exc).__name__}: {exc}", False
        try:
            await asyncio.to_thread(webhooks.record, self.engine, self.settings, due, error, final)
        except Exception:
            log.warning("could not record webhook %s; it is tried again", due.id, exc_info=True)

    async def _send(self, client: httpx.AsyncClient, due: Due) -> str | None:
        """None when the receiver answered 2xx, else why not."""
        if not due.secrets:
            raise CallbackRefused(f"tenant {due.tenant!r} has no webhook signing secret")
        deadline_s = self.settings.webhook_timeout_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline_s):
                target = await loop.run_in_executor(
                    self._resolvers, egress.check, due.url, self.settings
                )
                response = await client.send(self._request(client, due, target), stream=True)
                await response.aclose()  # the body is never read
        except TimeoutError:
            return f"no answer within the {deadline_s:g} s deadline"
        except httpx.HTTPError as exc:
            if isinstance(exc, _FINAL_ERRORS):
                raise
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    @staticmethod
    def _request(client: httpx.AsyncClient, due: Due, target: egress.Target) -> httpx.Request:
        """The POST to the checked address itself, under the URL's own host name (Host
        header, and TLS server name and certificate check)."""
        url = httpx.URL(due.url)
        headers = webhooks.signed_headers(due, datetime.now(UTC))
        headers["host"] = url.netloc.decode("ascii")
        return client.build_request(
            "POST",
            url.copy_with(host=target.address),
            content=due.body,
            headers=headers,
            extensions={"sni_hostname": target.host} if url.scheme == "https" else {},
        )

"""Many upstreams behind one node: dispatch by free capacity, health checks with backoff.

Each upstream has a limit (calls at once: from its URL's ``max_concurrent``, else discovered from
the server, else the engine default) and a count of calls in flight. A call goes to the usable
upstream with the most free capacity (ties in turn); when every one is full, up to ``max_queue``
calls in all are still sent on (they wait in the upstreams' own queues, as the local engine's
queue would), and beyond that the call is refused as busy.

A failed call or health check marks the upstream down: it is skipped until a health check passes,
and checks back off exponentially with jitter (:data:`BACKOFF_BASE_SECONDS` doubling up to
:data:`BACKOFF_CAP_SECONDS`); healthy upstreams are checked every :data:`HEALTH_INTERVAL_SECONDS`.
An upstream that refused this node's protocol (a 426, another map) stays out until restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from meshnode.errors import ProtocolError
from meshnode.generation.api import UpstreamStatus
from meshnode.generation.remote.dialects import Dialect
from meshnode.generation.remote.upstream import UpstreamSpec, read_limited

__all__ = ["BACKOFF_BASE_SECONDS", "BACKOFF_CAP_SECONDS", "HEALTH_INTERVAL_SECONDS", "Pool", "Upstream"]

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_SECONDS = 10.0
"""Between health checks of a healthy upstream."""
HEALTH_TIMEOUT_SECONDS = 5.0
"""Bound on one health check (and on each discovery request)."""
BACKOFF_BASE_SECONDS = 0.5
"""First re-check delay after an upstream failed."""
BACKOFF_CAP_SECONDS = 30.0
"""Longest delay between checks of a down upstream."""
MAX_DISCOVERY_BYTES = 4 * 1024 * 1024
"""Largest discovery document read (``/props``, ``/get_server_info``, ``/metrics``, ``/v1/models``)."""


@dataclass(eq=False)
class Upstream:
    """One upstream's state (mutated on the event loop only)."""

    spec: UpstreamSpec
    dialect: Dialect
    limit: int
    active: int = 0
    healthy: bool = True
    """Until a check or a call fails (the first round of checks runs when the backend opens)."""
    incompatible: str | None = None
    model: str | None = None
    """The model id it serves (``/v1/models``), once known."""
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    discovered: bool = False
    backoff: float = 0.0
    next_check: float = 0.0

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def free(self) -> int:
        return self.limit - self.active

    @property
    def usable(self) -> bool:
        return self.healthy and self.incompatible is None


@dataclass(eq=False)
class Pool:
    """The upstreams of one backend (see the module docstring)."""

    upstreams: list[Upstream]
    max_queue: int = 0
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = random.random
    health_interval: float = HEALTH_INTERVAL_SECONDS
    backoff_base: float = BACKOFF_BASE_SECONDS
    backoff_cap: float = BACKOFF_CAP_SECONDS
    _turn: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _passed: asyncio.Event = field(default_factory=asyncio.Event)

    # -- dispatch ----------------------------------------------------------------------------------

    def pick(self, exclude: set[Upstream] | frozenset[Upstream] = frozenset()) -> Upstream | None:
        """The usable upstream with the most free capacity, or None (see :meth:`busy`)."""
        count = len(self.upstreams)
        order = [self.upstreams[(self._turn + i) % count] for i in range(count)] if count else []
        candidates = [u for u in order if u.usable and u not in exclude]
        if not candidates:
            return None
        best = max(candidates, key=lambda u: u.free)  # the first of equals: the turn rotates ties
        if best.free <= 0 and self.queued() >= self.max_queue:
            return None
        self._turn = (self._turn + 1) % count
        return best

    def busy(self, exclude: set[Upstream] | frozenset[Upstream] = frozenset()) -> bool:
        """Whether :meth:`pick` found nothing because every usable upstream is full."""
        return any(u.usable and u not in exclude for u in self.upstreams)

    def acquire(self, upstream: Upstream) -> None:
        upstream.active += 1
        upstream.requests += 1

    def release(self, upstream: Upstream) -> None:
        upstream.active = max(0, upstream.active - 1)

    def queued(self) -> int:
        """Calls beyond the upstreams' limits (waiting in their queues)."""
        return sum(max(0, u.active - u.limit) for u in self.upstreams)

    def load_info(self) -> dict[str, int]:
        usable = [u for u in self.upstreams if u.usable]
        return {"active": sum(min(u.active, u.limit) for u in self.upstreams), "queued": self.queued(),
                "max_concurrent": sum(u.limit for u in usable), "max_queue": self.max_queue if usable else 0}

    def status(self) -> list[UpstreamStatus]:
        return [UpstreamStatus(url=str(u.spec), dialect=u.dialect.name, healthy=u.usable, active=u.active,
                               limit=u.limit, requests=u.requests, failures=u.failures) for u in self.upstreams]

    # -- health ------------------------------------------------------------------------------------

    def failed(self, upstream: Upstream, reason: str) -> None:
        """A call or a check failed: the upstream is down until a check passes."""
        upstream.failures += 1
        upstream.last_error = reason
        if upstream.healthy:
            logger.warning("upstream %s is down: %s", upstream.spec, reason)
        upstream.healthy = False
        upstream.backoff = min(self.backoff_cap, max(self.backoff_base, upstream.backoff * 2))
        # Full jitter on the upper half, so many nodes do not re-check in step.
        upstream.next_check = self.clock() + upstream.backoff * (0.5 + self.jitter() / 2)
        self._wake.set()

    async def wait_healthy(self, timeout: float) -> None:
        """Wait (bounded) until a health check or a call next succeeds."""
        self._passed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._passed.wait()
        except TimeoutError:
            pass  # the caller looks again and gives up past its own deadline

    def succeeded(self, upstream: Upstream, *, announce: bool = True) -> None:
        if announce:
            self._passed.set()
        if not upstream.healthy:
            logger.info("upstream %s is healthy again", upstream.spec)
        upstream.healthy = True
        upstream.backoff = 0.0
        upstream.next_check = self.clock() + self.health_interval

    def refuse(self, upstream: Upstream, reason: str) -> None:
        """The upstream cannot serve this node (version, map): out of dispatch for good."""
        if upstream.incompatible is None:
            logger.error("upstream %s cannot serve this node: %s", upstream.spec, reason)
        upstream.incompatible = reason
        upstream.failures += 1

    async def check(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        """One health check (and, the first time it passes, discovery of the limit and model)."""
        status = await _get(session, upstream.url + upstream.dialect.health_path)
        if isinstance(status, str) or status[0] != 200:
            self.failed(upstream, status if isinstance(status, str) else f"health check answered {status[0]}")
            return
        self.succeeded(upstream, announce=False)
        if not upstream.discovered:
            upstream.discovered = True
            await self._discover(session, upstream)
        self._passed.set()  # after discovery: a waiter may need the model id

    async def _discover(self, session: aiohttp.ClientSession, upstream: Upstream) -> None:
        models = await _get(session, upstream.url + "/v1/models")
        if not isinstance(models, str) and models[0] == 200:
            upstream.model = _first_model(models[1])
        if upstream.spec.max_concurrent or upstream.dialect.discovery is None:
            return
        path, parse = upstream.dialect.discovery
        answer = await _get(session, upstream.url + path)
        limit = parse(answer[1]) if not isinstance(answer, str) and answer[0] == 200 else None
        if limit:
            logger.info("upstream %s takes %d calls at once (%s)", upstream.spec, limit, path)
            upstream.limit = limit

    async def check_all(self, session: aiohttp.ClientSession, upstreams: Sequence[Upstream] | None = None) -> None:
        await asyncio.gather(*(self.check(session, u) for u in (self.upstreams if upstreams is None else upstreams)))

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Check each upstream when it is due, forever (cancel to stop)."""
        while True:
            now = self.clock()
            due = [u for u in self.upstreams if u.incompatible is None and u.next_check <= now]
            if due:
                await self.check_all(session, due)
            pending = [u.next_check for u in self.upstreams if u.incompatible is None]
            delay = max(0.05, min(pending) - self.clock()) if pending else self.health_interval
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a call failed: its re-check may now be due sooner
            except TimeoutError:
                pass  # the next check is due


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes] | str:
    """GET with the health timeout: (status, body) or why it failed."""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS), session.get(url) as response:
            return response.status, await read_limited(response, MAX_DISCOVERY_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError, ProtocolError) as exc:  # down, reset, timed out, huge
        return f"GET {url} failed: {exc or type(exc).__name__}"


def _first_model(body: bytes) -> str | None:
    """``data[0].id`` of an OpenAI ``/v1/models`` answer."""
    try:
        data = json.loads(body)["data"]
        return str(data[0]["id"]) if data else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None

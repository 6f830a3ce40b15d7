"""RemoteBackend: the generation API over one or many remote upstreams (HTTP, aiohttp client).

A call is dispatched by the :class:`~.pool.Pool`; its response is read by an owned task that
feeds the :class:`~meshnode.generation.api.TokenStream` with overflow policy ``block`` (it awaits
room before each chunk), so a slow asker slows the upstream read and Codec frames are never
merged: each chunk from a Codec upstream carries that frame's exact bytes.

Failures: an upstream that cannot be reached, times out (connect, or between two reads), answers
5xx or sends bytes that do not parse is marked down, and the call moves to another upstream as long
as nothing was streamed yet; after the first chunk the stream ends with ``finish_reason="error"``
and the reason in ``TokenStream.error``. A 4xx is a refusal (:class:`AdmissionError`); a 426 or a
different map takes the upstream out of dispatch. Cancelling the stream closes the upstream
connection (and, for SGLang, posts ``/abort_request``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import aiohttp

from meshnode.errors import AdmissionError, ConfigError, MeshError, ModelError, ProtocolError
from meshnode.generation.api import CodecMapInfo, Prompt, SamplingParams, TokenStream, UpstreamStatus
from meshnode.generation.remote.codec import CodecDialect, fetch_map
from meshnode.generation.remote.dialects import Dialect, HttpCall, Piece
from meshnode.generation.remote.engines import LlamaCppDialect, SglangDialect, VllmDialect
from meshnode.generation.remote.pool import Pool, Upstream
from meshnode.generation.remote.tokenizer import LocalTokenizer
from meshnode.generation.remote.upstream import UpstreamError, UpstreamSpec, read_limited
from meshnode.tasks import TaskOwner
from meshnode.wire.maps import Detokenizer, parse_map

__all__ = ["DIALECTS", "RemoteBackend", "RemoteSettings"]

logger = logging.getLogger(__name__)

DIALECTS: dict[str, Callable[[], Dialect]] = {"codec": CodecDialect, "vllm": VllmDialect, "sglang": SglangDialect,
                                               "llamacpp": LlamaCppDialect}
MAP_WAIT_SECONDS = 120.0
"""How long :meth:`RemoteBackend.codec_map` (a node starting) waits for an upstream to come up."""
ABORT_TIMEOUT_SECONDS = 2.0
"""Bound on an extra abort request (SGLang ``/abort_request``) after a cancel."""
MAX_ERROR_BODY_BYTES = 64 * 1024
"""Most bytes of a refusal's body read for its message."""
_request_numbers = itertools.count(1)


@dataclass(frozen=True, kw_only=True)
class RemoteSettings:
    timeout_seconds: float = 30.0
    """Bound on connecting, and on the wait between two reads of a streaming response."""
    default_limit: int = 8
    """Calls an upstream takes at once when neither its URL nor the server says."""
    max_queue: int = 32
    """Calls sent on beyond the upstreams' limits, in all (they queue there)."""
    buffer_chunks: int = 64
    """Chunks a stream holds before the upstream read waits for the consumer."""


@dataclass(eq=False)
class _Call:
    rid: str
    prompt: Prompt
    params: SamplingParams
    tried: set[Upstream] = field(default_factory=set)
    templated: Prompt | None = None
    upstream: Upstream | None = None
    delivered: int = 0
    task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """TokenStream.on_cancel: stop reading (closes the upstream connection)."""
        task = self.task
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)


def _detokenizer(data: bytes) -> Detokenizer:
    return Detokenizer(parse_map(data))


class RemoteBackend:
    """A :class:`~meshnode.generation.api.Backend` over remote upstreams (see the module docstring).

    Use ``async with RemoteBackend(...)`` (or :meth:`open` / :meth:`close`): opening runs one round
    of health checks and discovery, fetches the map, and starts the health loop.

    Raises:
        ConfigError: No upstreams, or an upstream that serves no map and no ``tokenizer``.
    """

    def __init__(self, specs: Sequence[UpstreamSpec], *, tokenizer: LocalTokenizer | None = None,
                 settings: RemoteSettings | None = None) -> None:
        self.settings = settings or RemoteSettings()
        if not specs:
            raise ConfigError("engine.upstreams is empty")
        plain = sorted({s.dialect for s in specs if not DIALECTS[s.dialect]().serves_map})
        if plain and tokenizer is None:
            raise ConfigError(f"{'/'.join(plain)} upstreams serve no Codec map: give --tokenizer PATH (the model's "
                              "Hugging Face tokenizer folder or tokenizer.json) for the map and the text")
        upstreams = [Upstream(spec=s, dialect=DIALECTS[s.dialect](), limit=s.max_concurrent or
                              self.settings.default_limit) for s in specs]
        self.pool = Pool(upstreams, max_queue=self.settings.max_queue)
        self.tokenizer = tokenizer
        self._session: aiohttp.ClientSession | None = None
        self._tasks = TaskOwner("remote")
        self._health: asyncio.Task[None] | None = None
        self._map: CodecMapInfo | None = None
        self._map_lock = asyncio.Lock()
        self._detokenizer: Detokenizer | None = None
        self._model_id: str | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> Self:
        timeout = self.settings.timeout_seconds
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout),
            connector=aiohttp.TCPConnector(limit=0))  # the pool bounds the calls, not the connector
        await self.pool.check_all(self._session)
        models = sorted({u.model for u in self.pool.upstreams if u.model})
        if len(models) > 1:
            logger.warning("upstreams serve different models %s; advertising %s", models, self.model_id)
        try:
            await self._ensure_map(wait=0)
        except MeshError as exc:  # no upstream up yet: codec_map() waits for one, a call tries once
            logger.warning("no Codec map yet: %s", exc)
        for upstream in self.pool.upstreams:
            state = "up" if upstream.usable else f"down ({upstream.last_error})"
            logger.info("upstream %s (%s): %s, %d calls at once", upstream.spec, upstream.dialect.name, state,
                        upstream.limit)
        self._health = asyncio.get_running_loop().create_task(self.pool.run(self._session), name="remote.health")
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        await self._tasks.aclose()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the Backend protocol ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The first upstream's ``/v1/models`` id, fixed once known (before: the tokenizer's name)."""
        if self._model_id is None:
            self._model_id = next((u.model for u in self.pool.upstreams if u.model), None)
        return self._model_id or (self.tokenizer.name if self.tokenizer is not None else "remote")

    def load_info(self) -> dict[str, int]:
        return self.pool.load_info()

    def upstreams(self) -> list[UpstreamStatus]:
        return self.pool.status()

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        if self._detokenizer is None:
            return ""  # no map yet means no call streamed yet
        self._detokenizer.reset()
        return self._detokenizer.render(ids, partial=False)

    async def codec_map(self) -> CodecMapInfo:
        """The map; while no upstream is up, waits (up to :data:`MAP_WAIT_SECONDS`) for one."""
        return await self._ensure_map(wait=MAP_WAIT_SECONDS)

    async def _ensure_map(self, *, wait: float) -> CodecMapInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        told = False
        while True:
            async with self._map_lock:
                if self._map is not None:
                    return self._map
                try:
                    self._map = await self._load_map()
                    return self._map
                except MeshError as exc:
                    failure = exc
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise failure
            if not told:
                logger.info("waiting up to %.0f s for an upstream to serve: %s", remaining, failure)
                told = True
            await self.pool.wait_healthy(remaining)

    async def _load_map(self) -> CodecMapInfo:
        assert self._session is not None, "open() first"
        errors = []
        for upstream in self.pool.upstreams:
            if not upstream.dialect.serves_map or not upstream.usable:
                continue
            try:
                found = await fetch_map(self._session, upstream.url, upstream.model or self._model_id)
            except (UpstreamError, ProtocolError) as exc:
                errors.append(str(exc))
                continue
            logger.info("Codec map %s (%s) from %s", found.map_id, found.map_hash, upstream.spec)
            if self.tokenizer is None:
                self._detokenizer = await asyncio.to_thread(_detokenizer, found.data)
            return found
        if self.tokenizer is None:
            raise ModelError("no upstream served its Codec map: " + ("; ".join(errors) or "none is up"))
        if self._model_id is None and self.model_id == self.tokenizer.name and not any(
                u.usable for u in self.pool.upstreams):  # the map's family follows the model id: learn it first
            raise ModelError("no upstream is up yet to name its model")
        info = self.tokenizer.model_info(self.model_id)
        data = await asyncio.to_thread(lambda: info.map_bytes)
        built = CodecMapInfo(map_id=info.map_id, map_hash=info.map_hash, data=data)
        if errors:
            logger.warning("serving the map of --tokenizer (%s): %s", built.map_hash, "; ".join(errors))
        return built

    async def start(self, prompt: Prompt, params: SamplingParams) -> TokenStream:
        if self._closed or self._session is None:
            raise AdmissionError("the remote backend is not open", field="upstream")
        down = [u for u in self.pool.upstreams if not u.healthy and u.incompatible is None]
        if len(down) == len(self.pool.upstreams):  # all down: look now rather than wait for the backoff
            await self.pool.check_all(self._session, down)
        try:
            await self._ensure_map(wait=0)
        except MeshError as exc:
            raise AdmissionError(f"no upstream available: {exc}", field="upstream") from exc
        call = _Call(rid=f"meshnode-{uuid.uuid4().hex[:16]}", prompt=prompt, params=params)
        response, upstream = await self._open(call)
        stream = TokenStream(request_id=next(_request_numbers), prompt_tokens=len(prompt.ids or ()),
                             loop=asyncio.get_running_loop(), buffer_chunks=self.settings.buffer_chunks,
                             on_cancel=call.cancel)
        call.task = self._tasks.spawn(self._read(call, stream, response, upstream), call.rid)
        if call.task is None:  # closing meanwhile
            response.close()
            self.pool.release(upstream)
            raise AdmissionError("the remote backend is closing", field="upstream")
        return stream

    # -- one call ----------------------------------------------------------------------------------

    async def _prompt_for(self, call: _Call, dialect: Dialect) -> Prompt:
        """The prompt as this dialect takes it: messages are templated here for id-only servers."""
        if call.prompt.messages is None or dialect.chat_native:
            return call.prompt
        if call.templated is None:
            if self.tokenizer is None:
                raise AdmissionError(f"{dialect.name} upstreams need --tokenizer (with a chat template) for chat "
                                     "prompts", field="messages")
            ids = await asyncio.to_thread(self.tokenizer.encode_chat, call.prompt.messages)
            call.templated = Prompt(ids=tuple(ids))
        return call.templated

    async def _open(self, call: _Call) -> tuple[aiohttp.ClientResponse, Upstream]:
        """POST the call to the best upstream not tried yet; on failure try the next.

        Raises:
            AdmissionError: A refusal (4xx), every upstream busy, or none reachable (``field="upstream"``).
        """
        assert self._session is not None
        reasons: list[str] = []
        while True:
            upstream = self.pool.pick(call.tried)
            if upstream is None:
                if self.pool.busy(call.tried):
                    raise AdmissionError("busy: every upstream is at its limit", field="upstream")
                down = [f"{u.spec}: {u.incompatible or u.last_error or 'down'}" for u in self.pool.upstreams
                        if u not in call.tried and not u.usable]
                raise AdmissionError("no upstream available: " + "; ".join(reasons + down), field="upstream")
            call.tried.add(upstream)
            prompt = await self._prompt_for(call, upstream.dialect)
            http = upstream.dialect.request(prompt, call.params, call.rid, upstream.model)
            self.pool.acquire(upstream)
            try:
                response = await self._post(upstream, http)
            except UpstreamError as exc:
                self.pool.release(upstream)
                reasons.append(str(exc))
                continue
            except BaseException:
                self.pool.release(upstream)
                raise
            call.upstream = upstream
            return response, upstream

    async def _post(self, upstream: Upstream, http: HttpCall) -> aiohttp.ClientResponse:
        """The streaming response, checked; failures marked on the pool and raised as UpstreamError."""
        assert self._session is not None
        try:
            response = await self._session.post(upstream.url + http.path, json=http.body, headers=dict(http.headers))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # refused, reset, DNS, connect timeout
            reason = f"POST {http.path} failed: {exc or type(exc).__name__}"
            self.pool.failed(upstream, reason)
            raise UpstreamError(reason, url=upstream.url) from exc
        if response.status == 200:
            problem = self._check_headers(upstream, response)
            if problem is None:
                return response
            response.close()
            self.pool.refuse(upstream, problem)
            raise UpstreamError(problem, url=upstream.url, status=200)
        try:
            detail = (await read_limited(response, MAX_ERROR_BODY_BYTES)).decode("utf-8", "replace").strip()
        except (aiohttp.ClientError, TimeoutError, OSError, ProtocolError):  # the refusal stands without text
            detail = ""
        finally:
            response.close()
        status = response.status
        if status == 426:  # legion-mesh §2.6: the upstream wants another Codec version
            reason = f"refused Codec-Client-Version 0.4 (426): {detail[:300]}"
            self.pool.refuse(upstream, reason)
            raise UpstreamError(reason, url=upstream.url, status=status)
        if status == 429:
            raise UpstreamError(f"busy (429): {detail[:200]}", url=upstream.url, status=status)
        if status >= 500:
            reason = f"answered {status}: {detail[:200]}"
            self.pool.failed(upstream, reason)
            raise UpstreamError(reason, url=upstream.url, status=status)
        raise AdmissionError(f"the upstream refused the call ({status}): {detail[:300]}")

    def _check_headers(self, upstream: Upstream, response: aiohttp.ClientResponse) -> str | None:
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith(upstream.dialect.content_type):
            return f"answered {content_type or 'no Content-Type'}, not {upstream.dialect.content_type}"
        served = response.headers.get("Codec-Tokenizer-Map")
        if served and self._map is not None and served != self._map.map_hash:
            return f"serves map {served}, this node serves {self._map.map_hash}"
        encoding = response.headers.get("Content-Encoding", "identity")
        if encoding not in {"identity", "gzip", "deflate", "br"}:
            return f"answered Content-Encoding {encoding}, which this node does not read"
        return None

    async def _read(self, call: _Call, stream: TokenStream, response: aiohttp.ClientResponse,
                    upstream: Upstream) -> None:
        try:
            while True:
                try:
                    await self._pump(call, stream, response, upstream)
                    self.pool.succeeded(upstream)
                    return
                except (UpstreamError, ProtocolError) as exc:
                    reason = str(exc) if isinstance(exc, UpstreamError) else f"{upstream.url}: {exc}"
                    self.pool.failed(upstream, reason)
                finally:
                    response.close()
                    self.pool.release(upstream)
                if call.delivered:  # retries only before the first token
                    stream.put([], "error", error=reason)
                    return
                logger.info("call %s: %s; trying another upstream", call.rid, reason)
                try:
                    response, upstream = await self._open(call)
                except AdmissionError as exc:
                    stream.put([], "error", error=f"{reason}; {exc}")
                    return
        except asyncio.CancelledError:
            stream.put([], "cancel")
            self._abort(call)
            raise
        except Exception:  # a bug here fails this call only; the stream still ends
            logger.exception("call %s failed", call.rid)
            stream.put([], "error", error="internal error")

    async def _pump(self, call: _Call, stream: TokenStream, response: aiohttp.ClientResponse,
                    upstream: Upstream) -> None:
        encode = self.tokenizer.encode_text if self.tokenizer is not None else None
        parser = upstream.dialect.parser(encode)
        try:
            async for data in response.content.iter_any():
                for piece in parser.feed(data):
                    if await self._deliver(call, stream, piece):
                        return
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # cut, reset, or no bytes in time
            raise UpstreamError(f"the stream broke: {exc or type(exc).__name__}", url=upstream.url) from exc
        for piece in parser.close():
            if await self._deliver(call, stream, piece):
                return
        raise ProtocolError("the stream ended without a finish")

    async def _deliver(self, call: _Call, stream: TokenStream, piece: Piece) -> bool:
        """Hand one piece to the stream (waiting for room); True once the stream ended."""
        if piece.prompt_tokens is not None:
            stream.prompt_tokens = piece.prompt_tokens
        ids, frame, finish, matched = piece.ids, piece.frame, piece.finish, piece.matched_stop
        stops = call.params.stop_ids
        cut = next((i for i, token in enumerate(ids) if token in stops), None) if stops else None
        if cut is not None:  # a stop id the upstream does not know: end here (the node encodes this frame)
            ids, frame, finish, matched = ids[:cut], None, "stop", ids[cut]
        if finish == "error" and not call.delivered and not ids:
            raise UpstreamError(piece.error or "failed", url=call.upstream.url if call.upstream else "upstream")
        if not ids and frame is None and finish is None:
            return False
        await stream.wait_room()
        stream.put(ids, finish, frame=frame, matched_stop=matched, error=piece.error if finish == "error" else None)
        call.delivered += 1
        return finish is not None

    def _abort(self, call: _Call) -> None:
        upstream = call.upstream
        http = upstream.dialect.abort(call.rid) if upstream is not None else None
        if http is None or upstream is None or self._session is None:
            return
        session, url = self._session, upstream.url + http.path

        async def post() -> None:
            try:
                async with asyncio.timeout(ABORT_TIMEOUT_SECONDS), session.post(url, json=http.body) as response:
                    logger.debug("abort %s: %d", call.rid, response.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # best effort: the closed stream aborts too
                logger.debug("abort %s failed: %s", call.rid, exc)

        self._tasks.spawn(post(), f"abort-{call.rid}")

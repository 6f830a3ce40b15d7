"""The Unstable Legion services a meshnode offers on a Trystero room (legion-mesh §5).

* `cap`: advertise the model and tools on join, to each joining peer, every 30 s and on change;
  keep a roster of other peers' caps, pruned after 90 s.
* `tc`: `ping` and `engine_run` (validated; per-peer concurrency and rate limits); the result is
  sent unicast after the stream ends, with the text detokenized server-side.
* `cf`: Codec frames for a generation go **only to the asking peer**. Bare frames by default; if
  the asker first sent an envelope HELLO whose stream id equals the call id, it gets READY and then
  DATA/END envelopes (optionally zstd-compressed per stream). An END from the asker with
  `finish_reason:"cancel"` cancels that call.
* `cm`: `/ai <prompt>` chat; directed requests are always answered, broadcast ones by exactly one
  meshnode (the election rule in `elect_ai_responder`).
* The asker leaving (Trystero leave / presence 0 / connection loss) cancels its generations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from meshnode.errors import AdmissionError, FrameError, MeshError
from meshnode.wire import legion
from meshnode.wire.compression import StreamCompressor
from meshnode.wire.envelopes import DATA, END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope
from meshnode.wire.frames import CodecFrame, encode_frame

if TYPE_CHECKING:
    from meshnode.link.pacer import StreamPolicy

logger = logging.getLogger(__name__)

CAP_HEARTBEAT_SECONDS = 30.0
ROSTER_TTL_SECONDS = 90.0
HELLO_TTL_SECONDS = 60.0
MAX_PENDING_HELLOS_PER_PEER = 16
STREAM_QUEUE_CHUNKS = 1024
MAX_INFLIGHT_SENDS_PER_PEER = 8
"""Replies (tc results, READY, chat) to one peer still being sent; beyond, new ones are dropped
(the peer is not reading) so that receive loops never wait on one peer's channel."""
STRIKE_WINDOW_SECONDS = 60.0
FINAL_SEND_TIMEOUT_SECONDS = 1.0
"""Bound on telling an asker that shutdown cancelled its stream."""
MAP_CALLS_PER_MINUTE = 2
"""codec_map answers carry the whole tokenizer map (~1 MB): a cheap call, an expensive answer."""



class ActionLike(Protocol):
    async def send(self, payload: Any, target: str | list[str] | None = None) -> None: ...

    async def receive(self) -> Any: ...


class RoomLike(Protocol):
    self_id: str

    def make_action(self, name: str) -> ActionLike: ...


@dataclass
class RosterEntry:
    cap: legion.Cap
    last_seen: float


@dataclass
class CallState:
    peer_id: str
    call_id: str
    task: asyncio.Task[None] | None = None
    cancelled: bool = False


@dataclass
class PeerBudget:
    """Per-peer call rate (sliding one-minute window) and open-call count."""

    started: deque[float] = field(default_factory=deque)
    open_calls: int = 0
    hellos: dict[str, tuple[float, str]] = field(default_factory=dict)  # stream id -> (time, compression)
    strikes: deque[float] = field(default_factory=deque)  # times of invalid payloads / refused calls
    map_calls: deque[float] = field(default_factory=deque)
    inflight_sends: int = 0


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    nick: str
    model_id: str
    skills: list[str]
    authoritative: list[str]
    system_prompt: str
    answer_broadcast_ai: bool = True
    max_calls_per_peer: int = 2
    calls_per_minute: int = 30
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    default_max_tokens: int = 256
    frame_max_ids: int = 16
    frame_max_delay_seconds: float = 0.05
    max_prompt_chars: int = 64_000
    max_strikes_per_minute: int = 30
    """Invalid payloads + refused calls one peer may cause per minute before it is dropped."""
    ban_seconds: float = 60.0
    """How long a peer dropped for abuse is refused by the room."""


def elect_ai_responder(self_id: str, candidates: dict[str, legion.Cap], asker: str) -> str | None:
    """Who answers a broadcast `/ai`: among available meshnodes that advertise engine_run and are
    not the asker (this node included), the one with the lowest load ratio, ties broken by the
    smallest peer id. Load comes from each cap's `load` field, so every meshnode computes the same
    answer from the same roster."""
    ranked = []
    for peer_id, cap in candidates.items():
        if peer_id == asker or not cap.available or "engine_run" not in cap.tools or not cap.is_meshnode:
            continue
        ranked.append((cap.load_ratio, peer_id))
    return min(ranked)[1] if ranked else None


class LegionService:
    """Serves cap / cm / cf / tc for one room. Run with `await service.run()` (until cancelled)."""

    def __init__(
        self,
        room: RoomLike,
        engine: Any,
        *,
        config: ServiceConfig,
        map_id: str,
        map_hash: str,
        map_bytes: Callable[[], bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pacing: StreamPolicy | None = None,
    ) -> None:
        self.room = room
        self.pacing = pacing
        """Optional hook (meshnode.link.pacer) that admits streams and packs their ids into messages;
        None keeps the plain behaviour: FrameSender with the configured max_ids / max_delay."""
        self.engine = engine
        self.config = config
        self.map_id = map_id
        self.map_hash = map_hash
        self.map_bytes = map_bytes
        self._packed_map: str | None = None
        self.clock = clock
        self.roster: dict[str, RosterEntry] = {}
        self.calls: dict[tuple[str, str], CallState] = {}
        self.budgets: dict[str, PeerBudget] = {}
        self.available = True
        self.draining = False
        self.cancelled_calls = 0
        self.completed_calls = 0
        self.failed_calls = 0
        self.dropped_peers = 0
        self.strikes = 0
        """Abuse counters (for tests, the soak and metrics)."""
        self._cap = room.make_action("cap")
        self._chat = room.make_action("cm")
        self._frames = room.make_action("cf")
        self._tools = room.make_action("tc")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cap_changed = asyncio.Event()
        self._last_available: bool | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(), name="legion.cap-heartbeat")
                group.create_task(self._receive_loop(self._cap, self._on_cap), name="legion.cap")
                group.create_task(self._receive_loop(self._tools, self._on_tool), name="legion.tc")
                group.create_task(self._receive_loop(self._chat, self._on_chat), name="legion.cm")
                group.create_task(self._receive_loop(self._frames, self._on_frame), name="legion.cf")
        finally:
            await self._cancel_all("service stopped")

    async def drain(self, deadline_seconds: float) -> None:
        """Stop taking work; let running calls finish for up to `deadline_seconds`, then cancel."""
        self.draining = True
        self._cap_changed.set()
        running = [c.task for c in self.calls.values() if c.task is not None]
        if running:
            _, pending = await asyncio.wait(running, timeout=deadline_seconds)
            if pending:
                await self._cancel_all("shutdown deadline")

    async def _cancel_all(self, why: str) -> None:
        tasks = [c.task for c in self.calls.values() if c.task is not None and not c.task.done()]
        for call in list(self.calls.values()):
            call.cancelled = True
            if call.task is not None:
                call.task.cancel()
        if tasks:
            logger.info("cancelling %d generation(s): %s", len(tasks), why)
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- peers -----------------------------------------------------------------------------

    def peer_joined(self, peer_id: str) -> None:
        """Send our cap to the newcomer only (legion-mesh §5.3)."""
        logger.info("peer joined: %s", peer_id)
        self._spawn(self._send_cap(target=peer_id), f"legion.cap->{peer_id}")

    def peer_left(self, peer_id: str) -> None:
        """Forget the peer and cancel everything it asked for."""
        logger.info("peer left: %s", peer_id)
        self.roster.pop(peer_id, None)
        self.budgets.pop(peer_id, None)
        for (owner, call_id), call in list(self.calls.items()):
            if owner == peer_id and call.task is not None and not call.task.done():
                logger.info("cancelling call %s: asker %s left", call_id, peer_id)
                call.cancelled = True
                call.task.cancel()

    # --- cap -------------------------------------------------------------------------------

    def load(self) -> dict[str, int]:
        info = self.engine.load_info()
        return {"active": int(info.get("active", 0)), "queued": int(info.get("queued", 0)),
                "max": int(info.get("max_concurrent", 1))}

    def is_available(self) -> bool:
        if self.draining or not self.available:
            return False
        if self.pacing is not None and not self.pacing.available():
            return False
        info = self.engine.load_info()
        capacity = int(info.get("max_concurrent", 1)) + int(info.get("max_queue", 0))
        return int(info.get("active", 0)) + int(info.get("queued", 0)) < capacity

    def tools(self) -> list[dict[str, Any]]:
        return [
            legion.tool_descriptor(
                "engine_run",
                f"Generate a completion with {self.config.model_id} (meshnode; Codec frames on cf).",
                legion.ENGINE_RUN_SCHEMA,
            ),
            legion.tool_descriptor("ping", "Liveness check; echoes payload.", legion.PING_SCHEMA),
        ] + ([legion.tool_descriptor(
            "codec_map", "The Codec tokenizer map (v2 document) that detokenizes this peer's frames.",
            legion.CODEC_MAP_SCHEMA)] if self.map_bytes is not None else [])

    def build_cap(self) -> dict[str, Any]:
        return legion.build_cap(
            ts_ms=int(time.time() * 1000),
            nick=self.config.nick,
            model_id=self.config.model_id,
            available=self.is_available(),
            skills=self.config.skills,
            system_prompt_summary=self.config.system_prompt or f"meshnode serving {self.config.model_id}",
            tools=self.tools(),
            authoritative=self.config.authoritative,
            map_id=self.map_id,
            map_hash=self.map_hash,
            load=self.load(),
        )

    async def _send_cap(self, target: str | None = None) -> None:
        cap = self.build_cap()
        self._last_available = cap["available"]
        try:
            await self._cap.send(cap, target=target)
        except MeshError as exc:
            logger.warning("could not send cap: %s", exc)

    def notify_load_changed(self) -> None:
        """Re-broadcast the cap when availability flips (saturated / free again)."""
        if self.is_available() != self._last_available:
            self._cap_changed.set()

    async def _heartbeat(self) -> None:
        while True:
            await self._send_cap()
            self._prune_roster()
            try:
                async with asyncio.timeout(CAP_HEARTBEAT_SECONDS):
                    await self._cap_changed.wait()
            except TimeoutError:
                pass
            self._cap_changed.clear()

    def _prune_roster(self) -> None:
        now = self.clock()
        for peer_id, entry in list(self.roster.items()):
            if now - entry.last_seen > ROSTER_TTL_SECONDS:
                logger.info("roster: %s silent for %.0f s, pruned", peer_id, now - entry.last_seen)
                del self.roster[peer_id]

    async def _on_cap(self, peer_id: str, payload: Any) -> None:
        cap = legion.parse_cap(payload)
        if peer_id not in self.roster:
            logger.info("cap from %s: nick=%r model=%s available=%s", peer_id, cap.nick, cap.model_id, cap.available)
        self.roster[peer_id] = RosterEntry(cap=cap, last_seen=self.clock())

    # --- receive dispatch ------------------------------------------------------------------

    async def _receive_loop(self, action: ActionLike, handler: Callable[[str, Any], Any]) -> None:
        while True:
            message = await action.receive()
            try:
                await handler(message.peer_id, message.payload)
            except legion.LegionError as exc:  # remote garbage: counted against the sender (STYLE §8)
                logger.debug("dropped invalid payload from %s: %s", message.peer_id, exc)
                self._strike(message.peer_id, f"invalid payload: {exc}")
            except FrameError as exc:
                logger.debug("dropped invalid cf from %s: %s", message.peer_id, exc)
                self._strike(message.peer_id, f"invalid cf: {exc}")

    # --- abuse control -----------------------------------------------------------------------

    def _strike(self, peer_id: str, reason: str) -> bool:
        """Count one offence (invalid payload, refused call); past `max_strikes_per_minute` in a
        minute the peer is dropped by the room and banned. Returns False once it is dropped."""
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        now = self.clock()
        while budget.strikes and now - budget.strikes[0] > STRIKE_WINDOW_SECONDS:
            budget.strikes.popleft()
        budget.strikes.append(now)
        self.strikes += 1
        if len(budget.strikes) <= self.config.max_strikes_per_minute:
            return True
        drop = getattr(self.room, "drop_peer", None)
        if len(budget.strikes) == self.config.max_strikes_per_minute + 1:
            logger.warning("peer %s: %d offences within a minute (last: %s)", peer_id, len(budget.strikes), reason)
            self.dropped_peers += 1
            if drop is not None:
                drop(peer_id, f"too many offences ({reason})", self.config.ban_seconds)
            self.peer_left(peer_id)
        return False

    def _post(self, peer_id: str, action: ActionLike, payload: Any, what: str) -> None:
        """Send to one peer from a separate task, so a peer that does not read can only delay its
        own replies; at most MAX_INFLIGHT_SENDS_PER_PEER are pending per peer, further ones are
        dropped (logged)."""
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        if budget.inflight_sends >= MAX_INFLIGHT_SENDS_PER_PEER:
            logger.debug("not sending %s to %s: %d sends already pending", what, peer_id, budget.inflight_sends)
            self._strike(peer_id, "not reading its replies")
            return
        budget.inflight_sends += 1

        async def send() -> None:
            try:
                await action.send(payload, target=peer_id)
            except MeshError as exc:  # the peer went away meanwhile: nothing else to do
                logger.debug("could not send %s to %s: %s", what, peer_id, exc)
            finally:
                budget.inflight_sends -= 1

        self._spawn(send(), f"legion.{what}->{peer_id}")

    # --- tc --------------------------------------------------------------------------------

    async def _reply(self, peer_id: str, call_id: str, status: str, *, result: dict[str, Any] | None = None,
                     error: str | None = None) -> None:
        frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call_id, status=status,
                                    result=result, error=error)
        await self._tools.send(frame, target=peer_id)

    async def _answer(self, peer_id: str, call_id: str, status: str, *, result: dict[str, Any] | None = None,
                      error: str | None = None) -> None:
        """A tc result sent without blocking the tc receive loop (see `_post`). A refused call
        never streams: forget the envelope HELLO its asker may have sent for it."""
        budget = self.budgets.get(peer_id)
        if budget is not None:
            budget.hellos.pop(call_id, None)
        frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call_id, status=status,
                                    result=result, error=error)
        self._post(peer_id, self._tools, frame, "tc-result")

    async def _packed_map_text(self) -> str:
        """The exact map file bytes, zstd-compressed and base64-encoded (a ~2 MB map becomes
        ~0.5 MB of JSON string), built once off the event loop. The asker checks the sha256 of the
        decompressed bytes against map_hash."""
        if self._packed_map is None:
            assert self.map_bytes is not None
            source = self.map_bytes

            def pack() -> str:
                import base64

                import zstandard

                return base64.b64encode(zstandard.ZstdCompressor(level=9).compress(source())).decode("ascii")

            self._packed_map = await asyncio.to_thread(pack)
        return self._packed_map

    def _admit_map(self, peer_id: str) -> str | None:
        """codec_map answers are large (the whole tokenizer map): at most MAP_CALLS_PER_MINUTE."""
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        now = self.clock()
        while budget.map_calls and now - budget.map_calls[0] > 60.0:
            budget.map_calls.popleft()
        if len(budget.map_calls) >= MAP_CALLS_PER_MINUTE:
            return f"rate limit: at most {MAP_CALLS_PER_MINUTE} codec_map calls per minute"
        budget.map_calls.append(now)
        return None

    def _admit_call(self, peer_id: str) -> str | None:
        """Per-peer limits; returns a refusal reason or None."""
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        now = self.clock()
        while budget.started and now - budget.started[0] > 60.0:
            budget.started.popleft()
        if len(budget.started) >= self.config.calls_per_minute:
            return f"rate limit: at most {self.config.calls_per_minute} calls per minute"
        if budget.open_calls >= self.config.max_calls_per_peer:
            return f"busy: at most {self.config.max_calls_per_peer} concurrent calls per peer"
        budget.started.append(now)
        return None

    async def _on_tool(self, peer_id: str, payload: Any) -> None:
        frame = legion.parse_tool_frame(payload)
        if isinstance(frame, legion.ToolResult):
            return  # meshnode makes no calls of its own in serving mode
        exposed = {"engine_run", "ping"} | ({"codec_map"} if self.map_bytes is not None else set())
        if frame.tool_name not in exposed:
            if self._strike(peer_id, f"call to unexposed tool {frame.tool_name!r}"):
                await self._answer(peer_id, frame.call_id, "denied",
                                   error=f"tool not exposed by this peer: {frame.tool_name}")
            return
        refusal = self._admit_call(peer_id)
        if refusal is None and frame.tool_name == "codec_map":
            refusal = self._admit_map(peer_id)
        if refusal is not None:
            logger.info("call %s from %s refused: %s", frame.call_id, peer_id, refusal)
            if self._strike(peer_id, refusal):  # past the strike limit the peer is dropped, no reply
                await self._answer(peer_id, frame.call_id, "denied", error=refusal)
            return
        if frame.tool_name == "ping":
            if set(frame.args) - {"payload"}:
                await self._answer(peer_id, frame.call_id, "error", error="invalid args: only 'payload' is allowed")
                return
            content = {"payload": frame.args.get("payload"), "received_at_ms": int(time.time() * 1000)}
            await self._answer(peer_id, frame.call_id, "ok", result={"content": content})
            return
        if frame.tool_name == "codec_map" and self.map_bytes is not None:
            content = {"map_id": self.map_id, "map_hash": self.map_hash, "encoding": "zstd+base64",
                       "data": await self._packed_map_text()}
            await self._answer(peer_id, frame.call_id, "ok", result={"content": content})
            return
        if (peer_id, frame.call_id) in self.calls:
            if self._strike(peer_id, "duplicate callId"):
                await self._answer(peer_id, frame.call_id, "error", error="duplicate callId")
            return
        if self.draining:
            await self._answer(peer_id, frame.call_id, "error", error="busy: node is shutting down")
            return
        try:
            args = legion.parse_engine_run(frame.args, max_prompt_chars=self.config.max_prompt_chars)
        except legion.LegionError as exc:
            if self._strike(peer_id, f"invalid args: {exc}"):
                await self._answer(peer_id, frame.call_id, "error", error=f"invalid args: {exc}")
            return
        if not any(m["role"] == "system" for m in args.messages) and self.config.system_prompt:
            args.messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        if self.pacing is not None and (refusal := self.pacing.admit(peer_id, frame.call_id)) is not None:
            logger.info("call %s from %s refused: %s", frame.call_id, peer_id, refusal)
            await self._answer(peer_id, frame.call_id, "denied", error=refusal)
            self.notify_load_changed()
            return
        self._start_generation(peer_id, frame.call_id, args.messages, args.max_tokens, args.temperature,
                               args.top_p, reply_tool=True)

    # --- generation ------------------------------------------------------------------------

    def _start_generation(self, peer_id: str, call_id: str, messages: list[dict[str, str]],
                          max_tokens: int | None, temperature: float | None, top_p: float | None,
                          *, reply_tool: bool) -> None:
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        budget.open_calls += 1
        call = CallState(peer_id=peer_id, call_id=call_id)
        self.calls[(peer_id, call_id)] = call
        call.task = self._spawn(
            self._generate(call, messages, max_tokens, temperature, top_p, reply_tool=reply_tool),
            f"legion.gen[{peer_id}/{call_id}]",
        )

    async def _generate(self, call: CallState, messages: list[dict[str, str]], max_tokens: int | None,
                        temperature: float | None, top_p: float | None, *, reply_tool: bool) -> None:
        from meshnode.generation.engine import SamplingParams

        peer_id, call_id = call.peer_id, call.call_id
        budget = self.budgets.get(peer_id)
        hello = budget.hellos.pop(call_id, None) if budget else None
        sender: Any
        if self.pacing is not None:
            sender = self.pacing.open_stream(self._frames, peer_id, call_id, negotiated=hello is not None,
                                             compression=hello[1] if hello else "identity")
            max_ids, max_delay = sender.coalesce
        else:
            sender = FrameSender(self._frames, peer_id, stream_id=call_id if hello else None,
                                 compression=hello[1] if hello else "identity")
            max_ids, max_delay = self.config.frame_max_ids, self.config.frame_max_delay_seconds
        started = self.clock()
        stream = None
        status, error, finish, ids = "ok", None, None, []
        ttft_ms: int | None = None
        try:
            prompt_ids = self.engine.encode_chat(messages)
            if len(prompt_ids) > self.config.max_prompt_tokens:
                raise AdmissionError(f"prompt has {len(prompt_ids)} tokens; the limit is {self.config.max_prompt_tokens}")
            params = SamplingParams(
                temperature=0.7 if temperature is None else temperature,
                top_p=0.95 if top_p is None else top_p,
                max_tokens=min(max_tokens or self.config.default_max_tokens, self.config.max_tokens),
            )
            stream = self.engine.generate(prompt_ids, params)
            self.notify_load_changed()
            logger.info("call %s from %s: %d prompt tokens", call_id, peer_id, len(prompt_ids))
            queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_QUEUE_CHUNKS)
            pump = self._spawn(_pump(stream, queue), f"legion.pump[{call_id}]")
            try:
                async for batch, reason in _coalesce(queue, max_ids, max_delay):
                    if batch and ttft_ms is None:
                        ttft_ms = int((self.clock() - started) * 1000)
                    ids.extend(batch)
                    finish = reason
                    await sender.send(batch, reason)
            finally:
                pump.cancel()
        except asyncio.CancelledError:
            call.cancelled = True
            self.cancelled_calls += 1
            logger.info("call %s from %s cancelled after %d tokens", call_id, peer_id, len(ids))
            if self.draining:  # the shutdown deadline passed: end the stream visibly (STYLE §5.6 step 4)
                await self._tell_cancelled(sender, peer_id, call_id, reply_tool)
            raise
        except AdmissionError as exc:  # refused (prompt too long, busy, batch token budget): say why
            text = str(exc)
            status, error = "error", f"busy: {text}" if "queue" in text.lower() and not text.startswith("busy") else text
        except MeshError as exc:
            status, error = "error", f"generation failed: {exc}"
            logger.warning("call %s from %s failed: %s", call_id, peer_id, exc)
        except Exception:  # an engine bug fails this request only; the node keeps serving the others
            status, error = "error", "generation failed: internal error"
            logger.exception("call %s from %s failed", call_id, peer_id)
        finally:
            if stream is not None:
                stream.cancel()
            if budget is not None:
                budget.open_calls = max(0, budget.open_calls - 1)
            if self.pacing is not None:
                self.pacing.release(peer_id, call_id)
            self.calls.pop((peer_id, call_id), None)
            self.notify_load_changed()
        elapsed = max(1e-6, self.clock() - started)
        if finish == "error" and status == "ok":  # the engine failed mid-stream (terminal error frame sent)
            status, error = "error", "generation failed"
        if status == "error":
            self.failed_calls += 1
        if finish == "cancel":
            self.cancelled_calls += 1
            logger.info("call %s from %s cancelled by the asker after %d tokens", call_id, peer_id, len(ids))
        else:
            self.completed_calls += 1
            logger.info("call %s from %s: %d tokens in %.2f s (%.1f tok/s), finish=%s",
                        call_id, peer_id, len(ids), elapsed, len(ids) / elapsed, finish)
        if status == "error" and sender.frames_sent == 0:
            await sender.send([], "error")
        if reply_tool:
            if status == "ok":
                text = self.engine.decode(ids)
                content = {"text": text, "finish_reason": finish or "stop", "tokens": len(ids), "ttft_ms": ttft_ms}
                if self.pacing is not None:
                    content = self.pacing.result_content(peer_id, call_id, content)
                await self._reply(peer_id, call_id, "ok", result={"content": content})
            else:
                await self._reply(peer_id, call_id, "error", error=error)

    async def _tell_cancelled(self, sender: Any, peer_id: str, call_id: str, reply_tool: bool) -> None:
        """Best effort, bounded: a terminal frame (finish_reason "cancel") and an error result."""
        try:
            async with asyncio.timeout(FINAL_SEND_TIMEOUT_SECONDS):
                await sender.send([], "cancel")
                if reply_tool:
                    await self._reply(peer_id, call_id, "error", error="cancelled: the node is shutting down")
        except (MeshError, TimeoutError) as exc:  # the asker is gone or slow: the leave tells it
            logger.debug("could not tell %s that call %s was cancelled: %s", peer_id, call_id, exc)

    # --- cf (envelopes from askers) ----------------------------------------------------------

    async def _on_frame(self, peer_id: str, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            raise FrameError("cf payload must be binary")
        decoded = decode_cf_payload(bytes(payload))
        if not isinstance(decoded, Envelope):
            return  # bare frames from other responders are not for us
        if len(decoded.stream_id) > legion.MAX_CALL_ID_CHARS:  # stream ids are call ids (legion-mesh §6 item 2)
            raise FrameError(f"stream id longer than {legion.MAX_CALL_ID_CHARS} characters")
        budget = self.budgets.setdefault(peer_id, PeerBudget())
        if decoded.kind == HELLO:
            now = self.clock()
            for sid, (when, _) in list(budget.hellos.items()):
                if now - when > HELLO_TTL_SECONDS:
                    del budget.hellos[sid]
            if len(budget.hellos) >= MAX_PENDING_HELLOS_PER_PEER:
                raise FrameError("too many pending HELLOs")
            body = decoded.body if isinstance(decoded.body, dict) else {}
            accepted = body.get("accept_compression") or ["identity"]
            compression = "zstd" if isinstance(accepted, list) and "zstd" in accepted else "identity"
            budget.hellos[decoded.stream_id] = (now, compression)
            ready_body = {"codec_version": 1, "compression": compression, "map_id": self.map_id,
                          "map_hash": self.map_hash, "safety_policy_id": None, "safety_policy_hash": None}
            if self.pacing is not None:
                ready_body.update(self.pacing.on_hello(peer_id, decoded.stream_id, body, compression))
            ready = Envelope(kind=READY, stream_id=decoded.stream_id, seq=1, body=ready_body)
            self._post(peer_id, self._frames, encode_envelope(ready), "ready")
        elif decoded.kind == END:
            call = self.calls.get((peer_id, decoded.stream_id))
            if call is not None and call.task is not None and not call.task.done():
                logger.info("call %s cancelled by END from %s", decoded.stream_id, peer_id)
                call.cancelled = True
                call.task.cancel()

    # --- cm (/ai) ----------------------------------------------------------------------------

    async def _on_chat(self, peer_id: str, payload: Any) -> None:
        message = legion.parse_chat(payload)
        if message.body_kind != "text" or not message.text or not message.text.startswith("/ai "):
            return
        if message.to and message.to != self.room.self_id:
            return
        if not message.to:
            if not self.config.answer_broadcast_ai:
                return
            sender = self.roster.get(peer_id)
            if sender is not None and sender.cap.available and "engine_run" in sender.cap.tools:
                return  # the asker runs it itself (legion-mesh §5.7 rule 5)
            candidates = {pid: e.cap for pid, e in self.roster.items()}
            me = legion.parse_cap(self.build_cap())
            candidates[self.room.self_id] = me
            chosen = elect_ai_responder(self.room.self_id, candidates, peer_id)
            if chosen != self.room.self_id:
                logger.debug("/ai from %s left to %s", peer_id, chosen)
                return
        prompt = message.text[4:].strip()
        if prompt.startswith("@"):
            prompt = prompt.split(" ", 1)[1].strip() if " " in prompt else ""
        if not prompt:
            return
        refusal = self._admit_call(peer_id)
        if refusal is not None and not self._strike(peer_id, refusal):
            return
        if refusal is not None or self.draining:
            await self._say(peer_id, f"[/ai meshnode error] {refusal or 'shutting down'}")
            return
        messages = [{"role": "user", "content": prompt}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        call_id = f"ai-{int(time.time() * 1000):x}-{len(self.calls)}"
        if self.pacing is not None and (refusal := self.pacing.admit(peer_id, call_id)) is not None:
            await self._say(peer_id, f"[/ai meshnode error] {refusal}")
            return
        self._start_generation(peer_id, call_id, messages, None, None, None, reply_tool=False)

    async def _say(self, peer_id: str, text: str) -> None:
        chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=self.room.self_id, to=peer_id, text=text)
        self._post(peer_id, self._chat, chat, "chat")


class FrameSender:
    """Sends one call's frames to one peer: bare Codec frames, or DATA/END envelopes."""

    def __init__(self, action: ActionLike, peer_id: str, *, stream_id: str | None, compression: str) -> None:
        self.action = action
        self.peer_id = peer_id
        self.stream_id = stream_id
        self.seq = 2
        self.frames_sent = 0
        self.tokens = 0
        self._compressor = StreamCompressor() if compression == "zstd" else None

    async def send(self, ids: list[int], finish_reason: str | None) -> None:
        done = finish_reason is not None
        frame = encode_frame(CodecFrame(ids=list(ids), done=done, finish_reason=finish_reason))
        self.tokens += len(ids)
        if self.stream_id is None:
            await self.action.send(frame, target=self.peer_id)
        else:
            body = self._compressor.compress(frame) if self._compressor else frame
            envelope = Envelope(kind=DATA, stream_id=self.stream_id, seq=self.seq, body=body)
            self.seq += 1
            await self.action.send(encode_envelope(envelope), target=self.peer_id)
            if done:
                end = Envelope(kind=END, stream_id=self.stream_id, seq=self.seq, body={
                    "codec_version": 1, "finish_reason": finish_reason, "total_tokens": self.tokens})
                await self.action.send(encode_envelope(end), target=self.peer_id)
        self.frames_sent += 1


@dataclass(frozen=True)
class _Chunk:
    ids: list[int]
    finish_reason: str | None


async def _pump(stream: Any, queue: asyncio.Queue[Any]) -> None:
    """Move engine chunks into a queue so the sender can wait on it with timeouts. An engine
    failure becomes a terminal "error" chunk, so the sender always sees an end."""
    try:
        async for chunk in stream:
            await queue.put(chunk)
            if chunk.finish_reason is not None:
                return
        await queue.put(_Chunk(ids=[], finish_reason="stop"))
    except MeshError as exc:
        logger.warning("generation failed: %s", exc)
        await queue.put(_Chunk(ids=[], finish_reason="error"))
    except Exception:  # an engine bug: end this stream with an error frame instead of hanging it
        logger.exception("generation failed")
        await queue.put(_Chunk(ids=[], finish_reason="error"))


async def _coalesce(queue: asyncio.Queue[Any], max_ids: int, max_delay: float) -> Any:
    """Yield (ids, finish_reason) batches: the first token at once (time to first token), later
    ids gathered until `max_ids` or `max_delay` seconds, and whatever piled up while the previous
    send waited for the channel (backpressure coalesces for free)."""
    first = True
    while True:
        chunk = await queue.get()
        ids, reason = list(chunk.ids), chunk.finish_reason
        if not first and reason is None:
            deadline = asyncio.get_running_loop().time() + max_delay
            while len(ids) < max_ids and reason is None:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        chunk = await queue.get()
                except TimeoutError:
                    break
                ids.extend(chunk.ids)
                reason = chunk.finish_reason
        while reason is None and not queue.empty():
            chunk = queue.get_nowait()
            ids.extend(chunk.ids)
            reason = chunk.finish_reason
        if ids or reason is not None:
            first = False if ids else first
            yield ids, reason
        if reason is not None:
            return

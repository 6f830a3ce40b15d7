"""The Unstable Legion services a meshnode offers on a Trystero room (legion-mesh §5).

* ``cap``: advertise the model and tools on join, to each joining peer, every 30 s and whenever
  availability flips; keep a roster of other peers' caps (:mod:`.roster`), pruned after 90 s.
* Many meshnodes in one room: tabs call the *freshest available* cap (legion-mesh §8), which
  alone would send every call to whichever node spoke last. So each meshnode tells the others its
  load whenever it changes (its cap, unicast to the meshnodes that have shown they serve), and its
  cap says ``available: false`` while another such meshnode is available and less loaded: calls go
  to the least loaded nodes, and ``/ai`` elections (lowest load) agree across nodes.
* ``tc``: ``ping``, ``engine_run`` (validated; per-peer limits, :mod:`.budgets`; refused early when
  it could not finish before the asker gives up, :mod:`.deadline`) and ``codec_map``; the result
  is sent unicast after the stream ends, with the text detokenized here.
* ``cf``: Codec frames for a generation go **only to the asking peer** (:mod:`.streaming`); an
  envelope HELLO for the call id negotiates DATA/END envelopes (optionally zstd per stream), and an
  END from the asker with ``finish_reason:"cancel"`` cancels that call.
* ``cm``: ``/ai <prompt>`` chat, answered by the responder rule of the real Legion tabs (below).
* The asker leaving (Trystero leave / presence 0 / connection loss) cancels its generations.

Replies never block a receive loop and are never lost while the peer reads (:mod:`.outbox`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from meshnode.errors import FrameError, MeshError
from meshnode.generation.api import Backend, CodecMapInfo
from meshnode.legion.budgets import BudgetLimits, PeerBudgets
from meshnode.legion.calls import ToolCaller
from meshnode.legion.deadline import Deadlines, ThroughputMeter
from meshnode.legion.generation import CallState, Generations, GenerationSettings
from meshnode.legion.outbox import MAX_OPTIONAL_PENDING, Outbox, Sender
from meshnode.legion.roster import Roster, elect_ai_responder
from meshnode.link.policy import StreamPolicy
from meshnode.tasks import TaskOwner
from meshnode.wire import legion
from meshnode.wire.envelopes import END, HELLO, READY, Envelope, decode_cf_payload, encode_envelope

__all__ = ["LegionService", "ServiceConfig"]

logger = logging.getLogger(__name__)

CAP_HEARTBEAT_SECONDS = 30.0
AVAILABILITY_CHECK_SECONDS = 1.0
HELLO_TTL_SECONDS = 60.0
MAX_PENDING_HELLOS_PER_PEER = 16
PROBE_TIMEOUT_SECONDS = 10.0
"""Bound on a serving probe of another meshnode (one token)."""


class ActionLike(Sender, Protocol):
    async def receive(self) -> Any: ...


class RoomLike(Protocol):
    self_id: str

    def make_action(self, name: str) -> Any: ...

    def drop_peer(self, peer_id: str, reason: str, ban_seconds: float | None = None) -> None: ...


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
    max_tokens: int = 1024
    default_max_tokens: int = 256
    frame_max_ids: int = 16
    frame_max_delay_ms: int = 50
    max_prompt_chars: int = 64_000
    max_strikes_per_minute: int = 30
    """Invalid payloads + refused calls one peer may cause per minute before it is dropped."""
    ban_seconds: float = 60.0
    """How long a peer dropped for abuse is refused by the room."""
    call_deadline_seconds: float = 20.0
    """A call that would not finish within this is refused at once (0 = off)."""
    flip_caps_to_all: bool = True
    """When availability flips, broadcast the cap at once. False (a node on a byte budget, where
    one broadcast costs a 1.6 KB cap per tab): a refused asker gets a fresh cap right after its
    refusal, everyone else the current state with the next heartbeat."""


class LegionService:
    """Serves cap / cm / cf / tc for one room. Run with `await service.run()` (until cancelled)."""

    def __init__(self, room: RoomLike, backend: Backend, *, config: ServiceConfig, codec_map: CodecMapInfo,
                 clock: Callable[[], float] = time.monotonic, pacing: StreamPolicy | None = None) -> None:
        self.room = room
        self.backend = backend
        self.config = config
        self.codec_map = codec_map
        self.pacing = pacing
        """Optional link policy (meshnode.link) that admits streams and packs their ids into messages."""
        self.clock = clock
        self.roster = Roster(clock)
        self.budgets = PeerBudgets(BudgetLimits(calls_per_minute=config.calls_per_minute,
                                                max_calls_per_peer=config.max_calls_per_peer,
                                                max_strikes_per_minute=config.max_strikes_per_minute), clock)
        self.meter = ThroughputMeter(clock)
        self.deadlines = Deadlines(self.meter, deadline_seconds=config.call_deadline_seconds)
        self.draining = False
        self.dropped_peers = 0
        self.strikes = 0
        """Abuse counters (for tests, the soak and metrics)."""
        self.ai_messages = 0
        self.ai_answered = 0
        """``/ai`` chat messages seen, and those this node took (answered, or refused with a chat line);
        the rest were another node's to answer, or nobody's."""
        # With a link policy, every message goes through its shaping (the uplink's ceiling).
        self._connected: set[str] = set()
        peers = lambda: sorted(self._connected)  # noqa: E731 - whom a shaped broadcast reaches
        def shape(action: Any, priority: int) -> Any:
            return action if pacing is None else pacing.shape(action, peers, priority=priority)

        # When the uplink is full: the streams' frames first, then results and refusals, caps last.
        self._frames = shape(room.make_action("cf"), 0)
        self._tools = shape(room.make_action("tc"), 1)
        self._cap = shape(room.make_action("cap"), 2)
        self._chat_action = shape(room.make_action("cm"), 2)
        self._tasks = TaskOwner("legion")
        self.outbox = Outbox(self._tasks)
        self.caller = ToolCaller(self._tools)
        self.hellos: dict[str, dict[str, tuple[float, str]]] = {}
        """Per peer: stream id -> (when, compression) of HELLOs waiting for their call."""
        self.generations = Generations(
            backend, GenerationSettings(max_tokens=config.max_tokens, frame_max_ids=config.frame_max_ids,
                                        frame_max_delay_seconds=config.frame_max_delay_ms / 1000,
                                        deadline_seconds=config.call_deadline_seconds),
            frames=self._frames, tools=self._tools, meter=self.meter, pacing=pacing, clock=clock,
            on_change=self.notify_load_changed, on_closed=self.budgets.closed)
        self._cap_changed = asyncio.Event()
        self._load_changed = asyncio.Event()
        self._last_available: bool | None = None
        self._packed_map: str | None = None

    @property
    def calls(self) -> dict[tuple[str, str], CallState]:
        return self.generations.calls

    @property
    def completed_calls(self) -> int:
        return self.generations.completed_calls

    @property
    def cancelled_calls(self) -> int:
        return self.generations.cancelled_calls

    @property
    def failed_calls(self) -> int:
        return self.generations.failed_calls

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat(), name="legion.cap-heartbeat")
                group.create_task(self._sync_siblings(), name="legion.cap-siblings")
                group.create_task(self._receive_loop(self._cap, self._on_cap), name="legion.cap")
                group.create_task(self._receive_loop(self._tools, self._on_tool), name="legion.tc")
                group.create_task(self._receive_loop(self._chat_action, self._on_chat), name="legion.cm")
                group.create_task(self._receive_loop(self._frames, self._on_frame), name="legion.cf")
        finally:
            await self.generations.cancel_all("service stopped")
            await self._tasks.aclose()

    async def drain(self, deadline_seconds: float) -> None:
        """Stop taking work; let running calls finish for up to `deadline_seconds`, then cancel."""
        self.draining = True
        self.generations.draining = True
        self._cap_changed.set()
        if not await self.generations.wait_idle(deadline_seconds):
            await self.generations.cancel_all("shutdown deadline")

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    # --- peers -----------------------------------------------------------------------------

    def peer_joined(self, peer_id: str) -> None:
        """Send our cap to the newcomer only (legion-mesh §5.3)."""
        logger.info("peer joined: %s", peer_id)
        self._connected.add(peer_id)
        if self.pacing is not None:
            self.pacing.connections_changed(len(self._connected))
        self._tasks.spawn(self._send_cap(target=peer_id), f"cap->{peer_id[:8]}")

    def peer_left(self, peer_id: str) -> None:
        """Cancel everything the peer asked for; its budget stays (see :mod:`.budgets`)."""
        logger.info("peer left: %s", peer_id)
        self._connected.discard(peer_id)
        if self.pacing is not None:
            self.pacing.connections_changed(len(self._connected))
        self.roster.remove(peer_id)
        self.hellos.pop(peer_id, None)
        self.outbox.forget(peer_id)
        self.generations.cancel_peer(peer_id, "asker left")
        self.check_availability()  # a lighter meshnode may have left

    # --- cap -------------------------------------------------------------------------------

    def load(self) -> dict[str, int]:
        info = self.backend.load_info()
        return {"active": int(info.get("active", 0)), "queued": int(info.get("queued", 0)),
                "max": int(info.get("max_concurrent", 1))}

    def slots(self) -> int:
        """Streams the backend decodes at once."""
        return self.generations.slots()

    def load_ratio(self) -> float:
        """(active + queued) / max, as :attr:`~meshnode.wire.legion.Cap.load_ratio` reads it from a cap."""
        load = self.load()
        return (load["active"] + load["queued"]) / max(1, load["max"])

    def yields_to(self) -> str | None:
        """Another meshnode that has shown it serves, is available and, by its latest cap, is less
        loaded than this one: while there is one, this node's cap says unavailable.

        Caps are a little stale (a node may have taken a call since its cap left), so towards a
        node with a larger peer id this node steps back only when it is lighter by more than one
        call: nodes that each took a call unseen then never all yield to one another (the yields
        by less than a call point towards smaller ids and cannot go round in a circle), so the
        room is not left without an available node while their caps cross."""
        me, mine = self.room.self_id, self.load_ratio()
        lighter = []
        for peer_id, cap in self.roster.candidates().items():
            margin = 0.0 if peer_id < me else 1 / max(1, (cap.load or {}).get("max", 1))
            if cap.available and cap.load_ratio + margin < mine:
                lighter.append((cap.load_ratio, peer_id))
        return min(lighter)[1] if lighter else None

    def is_available(self) -> bool:
        """Has capacity, and no less loaded meshnode is available in the room (see the module docstring)."""
        return self.has_capacity() and self.yields_to() is None

    def has_capacity(self) -> bool:
        """Willing to take a call now: not draining, the link and the deadline allow it, a slot or
        queue place is free."""
        if self.draining:
            return False
        if self.pacing is not None and not self.pacing.available():
            return False
        if self.deadlines.would_refuse_default(self.generations.remaining(), self.slots()):
            return False
        info = self.backend.load_info()
        capacity = int(info.get("max_concurrent", 1)) + int(info.get("max_queue", 0))
        return int(info.get("active", 0)) + int(info.get("queued", 0)) < capacity

    def tools(self) -> list[dict[str, Any]]:
        return [
            legion.tool_descriptor("engine_run", f"Generate a completion with {self.config.model_id} "
                                   "(meshnode; Codec frames on cf).", legion.ENGINE_RUN_SCHEMA),
            legion.tool_descriptor("ping", "Liveness check; echoes payload.", legion.PING_SCHEMA),
            legion.tool_descriptor("codec_map", "The Codec tokenizer map (v2 document) that detokenizes this "
                                   "peer's frames.", legion.CODEC_MAP_SCHEMA),
        ]

    def build_cap(self) -> dict[str, Any]:
        return legion.build_cap(
            ts_ms=int(time.time() * 1000), nick=self.config.nick, model_id=self.config.model_id,
            available=self.is_available(), skills=self.config.skills,
            system_prompt_summary=self.config.system_prompt or f"meshnode serving {self.config.model_id}",
            tools=self.tools(), authoritative=self.config.authoritative, map_id=self.codec_map.map_id,
            map_hash=self.codec_map.map_hash, load=self.load())

    async def _send_cap(self, target: str | None = None) -> None:
        cap = self.build_cap()
        if target is None:
            self._last_available = cap["available"]
        try:
            await self._cap.send(cap, target=target)
        except MeshError as exc:
            logger.warning("could not send cap: %s", exc)

    def notify_load_changed(self) -> None:
        """This node's load moved: tell the other meshnodes, and re-broadcast the cap if availability flipped."""
        self._load_changed.set()
        self.check_availability()

    def check_availability(self) -> None:
        """Re-broadcast the cap when availability flips (saturated, free again, a lighter node came or went)."""
        if self.config.flip_caps_to_all and self.is_available() != self._last_available:
            self._cap_changed.set()

    async def _sync_siblings(self) -> None:
        """The cap, unicast to every meshnode that has shown it serves, after each change of this
        node's load (bursts coalesce into one round): their yielding and /ai elections read it."""
        while True:
            await self._load_changed.wait()
            self._load_changed.clear()
            for peer_id in sorted(self.roster.candidates()):
                await self._send_cap(target=peer_id)

    async def _heartbeat(self) -> None:
        """The cap every CAP_HEARTBEAT_SECONDS (the real roster drops a peer after 90 s without
        one), and at once when availability flips: re-checked every AVAILABILITY_CHECK_SECONDS
        while calls run, since the measured speed, not only calls starting or ending, moves it."""
        while True:
            await self._send_cap()
            self.roster.prune()
            self.budgets.prune()
            deadline = asyncio.get_running_loop().time() + CAP_HEARTBEAT_SECONDS
            while not self._cap_changed.is_set():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                wait = min(remaining, AVAILABILITY_CHECK_SECONDS) if self.calls else remaining
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._cap_changed.wait()
                self.check_availability()
            self._cap_changed.clear()

    async def _on_cap(self, peer_id: str, payload: Any) -> None:
        entry = self.roster.update(peer_id, legion.parse_cap(payload))
        if self.roster.needs_probe(entry):
            entry.probing = True
            self._tasks.spawn(self._probe(peer_id), f"probe->{peer_id[:8]}")
        elif self.roster.verified(entry):
            self.check_availability()  # a sibling's load moved: this node may yield to it, or stop yielding

    async def _probe(self, peer_id: str) -> None:
        """Ask a meshnode-looking peer for one token: only peers that serve may win the /ai election."""
        ok = False
        try:
            result = await self.caller.call(peer_id, "engine_run", {"user": "ping", "max_tokens": 1, "temperature": 0},
                                            timeout=PROBE_TIMEOUT_SECONDS)
            content = (result.result or {}).get("content") if result.status == "ok" else None
            ok = isinstance(content, dict) and isinstance(content.get("tokens"), int) and content["tokens"] >= 1
        except (TimeoutError, MeshError) as exc:
            logger.debug("serving probe of %s failed: %s", peer_id, exc)
        entry = self.roster.get(peer_id)
        if entry is None:
            return
        entry.probing = False
        if ok:
            entry.verified_at = self.clock()
            logger.info("peer %s (%r) serves engine_run: eligible for /ai", peer_id, entry.cap.nick)
            self._load_changed.set()  # it learns this node's load, and this node may yield to it
            self.check_availability()
        else:
            entry.probe_failed_at = self.clock()
            logger.info("peer %s (%r) claims to be a meshnode but did not serve a probe: not eligible for /ai",
                        peer_id, entry.cap.nick)

    # --- receive dispatch and abuse control -------------------------------------------------

    async def _receive_loop(self, action: ActionLike, handler: Callable[[str, Any], Any]) -> None:
        while True:
            message = await action.receive()
            try:
                await handler(message.peer_id, message.payload)
            except legion.LegionError as exc:  # remote garbage: counted against the sender (STYLE §8)
                logger.debug("dropped invalid payload from %s: %s", message.peer_id, exc)
                self.strike(message.peer_id, f"invalid payload: {exc}")
            except FrameError as exc:
                logger.debug("dropped invalid cf from %s: %s", message.peer_id, exc)
                self.strike(message.peer_id, f"invalid cf: {exc}")

    def strike(self, peer_id: str, reason: str) -> bool:
        """Count one offence (invalid payload, refused call); past `max_strikes_per_minute` in a
        minute the peer is dropped by the room and banned at once. Returns False once it is over."""
        self.strikes += 1
        if self.budgets.strike(peer_id):
            return True
        if self.budgets.should_drop(peer_id, self.config.ban_seconds):
            logger.warning("peer %s: %d offences within a minute (last: %s)", peer_id,
                           self.budgets.strikes(peer_id), reason)
            self.dropped_peers += 1
            self.room.drop_peer(peer_id, f"too many offences ({reason})", self.config.ban_seconds)
            self.peer_left(peer_id)
        return False

    def refuse_new_work(self, peer_id: str) -> str | None:
        """Backpressure: a peer that is far behind reading its replies gets no new work."""
        backlog = self.outbox.backlog(peer_id)
        if backlog >= MAX_OPTIONAL_PENDING:
            return f"busy: {backlog} replies to you are still being sent; read them first"
        return None

    # --- tc --------------------------------------------------------------------------------

    def answer(self, peer_id: str, call_id: str, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None, essential: bool = False) -> None:
        """A tc result, queued on the peer's outbox. A refused call never streams: forget the
        envelope HELLO its asker may have sent for it."""
        self.hellos.get(peer_id, {}).pop(call_id, None)
        frame = legion.build_result(ts_ms=int(time.time() * 1000), call_id=call_id, status=status,
                                    result=result, error=error)
        self.outbox.post(peer_id, self._tools, frame, "tc-result", essential=essential)

    async def _packed_map_text(self) -> str:
        """The exact map file bytes, zstd-compressed and base64-encoded (a ~2 MB map becomes ~0.5 MB
        of JSON string), built once off the event loop. The asker checks the sha256 against map_hash."""
        if self._packed_map is None:
            data = self.codec_map.data
            self._packed_map = await asyncio.to_thread(
                lambda: base64.b64encode(zstandard.ZstdCompressor(level=9).compress(data)).decode("ascii"))
        return self._packed_map

    async def _on_tool(self, peer_id: str, payload: Any) -> None:
        frame = legion.parse_tool_frame(payload)
        if isinstance(frame, legion.ToolResult):
            self.caller.on_result(peer_id, frame)  # our probes; anything else is not ours
            return
        if frame.tool_name not in ("engine_run", "ping", "codec_map"):
            if self.strike(peer_id, f"call to unexposed tool {frame.tool_name!r}"):
                self.answer(peer_id, frame.call_id, "denied", error=f"tool not exposed by this peer: {frame.tool_name}")
            return
        if frame.tool_name == "engine_run":
            await self._on_engine_run(peer_id, frame)
            return
        refusal = self.refuse_new_work(peer_id) or self.budgets.admit_call(peer_id)
        if refusal is None and frame.tool_name == "codec_map":
            refusal = self.budgets.admit_map(peer_id)
        if refusal is not None:
            self._refuse(peer_id, frame.call_id, refusal)
        elif frame.tool_name == "ping":
            if set(frame.args) - {"payload"}:
                if self.strike(peer_id, "invalid ping args"):
                    self.answer(peer_id, frame.call_id, "error", error="invalid args: only 'payload' is allowed")
                return
            content = {"payload": frame.args.get("payload"), "received_at_ms": int(time.time() * 1000)}
            self.answer(peer_id, frame.call_id, "ok", result={"content": content}, essential=True)
        else:
            content = {"map_id": self.codec_map.map_id, "map_hash": self.codec_map.map_hash,
                       "encoding": "zstd+base64", "data": await self._packed_map_text()}
            self.answer(peer_id, frame.call_id, "ok", result={"content": content}, essential=True)

    def _refuse(self, peer_id: str, call_id: str, refusal: str) -> None:
        logger.info("call %s from %s refused: %s", call_id, peer_id, refusal)
        if self.strike(peer_id, refusal):  # past the strike limit the peer is dropped, no reply
            self.answer(peer_id, call_id, "denied", error=refusal)

    async def _on_engine_run(self, peer_id: str, frame: legion.ToolCall) -> None:
        if (peer_id, frame.call_id) in self.calls:
            if self.strike(peer_id, "duplicate callId"):
                self.answer(peer_id, frame.call_id, "error", error="duplicate callId")
            return
        try:  # arguments first: a malformed call is an offence, not a slot of the call budget
            args = legion.parse_engine_run(frame.args, max_prompt_chars=self.config.max_prompt_chars)
        except legion.LegionError as exc:
            if self.strike(peer_id, f"invalid args: {exc}"):
                self.answer(peer_id, frame.call_id, "error", error=f"invalid args: {exc}")
            return
        if self.draining:
            self.answer(peer_id, frame.call_id, "error", error="busy: node is shutting down")
            return
        refusal = self.refuse_new_work(peer_id) or self.budgets.admit_call(peer_id)
        if refusal is not None:
            self._refuse(peer_id, frame.call_id, refusal)
            return
        plan = self.deadlines.plan(args.max_tokens, min(self.config.default_max_tokens, self.config.max_tokens),
                                   self.generations.remaining(), self.slots())
        refusal = plan.refusal
        if refusal is None and self.pacing is not None:
            refusal = self.pacing.admit(peer_id, frame.call_id)
        if refusal is not None:  # the node is busy: not the asker's fault, no offence
            logger.info("call %s from %s refused: %s", frame.call_id, peer_id, refusal)
            self.answer(peer_id, frame.call_id, "denied", error=refusal)
            if self.config.flip_caps_to_all:
                self.notify_load_changed()
            else:  # the asker learns the state at once, the room with the next heartbeat
                self._tasks.spawn(self._send_cap(target=peer_id), f"cap->{peer_id[:8]}")
            return
        messages = args.messages
        if not any(m["role"] == "system" for m in messages) and self.config.system_prompt:
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        self.start_call(peer_id, frame.call_id, messages, plan.max_tokens, args.temperature, args.top_p,
                        reply_tool=True)

    def start_call(self, peer_id: str, call_id: str, messages: list[dict[str, str]], max_tokens: int,
                   temperature: float | None, top_p: float | None, *, reply_tool: bool) -> None:
        hello = self.hellos.get(peer_id, {}).pop(call_id, None)
        self.budgets.opened(peer_id)
        self.generations.start(peer_id, call_id, messages, max_tokens, temperature, top_p, reply_tool=reply_tool,
                               compression=hello[1] if hello else None)

    # --- cf (envelopes from askers) ----------------------------------------------------------

    async def _on_frame(self, peer_id: str, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            raise FrameError("cf payload must be binary")
        decoded = decode_cf_payload(bytes(payload))
        if not isinstance(decoded, Envelope):
            return  # bare frames from other responders (or our probes' answers) are not for us
        if len(decoded.stream_id) > legion.MAX_CALL_ID_CHARS:  # stream ids are call ids (legion-mesh §6 item 2)
            raise FrameError(f"stream id longer than {legion.MAX_CALL_ID_CHARS} characters")
        if decoded.kind == HELLO:
            self._on_hello(peer_id, decoded)
        elif decoded.kind == END:
            self.generations.cancel_call(peer_id, decoded.stream_id, "END from the asker")

    def _on_hello(self, peer_id: str, hello: Envelope) -> None:
        pending = self.hellos.setdefault(peer_id, {})
        now = self.clock()
        for sid, (when, _) in list(pending.items()):
            if now - when > HELLO_TTL_SECONDS:
                del pending[sid]
        if len(pending) >= MAX_PENDING_HELLOS_PER_PEER:
            raise FrameError("too many pending HELLOs")
        body = hello.body if isinstance(hello.body, dict) else {}
        accepted = body.get("accept_compression") or ["identity"]
        compression = "zstd" if isinstance(accepted, list) and "zstd" in accepted else "identity"
        pending[hello.stream_id] = (now, compression)
        ready_body = {"codec_version": 1, "compression": compression, "map_id": self.codec_map.map_id,
                      "map_hash": self.codec_map.map_hash, "safety_policy_id": None, "safety_policy_hash": None}
        if self.pacing is not None:
            ready_body.update(self.pacing.on_hello(peer_id, hello.stream_id, body, compression))
        ready = Envelope(kind=READY, stream_id=hello.stream_id, seq=1, body=ready_body)
        self.outbox.post(peer_id, self._frames, encode_envelope(ready), "ready", essential=True)

    # --- cm (/ai) ----------------------------------------------------------------------------

    def should_answer_ai(self, peer_id: str, message: legion.ChatMessage) -> bool:
        """The responder rule of the real Legion tabs and bridge (legion-mesh §5.7): directed to us →
        always; broadcast → not when the sender's cap says ``available: true`` (its own model answers),
        otherwise by exactly one meshnode: the one :func:`elect_ai_responder` picks among those that
        have shown they serve (so a forged cap cannot silence the room)."""
        me = self.room.self_id
        if message.to:
            return message.to == me
        if not self.config.answer_broadcast_ai:
            return False
        sender = self.roster.get(peer_id)
        if sender is not None and sender.cap.available:
            return False  # the sender's own model answers it (legion-mesh §5.7 rule 5)
        candidates = self.roster.candidates()
        candidates[me] = legion.parse_cap(self.build_cap())
        chosen = elect_ai_responder(candidates, peer_id)
        if chosen != me:
            logger.debug("/ai from %s left to %s", peer_id, chosen)
            return False
        return True

    async def _on_chat(self, peer_id: str, payload: Any) -> None:
        message = legion.parse_chat(payload)
        if message.body_kind != "text" or not message.text or not message.text.startswith("/ai "):
            return
        self.ai_messages += 1
        if not self.should_answer_ai(peer_id, message):
            return
        self.ai_answered += 1
        prompt = message.text[4:].strip()
        if prompt.startswith("@"):
            prompt = prompt.split(" ", 1)[1].strip() if " " in prompt else ""
        if not prompt:
            return
        refusal = self.refuse_new_work(peer_id) or self.budgets.admit_call(peer_id)
        if refusal is not None and not self.strike(peer_id, refusal):
            return
        if refusal is not None or self.draining:
            self.say(peer_id, f"[/ai meshnode error] {refusal or 'shutting down'}")
            return
        default = min(self.config.default_max_tokens, self.config.max_tokens)
        plan = self.deadlines.plan(None, default, self.generations.remaining(), self.slots())
        call_id = f"ai-{int(time.time() * 1000):x}-{len(self.calls)}"
        refusal = plan.refusal
        if refusal is None and self.pacing is not None:
            refusal = self.pacing.admit(peer_id, call_id)
        if refusal is not None:
            self.say(peer_id, f"[/ai meshnode error] {refusal}")
            return
        messages = [{"role": "user", "content": prompt}]
        if self.config.system_prompt:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        self.start_call(peer_id, call_id, messages, plan.max_tokens, None, None, reply_tool=False)

    def say(self, peer_id: str, text: str) -> None:
        chat = legion.build_chat(ts_ms=int(time.time() * 1000), from_id=self.room.self_id, to=peer_id, text=text)
        self.outbox.post(peer_id, self._chat_action, chat, "chat", essential=False)

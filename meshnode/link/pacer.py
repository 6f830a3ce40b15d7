"""Pacing for token streams on a byte-capped link: adaptive coalescing, multiplexing, admission.

On the mesh, framing — not the token encoding — decides the bandwidth (legion-mesh §3.3): every
data-channel message pays 103 B of Trystero framing, ~97 B of DTLS/SCTP/UDP/IP/TURN per packet,
and the receiver's SCTP acknowledges every packet (~97 B back). So the :class:`Pacer` decides
*how tokens are packed into messages* from a byte budget:

* **Adaptive coalescing.** One window ``W`` for all streams, the smallest in
  ``[min_window, max_window]`` for which the predicted bytes per second (from the number of
  streams, how they are grouped into messages, their token rate, recent stream start-ups and
  :class:`WireCosts`) stay under ``target_utilisation × budget`` (else ``headroom × budget``) and
  the message rate under ``max_messages_per_second`` (the CPU cost of aiortc's pure-Python SCTP).
  A stream's first ids wait at most ``min_window`` (time to first
  token); later ids wait at most ``W`` for company.
* **Per-stream streaming zstd** when the asker's HELLO accepts ``zstd`` (one context per stream,
  flushed per message; legion-mesh §2.7).
* **Multiplexing (meshnode extension, negotiated).** A HELLO with ``accept_mux: 1`` lets all of
  that peer's streams share one message per window. READY then carries ``mux`` (the id of the
  peer's multiplex stream) and ``mux_tag`` (this stream's small integer tag). Frames arrive as DATA
  envelopes of stream ``mux`` whose body is a msgpack array of ``[tag, bytes]`` pairs: ``bytes``
  are that stream's next Codec frame, zstd-compressed in the stream's own context when READY says
  ``compression: "zstd"``. A frame with ``done: true`` ends the stream (no END envelope). Each
  stream keeps its own compression context, so nothing is shared between streams.
* **No repeated text (meshnode extension, negotiated).** A HELLO with ``result_text: false`` says
  the tab renders the frames, so the ``engine_run`` result leaves out ``text`` (for a 500-token
  answer that is ~2.3 KB, as much as all of its frames); READY confirms with ``result_text: false``.
* **Admission control.** A new stream is admitted only if the budget still holds with it at
  ``max_window``; otherwise it is refused with a reason (``busy: link budget …``) and
  :meth:`Pacer.available` is false (the service advertises ``cap.available = false``), so goodput
  does not collapse past capacity.

Tabs that do not negotiate (no HELLO) still get plain bare Codec frames, only coalesced by the
window. :class:`LegionService` uses a pacer through the small :class:`StreamPolicy` hook; without
one its behaviour is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshnode.errors import MeshError
from meshnode.link.bucket import ByteBucket, ShapedAction
from meshnode.link.costs import PacingConfig, UnitLoad, predict
from meshnode.link.policy import ActionLike, StreamSink
from meshnode.link.stats import PacerStats
from meshnode.tasks import TaskOwner
from meshnode.wire.compression import StreamCompressor
from meshnode.wire.envelopes import Envelope, EnvelopeKind, encode_envelope, end_envelope
from meshnode.wire.frames import CodecFrame, encode_frame

logger = logging.getLogger(__name__)

MUX_FIELD = "accept_mux"
RESULT_TEXT_FIELD = "result_text"
MAX_PENDING_IDS_PER_STREAM = 4096
TERMINAL_FLUSH_TIMEOUT_SECONDS = 30.0
"""Longest a stream's last frame may wait to go out before the stream gives up."""
REPLAN_SECONDS = 0.5
RATE_SAMPLE_STREAM_SECONDS = 5.0
"""Stream-seconds of output per token-rate measurement (e.g. 10 streams for half a second)."""
RATE_SMOOTHING = 0.3
CEILING_FRACTION = 0.95


@dataclass
class _Slot:
    """One stream inside a unit."""

    stream_id: str
    tag: int
    compressor: StreamCompressor | None
    pending: list[int] = field(default_factory=list)
    pending_since: float | None = None
    finish: str | None = None
    started: bool = False
    sent_at: float = 0.0
    """When the stream's last message went out (loop time)."""
    tokens: int = 0
    """Ids sent so far (the END envelope's total_tokens)."""
    flushed: asyncio.Future[None] | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)


class _Unit:
    """A group of streams whose ids share messages: a peer's multiplexed streams, or one stream."""

    def __init__(self, pacer: Pacer, action: ActionLike, peer_id: str, key: str, *, mux: bool,
                 negotiated: bool, compressed: bool) -> None:
        self.pacer = pacer
        self.action = action
        self.peer_id = peer_id
        self.key = key
        self.mux = mux
        self.negotiated = negotiated
        self.compressed = compressed
        self.slots: dict[str, _Slot] = {}
        self.seq = 2
        self.wake = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None

    def load(self) -> UnitLoad:
        return UnitLoad(streams=len(self.slots), mux=self.mux, negotiated=self.negotiated,
                        compressed=self.compressed)

    def ensure_running(self) -> None:
        if self.task is None or self.task.done():
            self.task = self.pacer.spawn(self._run(), f"pacing.unit[{self.peer_id[:8]}/{self.key}]")

    async def _run(self) -> None:
        """Send whatever is pending once its oldest id has waited a window (or at once for a
        stream's first ids), until the unit has no streams left."""
        loop = asyncio.get_running_loop()
        while self.slots:
            await self.wake.wait()
            self.wake.clear()
            while True:
                due = self._due_at()
                if due is None:
                    break
                delay = due - loop.time()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await self.wake.wait()
                        self.wake.clear()
                        continue  # something new (maybe a first frame): re-evaluate the deadline
                    except TimeoutError:
                        pass
                await self._flush()
        self.pacer.drop_unit(self)

    def _due_at(self) -> float | None:
        due: float | None = None
        for slot in self.slots.values():
            if not slot.pending and slot.finish is None:
                continue
            if slot.pending_since is None:
                return asyncio.get_running_loop().time()  # a terminal frame without ids: now
            # A stream's first ids wait only the shortest window (time to first token), so that
            # streams starting together still share a message. Later messages go one window
            # after the previous one: a steady stream sends exactly 1/W messages a second, and
            # no id waits longer than W.
            if slot.started:
                at = max(slot.pending_since, slot.sent_at + self.pacer.window)
            else:
                at = slot.pending_since + self.pacer.config.min_window_seconds
            due = at if due is None else min(due, at)
        return due

    async def _flush(self) -> None:
        self.pacer.maybe_replan()
        ready = [s for s in self.slots.values() if s.pending or s.finish is not None]
        if not ready:
            return
        parts: list[tuple[_Slot, bytes]] = []
        # The streams whose last frame this message carries. Decided now: ids and the finish that
        # arrive while the message waits to go out belong to the next one.
        ending: list[_Slot] = []
        tokens = 0
        now = asyncio.get_running_loop().time()
        for slot in ready:
            slot.sent_at = now
            ids, slot.pending, slot.pending_since = slot.pending, [], None
            slot.room.set()
            tokens += len(ids)
            slot.tokens += len(ids)
            frame = encode_frame(CodecFrame(ids=ids, done=slot.finish is not None, finish_reason=slot.finish))
            parts.append((slot, slot.compressor.compress(frame) if slot.compressor else frame))
            slot.started = True
            if slot.finish is not None:
                ending.append(slot)
        payloads: list[bytes] = []
        if self.mux:
            body = msgpack.packb([[slot.tag, data] for slot, data in parts], use_bin_type=True)
            payloads.append(encode_envelope(Envelope(kind=EnvelopeKind.DATA, stream_id=self.key, seq=self.seq,
                                                     body=body)))
            self.seq += 1
        else:
            slot, data = parts[0]
            if self.negotiated:
                payloads.append(encode_envelope(Envelope(kind=EnvelopeKind.DATA, stream_id=slot.stream_id,
                                                         seq=self.seq, body=data)))
                self.seq += 1
                if ending:
                    payloads.append(end_envelope(slot.stream_id, self.seq, slot.finish or "stop", slot.tokens))
            else:
                payloads.append(data)
        try:
            for payload in payloads:
                await self.action.send(payload, target=self.peer_id)
                self.pacer.stats.record_message(len(payload))
            self.pacer.stats.tokens += tokens
        finally:
            for slot in ending:
                self.slots.pop(slot.stream_id, None)
                if slot.flushed is not None and not slot.flushed.done():
                    slot.flushed.set_result(None)


@dataclass
class _Negotiated:
    mux: bool
    compression: str
    when: float


@dataclass(frozen=True)
class _Shape:
    """How an admitted stream will travel (for the cost model)."""

    mux: bool
    negotiated: bool
    compressed: bool
    text: bool = True
    """Its result repeats the answer's text (unless the HELLO said ``result_text: false``)."""


class _PacedSink:
    """The :class:`StreamSink` of a paced stream: ids go into the unit's slot."""

    coalesce = (1, 0.0)  # the pacer coalesces; the service forwards engine chunks as they come

    def __init__(self, unit: _Unit, slot: _Slot) -> None:
        self._unit = unit
        self._slot = slot
        self.frames_sent = 0

    async def send(self, ids: list[int], finish_reason: str | None) -> None:
        slot = self._slot
        if slot.stream_id not in self._unit.slots:  # released already (an error frame after the end)
            if finish_reason is None:
                return
            self._unit.slots[slot.stream_id] = slot
        while len(slot.pending) >= MAX_PENDING_IDS_PER_STREAM and slot.stream_id in self._unit.slots:
            slot.room.clear()  # backpressure: the link is behind; let the engine stream coalesce
            await slot.room.wait()
        if ids:
            self._unit.pacer.note_tokens(len(ids))
            if not slot.pending:
                slot.pending_since = asyncio.get_running_loop().time()
            slot.pending.extend(ids)
        if finish_reason is not None:
            slot.finish = finish_reason
            slot.flushed = asyncio.get_running_loop().create_future()
        self._unit.wake.set()
        self._unit.ensure_running()
        self.frames_sent += 1
        if slot.flushed is not None:
            try:
                async with asyncio.timeout(TERMINAL_FLUSH_TIMEOUT_SECONDS):
                    await asyncio.shield(slot.flushed)
            except TimeoutError:
                raise MeshError(f"stream {slot.stream_id}: last frame not sent within "
                                f"{TERMINAL_FLUSH_TIMEOUT_SECONDS:.0f} s") from None


class Pacer:
    """A :class:`StreamPolicy` that paces every stream of a node against one byte budget.

    One pacer may serve several rooms (its units remember the action to send on). Call
    :meth:`close` when the node stops; it cancels the unit tasks.

    Args:
        config: budget and limits.
        clock: monotonic clock (seconds), injectable for tests.
    """

    def __init__(self, config: PacingConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.stats = PacerStats()
        self.window = config.min_window_seconds
        self._units: dict[tuple[str, str], _Unit] = {}
        self._negotiated: dict[tuple[str, str], _Negotiated] = {}
        self._reserved: dict[tuple[str, str], _Shape] = {}  # admitted and not yet released
        self._tags: dict[tuple[str, str], int] = {}
        self._no_text: set[tuple[str, str]] = set()
        self._admitted_at: deque[float] = deque(maxlen=4096)
        self._opened_at: dict[tuple[str, str], float] = {}
        self._lifetime = config.stream_seconds
        self._planned_at = 0.0
        self._full = False
        self._mux_seq: dict[str, int] = {}
        self._mux_ids: dict[str, str] = {}
        self._mux_tags: dict[str, int] = {}
        self._tasks = TaskOwner("pacing")
        self._connections = 0
        self._connected_at: deque[float] = deque(maxlen=4096)
        self._rate = config.token_rate
        self._rate_measured = False
        self._rate_tokens = 0
        self._rate_stream_seconds = 0.0
        self._rate_tick = clock()
        self._tokens_total = 0
        self._stream_seconds_total = 0.0
        self.bucket = ByteBucket(self._ceiling)
        """Every message of the node spends from it (:meth:`shape`): the hard ceiling under the plan."""

    # -- model --------------------------------------------------------------------------------------

    def _loads(self, extra: tuple[str, _Shape] | None = None) -> list[UnitLoad]:
        """Current unit loads, counting admitted streams that have not opened yet, plus `extra`."""
        units: dict[tuple[str, str], UnitLoad] = {}
        entries = list(self._reserved.items())
        if extra is not None:
            entries.append(((extra[0], "\x00new"), extra[1]))
        for (peer, sid), shape in entries:
            key = (peer, "\x00mux") if shape.mux else (peer, sid)
            load = units.setdefault(key, UnitLoad(streams=0, mux=shape.mux, negotiated=shape.negotiated,
                                                   compressed=shape.compressed))
            load.streams += 1
            load.text_streams += int(shape.text)
        return list(units.values())

    def rate(self) -> float:
        """Tokens per second per stream: measured from what the streams produce (the engine's speed
        at the current load), ``token_rate`` until enough has been seen."""
        return self._rate

    def note_tokens(self, count: int) -> None:
        self._rate_tokens += count
        self._tokens_total += count

    def _tick(self) -> None:
        """Integrate stream-seconds; every RATE_SAMPLE_STREAM_SECONDS, fold in the observed rate."""
        now = self.clock()
        stream_seconds = len(self._opened_at) * max(0.0, now - self._rate_tick)
        self._rate_stream_seconds += stream_seconds
        self._stream_seconds_total += stream_seconds
        self._rate_tick = now
        if self._rate_stream_seconds < RATE_SAMPLE_STREAM_SECONDS:
            return
        observed = max(1.0, self._rate_tokens / self._rate_stream_seconds)
        if self._rate_measured:
            observed = (1 - RATE_SMOOTHING) * self._rate + RATE_SMOOTHING * observed
        self._rate = observed
        self._rate_measured = True
        self._rate_tokens = 0
        self._rate_stream_seconds = 0.0

    def _ceiling(self) -> float:
        """Bytes/s messages may take: the budget less the connections' upkeep and a margin for what
        aiortc sends on its own (ICE checks, DTLS handshakes, retransmissions)."""
        budget = self.config.budget_bytes_per_second
        upkeep = self._connections * self.config.costs.keepalive_bytes_per_second
        return max(0.5 * budget, CEILING_FRACTION * budget - upkeep)

    def shape(self, action: ActionLike, peers: Callable[[], Sequence[str]], *, priority: int = 1) -> ActionLike:
        if self.config.budget_bytes_per_second <= 0:
            return action
        return ShapedAction(action, self.bucket, self.config.costs, peers, priority=priority)

    def connections_changed(self, count: int) -> None:
        """The node holds `count` connections: each costs upkeep, a new one its setup bytes."""
        now = self.clock()
        for _ in range(max(0, count - self._connections)):
            self._connected_at.append(now)
        self._connections = count
        self._replan()

    def _predict(self, loads: list[UnitLoad], window: float) -> tuple[float, float, float]:
        """Frames (the cost model) plus every stream's control bytes spread over its lifetime."""
        out, back, messages = predict(loads, window, self.rate(), self.config.costs, self._connections)
        streams = sum(load.streams for load in loads)
        return out + streams * self.config.stream_control_bytes / max(1.0, self._lifetime), back, messages

    def _fits(self, loads: list[UnitLoad], window: float, fraction: float, extra_bytes_per_second: float = 0.0) -> bool:
        config = self.config
        out, back, messages = self._predict(loads, window)
        limit = fraction * config.budget_bytes_per_second
        return out + extra_bytes_per_second <= limit and back <= limit and messages <= config.max_messages_per_second

    def capacity_hint(self) -> float | None:
        """How many streams of the current mix would fit at ``max_window`` (None without streams)."""
        loads = self._loads()
        streams = sum(load.streams for load in loads)
        if not streams or self.config.budget_bytes_per_second <= 0:
            return None
        out, _, messages = self._predict(loads, self.config.max_window_seconds)
        scale = min(self.config.headroom * self.config.budget_bytes_per_second / max(out, 1e-9),
                    self.config.max_messages_per_second / max(messages, 1e-9))
        return streams * scale

    def _startup_load(self) -> float:
        """Bytes per second still owed to recent stream start-ups and refusals (READY, results) and
        to recent connection set-ups."""
        horizon = self.clock() - self.config.startup_seconds
        for times in (self._admitted_at, self._connected_at):
            while times and times[0] < horizon:
                times.popleft()
        owed = (len(self._admitted_at) * self.config.stream_control_bytes
                + len(self._connected_at) * self.config.costs.connection_setup_bytes)
        return owed / self.config.startup_seconds

    def plan_window(self) -> float:
        """The smallest window in [min, max] that keeps the predicted load at the target
        utilisation (or, if even the widest window cannot, at the admission headroom)."""
        config = self.config
        lo, hi = config.min_window_seconds, config.max_window_seconds
        loads = self._loads()
        if config.budget_bytes_per_second <= 0 or not loads:
            return lo
        startup = self._startup_load()
        for fraction in (config.target_utilisation, config.headroom):
            if self._fits(loads, lo, fraction, startup):
                return lo
            if not self._fits(loads, hi, fraction, startup):
                continue
            low, high = lo, hi
            for _ in range(20):  # predicted cost falls as the window grows: bisect
                mid = (low + high) / 2
                if self._fits(loads, mid, fraction, startup):
                    high = mid
                else:
                    low = mid
            return high
        return hi

    def _replan(self) -> None:
        self._tick()
        self._planned_at = self.clock()
        self.window = self.plan_window()
        self.stats.windows.append(self.window)
        streams = len(self._reserved)
        if streams >= self.stats.peak_streams:
            self.stats.peak_streams = streams
            self.stats.capacity_hint = self.capacity_hint()

    def maybe_replan(self) -> None:
        """Re-plan at most every REPLAN_SECONDS (start-up load fades as time passes)."""
        if self.clock() - self._planned_at >= REPLAN_SECONDS:
            self._replan()

    def summary(self) -> dict[str, Any]:
        """What the pacer did and what it measured (logged when the node leaves)."""
        return {**self.stats.as_dict(), "budget_bytes_per_second": self.config.budget_bytes_per_second,
                "bucket_wait_s": round(self.bucket.waited_seconds, 2),
                "token_rate": round(self._rate, 2), "rate_measured": self._rate_measured,
                "mean_token_rate": round(self._tokens_total / max(1e-9, self._stream_seconds_total), 2),
                "connections": self._connections}

    # -- StreamPolicy -------------------------------------------------------------------------------

    def on_hello(self, peer_id: str, stream_id: str, body: Mapping[str, Any], compression: str) -> dict[str, Any]:
        mux = bool(self.config.multiplex and body.get(MUX_FIELD))
        self._negotiated[(peer_id, stream_id)] = _Negotiated(mux=mux, compression=compression, when=self.clock())
        if len(self._negotiated) > 4096:  # HELLOs that never became streams
            oldest = sorted(self._negotiated.items(), key=lambda kv: kv[1].when)[:1024]
            for key, _ in oldest:
                self._negotiated.pop(key, None)
        extra: dict[str, Any] = {}
        if body.get(RESULT_TEXT_FIELD) is False and len(self._no_text) < 4096:
            self._no_text.add((peer_id, stream_id))
            extra[RESULT_TEXT_FIELD] = False
        if mux:
            mux_id = self._mux_ids.setdefault(peer_id, f"mx-{len(self._mux_ids) + 1}")
            tag = self._mux_tags.get(peer_id, 0) + 1
            self._mux_tags[peer_id] = tag
            extra.update({"mux": mux_id, "mux_tag": tag})
            self._tags[(peer_id, stream_id)] = tag
        return extra

    def admit(self, peer_id: str, stream_id: str) -> str | None:
        shape = self._shape(peer_id, stream_id)
        config = self.config
        if config.admission and config.budget_bytes_per_second > 0:
            loads = self._loads(extra=(peer_id, shape))
            if not self._fits(loads, config.max_window_seconds, config.headroom):
                self.stats.refused += 1
                self._admitted_at.append(self.clock())  # its READY and refusal cost bytes too
                streams = len(self._reserved)
                return (f"busy: link budget {config.budget_bytes_per_second:.0f} B/s is full "
                        f"({streams} streams running); retry when cap.available is true")
        self._reserved[(peer_id, stream_id)] = shape
        self._admitted_at.append(self.clock())
        self.stats.admitted += 1
        self._replan()
        return None

    def available(self) -> bool:
        config = self.config
        if not config.admission or config.budget_bytes_per_second <= 0:
            return True
        room = 1 if not self._full else max(1, round(config.reopen_fraction * len(self._reserved)))
        loads = self._loads()  # plus `room` newcomers, each a plain tab on a peer of its own (the costly case)
        loads.extend(UnitLoad(streams=1, mux=False, negotiated=False, compressed=False, text_streams=1)
                     for _ in range(room))
        self._full = not self._fits(loads, config.max_window_seconds, config.headroom)
        return not self._full

    def _shape(self, peer_id: str, stream_id: str) -> _Shape:
        info = self._negotiated.get((peer_id, stream_id))
        if info is None:
            return _Shape(mux=False, negotiated=False, compressed=False)
        return _Shape(mux=info.mux, negotiated=True, compressed=info.compression == "zstd",
                      text=(peer_id, stream_id) not in self._no_text)

    def open_stream(self, action: ActionLike, peer_id: str, stream_id: str, *, negotiated: bool,
                    compression: str) -> StreamSink:
        if (peer_id, stream_id) not in self._reserved:  # not admitted through admit(): count it now
            self._reserved[(peer_id, stream_id)] = self._shape(peer_id, stream_id)
            self._replan()
        info = self._negotiated.pop((peer_id, stream_id), None)
        mux = bool(info and info.mux)
        zstd = compression == "zstd"
        self._tick()
        self._opened_at[(peer_id, stream_id)] = self.clock()
        if mux:
            key = self._mux_ids[peer_id]
            unit = self._units.get((peer_id, key))
            if unit is None:
                unit = self._units[(peer_id, key)] = _Unit(self, action, peer_id, key, mux=True, negotiated=True,
                                                           compressed=zstd)
                unit.seq = self._mux_seq.get(peer_id, 2)  # one multiplex stream per peer: n keeps counting
        else:
            unit = self._units[(peer_id, stream_id)] = _Unit(self, action, peer_id, stream_id, mux=False,
                                                             negotiated=negotiated, compressed=zstd)
        slot = _Slot(stream_id=stream_id, tag=self._tags.pop((peer_id, stream_id), 0),
                     compressor=StreamCompressor() if zstd else None)
        unit.slots[stream_id] = slot
        unit.ensure_running()
        return _PacedSink(unit, slot)

    def release(self, peer_id: str, stream_id: str) -> None:
        self._tick()
        opened = self._opened_at.pop((peer_id, stream_id), None)
        if opened is not None:  # learn how long streams live (spreads their control bytes)
            self._lifetime = 0.9 * self._lifetime + 0.1 * max(1.0, self.clock() - opened)
        if self._reserved.pop((peer_id, stream_id), None) is not None:
            self._replan()
        self._negotiated.pop((peer_id, stream_id), None)
        self._tags.pop((peer_id, stream_id), None)
        for unit in list(self._units.values()):
            if unit.peer_id == peer_id and stream_id in unit.slots:
                slot = unit.slots.pop(stream_id)
                if slot.flushed is not None and not slot.flushed.done():
                    slot.flushed.cancel()
                unit.wake.set()

    def result_content(self, peer_id: str, stream_id: str, content: dict[str, Any]) -> dict[str, Any]:
        if (peer_id, stream_id) in self._no_text:
            self._no_text.discard((peer_id, stream_id))
            return {key: value for key, value in content.items() if key != "text"}
        return content

    # -- tasks --------------------------------------------------------------------------------------

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any] | None:
        return self._tasks.spawn(coro, name)

    def drop_unit(self, unit: _Unit) -> None:
        if unit.mux:
            self._mux_seq[unit.peer_id] = unit.seq
        if self._units.get((unit.peer_id, unit.key)) is unit and not unit.slots:
            del self._units[(unit.peer_id, unit.key)]

    async def close(self) -> None:
        """Cancel every unit task and wait for them."""
        await self._tasks.aclose()


def decode_mux_body(body: bytes) -> list[tuple[int, bytes]]:
    """Split a multiplexed DATA body into ``(tag, frame bytes)`` pairs (still compressed if zstd).

    Raises:
        ValueError: the body is not a msgpack array of ``[int, bin]`` pairs.
    """
    try:
        items = msgpack.unpackb(body, raw=False, use_list=True, max_bin_len=1 << 20, max_array_len=1 << 16)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"bad multiplexed body: {exc}") from exc
    if not isinstance(items, list):
        raise ValueError("multiplexed body must be an array")
    out = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or not isinstance(item[1], bytes)):
            raise ValueError("multiplexed item must be [tag, bytes]")
        out.append((item[0], item[1]))
    return out

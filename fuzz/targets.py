"""Fuzz targets: every decoder that reads peer or relay input (issue 8 §1).

Each target takes arbitrary bytes and feeds them to one decoder; it may only end normally or raise
the decoder's documented error type (caught here). Anything else escaping a target is a crash. The
same targets are driven by hypothesis in CI (tests/unit/test_fuzz_props.py) and by atheris,
coverage-guided, outside CI (fuzz/run.py).

Multi-message targets split their input into messages with :func:`split`: a 2-byte big-endian
length, then that many bytes, repeated (a short tail is the last message).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

from meshnode.errors import FrameError, ProtocolError
from meshnode.wire import legion
from meshnode.wire import roomframes as rf
from meshnode.wire.compression import StreamDecompressor
from meshnode.wire.envelopes import EnvelopeReassembler, decode_cf_payload, decode_envelope
from meshnode.wire.frames import StreamDecoder
from signaling.protocol import messages
from signaling.protocol.sealing import Sealer, SealError

Target = Callable[[bytes], None]
KEY = bytes(range(32))
_SEALER = Sealer(KEY)


def split(data: bytes, limit: int = 64) -> Iterator[bytes]:
    """Up to `limit` messages from `data` (2-byte length prefixes)."""
    offset = 0
    for _ in range(limit):
        if offset >= len(data):
            return
        if offset + 2 > len(data):
            yield data[offset:]
            return
        length = int.from_bytes(data[offset : offset + 2], "big") % 20_000
        yield data[offset + 2 : offset + 2 + length]
        offset += 2 + length


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# -- Trystero data channel (trystero-wire §8) ---------------------------------------------------------


def room_frame(data: bytes) -> None:
    try:
        rf.decode_frame(data)
    except FrameError:
        pass


def action_chunks(data: bytes) -> None:
    """A stream of chunks from two peers through a small Reassembler; its limits must hold."""
    reassembler = rf.Reassembler(max_message_bytes=40_000, max_pending_messages_per_peer=4,
                                 max_pending_bytes_per_peer=80_000)
    for index, chunk in enumerate(split(data)):
        peer = "ab"[index % 2]
        reassembler.feed(peer, chunk)  # never raises: garbage is dropped and counted
        assert reassembler.pending_messages(peer) <= 4
        assert reassembler.pending_bytes <= 160_000


def payload_decode(data: bytes) -> None:
    tags = data[0] if data else 0
    try:
        rf.decode_payload(data[1:], tags)
    except rf.PayloadError:
        pass


# -- Codec frames and envelopes (legion-mesh §2, §5.5) -------------------------------------------------


def cf_payload(data: bytes) -> None:
    try:
        decode_cf_payload(data)
    except FrameError:
        pass
    try:
        decode_envelope(data)
    except FrameError:
        pass


def codec_stream(data: bytes) -> None:
    """A Codec byte stream fed in pieces (upstream HTTP bodies, DATA slices)."""
    decoder = StreamDecoder(max_buffer_size=64 * 1024, max_ids_per_frame=1024)
    for piece in split(data):
        try:
            decoder.feed(piece)
        except FrameError:
            return


def envelope_stream(data: bytes) -> None:
    """Envelopes in sequence through an EnvelopeReassembler (and zstd bodies through a decompressor)."""
    reassembler = EnvelopeReassembler(max_streams=4, max_buffer_size=64 * 1024, max_ids_per_frame=1024)
    inflate = StreamDecompressor()
    for piece in split(data):
        try:
            envelope = decode_envelope(piece)
        except FrameError:
            continue
        try:
            reassembler.feed(envelope)
        except FrameError:
            pass
        if isinstance(envelope.body, bytes):
            try:
                inflate.decompress(envelope.body)
            except FrameError:
                inflate = StreamDecompressor()


# -- Legion JSON payloads (legion-mesh §5.3-§5.6) -------------------------------------------------------


def _json(data: bytes) -> Any:
    try:
        return rf.decode_payload(data, rf.TAG_JSON)
    except rf.PayloadError:
        return None


def legion_json(data: bytes) -> None:
    value = _json(data)
    for parse in (legion.parse_cap, legion.parse_chat, legion.parse_tool_frame):
        try:
            parse(value)
        except legion.LegionError:
            pass
    if isinstance(value, dict):
        try:
            legion.parse_engine_run(value, max_prompt_chars=64_000)
        except legion.LegionError:
            pass


# -- signalling (trystero-wire §4-§6) -------------------------------------------------------------------


def signal_text(data: bytes) -> None:
    text = _text(data)
    try:
        signal = messages.parse_signal(text)
    except messages.SignalingMessageError:
        return
    if signal.sealed is not None:
        try:
            messages.parse_candidate_json(_SEALER.unseal(signal.sealed))
        except (SealError, messages.SignalingMessageError):
            pass


def sealed_blob(data: bytes) -> None:
    """``iv$base64`` texts, raw and around real ciphertexts with flipped bytes."""
    try:
        _SEALER.unseal(_text(data))
    except SealError:
        pass
    sealed = _SEALER.seal(_text(data[:200]), iv=bytes(16))
    if data:
        position = data[0] % len(sealed)
        mutated = sealed[:position] + chr(data[-1] % 128) + sealed[position + 1 :]
        try:
            _SEALER.unseal(mutated)
        except SealError:
            pass


def candidate_json(data: bytes) -> None:
    try:
        messages.parse_candidate_json(_text(data))
    except messages.SignalingMessageError:
        pass


def tracker_message(data: bytes) -> None:
    try:
        obj = json.loads(_text(data))
    except (ValueError, RecursionError):
        return
    try:
        messages.parse_tracker_message(obj)
    except messages.SignalingMessageError:
        pass


_ADAPTERS: dict[str, Any] = {}


def _adapters() -> dict[str, Any]:
    """One instance of each relay adapter (never started: only their inbound parsers are used)."""
    if not _ADAPTERS:
        from signaling.adapters.mqtt import MqttRelay
        from signaling.adapters.nostr import NostrRelay
        from signaling.adapters.torrent import TrackerClient
        from signaling.adapters.wsrelay import WsRelay

        def topic_handler(topic: str, payload: str) -> None:
            signal_text(payload.encode("utf-8", errors="replace"))

        def tracker_handler(obj: dict[str, Any]) -> None:
            try:
                messages.parse_tracker_message(obj)
            except messages.SignalingMessageError:
                pass

        ws, nostr, mqtt = WsRelay("ws://127.0.0.1:9/"), NostrRelay("ws://127.0.0.1:9/"), MqttRelay("ws://127.0.0.1:9/mqtt")
        tracker = TrackerClient("ws://127.0.0.1:9/")
        for relay in (ws, nostr, mqtt):
            relay.set_handler(topic_handler)
            relay._topics["t"] = None
        nostr._sent["s"] = ("t",)
        tracker.set_handler(tracker_handler)
        _ADAPTERS.update(ws=ws, nostr=nostr, mqtt=mqtt, tracker=tracker)
    return _ADAPTERS


class _MqttMessage:
    class _Topic:
        def __init__(self, value: str) -> None:
            self.value = value

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = self._Topic(topic)
        self.payload = payload


def relay_frames(data: bytes) -> None:
    """Inbound text frames of the ws-relay, Nostr and tracker sockets, and MQTT PUBLISH payloads."""
    adapters = _adapters()
    text = _text(data)
    adapters["ws"]._on_text(text)
    adapters["nostr"]._on_text(text)
    adapters["tracker"]._on_text(text)
    adapters["mqtt"]._on_message(_MqttMessage("t", data))
    # Wrapped the way a relay would carry a hostile payload:
    adapters["ws"]._on_text(json.dumps({"topic": "t", "payload": text}))
    event = {"id": "x", "content": text, "tags": [["x", "t"]]}
    adapters["nostr"]._on_text(json.dumps(["EVENT", "s", event]))


# -- the whole inbound path of a serving node ----------------------------------------------------------


class _Pipeline:
    """A Room bound to one fake peer, and a LegionService reading its actions (no network)."""

    def __init__(self) -> None:
        from bench.lab.fakes import TimedEngine, fake_backend
        from meshnode.generation.api import CodecMapInfo
        from meshnode.legion.service import LegionService, ServiceConfig
        from meshnode.room import Room, RoomConfig
        from meshnode.room.handshake import Binding
        from meshnode.room.mesh import AppMesh

        self.loop = asyncio.new_event_loop()
        self.peer = "p" * 20

        class FakeLink:
            peer_id = self.peer
            is_open = True

            async def send(self, data: bytes) -> None:
                return None

            async def add_candidate(self, *args: Any) -> None:
                return None

        async def build() -> tuple[Any, Any]:
            config = RoomConfig(strategy="memory", app_id="fuzz", room_id="fuzz", max_message_bytes=64_000,
                                max_pending_bytes_per_peer=128_000, max_queued_messages_per_peer=16)
            room = Room(config, relays=[])
            mesh = AppMesh(room.self_id, "fuzz")
            room._mesh = mesh
            room._state = "joined"
            mesh.rooms[room.token] = room
            link = FakeLink()
            mesh.live[self.peer] = link  # type: ignore[assignment]
            room._bindings[self.peer] = Binding(peer_id=self.peer, link=link, joined=True)  # type: ignore[arg-type]
            service = LegionService(room, fake_backend(TimedEngine(rate=1e6, tokens=3)),
                                    codec_map=CodecMapInfo(map_id="m", map_hash="sha256:0", data=b"{}"),
                                    config=ServiceConfig(nick="n", model_id="m", skills=[], authoritative=[],
                                                         system_prompt="", calls_per_minute=1_000_000,
                                                         max_strikes_per_minute=1_000_000))
            return mesh, service

        self.mesh, self.service = self.loop.run_until_complete(build())
        self.room = next(iter(self.mesh.rooms.values()))
        self.link = self.mesh.live[self.peer]
        self.handlers = {"cap": self.service._on_cap, "tc": self.service._on_tool,
                         "cm": self.service._on_chat, "cf": self.service._on_frame}

    async def feed(self, data: bytes) -> None:
        token = self.room.token
        for piece in split(data, limit=32):
            # Half the messages get a valid room-frame prefix, so chunks reach the reassembler.
            frame = rf.encode_room_frame(token, piece) if piece[:1] != b"\x02" else piece
            self.mesh._on_frame(self.link, frame)
        for name, handler in self.handlers.items():
            mailbox = self.room.make_action(name).mailbox
            while len(mailbox):
                message = await mailbox.get()
                try:
                    await handler(message.peer_id, message.payload)
                except ProtocolError:  # LegionError / FrameError: what the receive loops catch
                    pass
        await asyncio.sleep(0)
        for call in list(self.service.calls.values()):
            if call.task is not None:
                call.task.cancel()
        self.service.budgets = type(self.service.budgets)(self.service.budgets.limits, self.service.clock)


_PIPELINE: list[_Pipeline] = []


def node_inbound(data: bytes) -> None:
    """Bytes from a joined peer's data channel through the Room into the Legion service."""
    if not _PIPELINE:
        _PIPELINE.append(_Pipeline())
    pipeline = _PIPELINE[0]
    pipeline.loop.run_until_complete(pipeline.feed(data))


TARGETS: dict[str, Target] = {
    "room_frame": room_frame,
    "action_chunks": action_chunks,
    "payload_decode": payload_decode,
    "cf_payload": cf_payload,
    "codec_stream": codec_stream,
    "envelope_stream": envelope_stream,
    "legion_json": legion_json,
    "signal_text": signal_text,
    "sealed_blob": sealed_blob,
    "candidate_json": candidate_json,
    "tracker_message": tracker_message,
    "relay_frames": relay_frames,
    "node_inbound": node_inbound,
}
"""name -> target; fuzz/run.py and the property tests iterate over this."""

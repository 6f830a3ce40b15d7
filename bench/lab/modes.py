"""The wire modes the bench compares, as :class:`meshnode.link.pacer.StreamPolicy` hooks.

=================  =============================================================================
``json-sse``       baseline: one OpenAI-style ``text_completion`` chunk per token, sent as a JSON
                   Trystero action (``sse``); what a JSON-SSE API would put on the channel
``codec``          one Codec msgpack frame per token (what today's tabs get): a bare frame when a
                   peer has one stream, an identity DATA envelope when it has several (a bare frame
                   carries no stream id)
``codec-zstd``     one frame per token in DATA envelopes, one streaming zstd context per stream
``meshnode``       :class:`meshnode.link.pacer.Pacer`: adaptive coalescing window from the byte budget,
                   per-stream streaming zstd and per-peer multiplexing negotiated through
                   HELLO/READY, admission control
``meshnode-solo``  the same without multiplexing (one message per stream per window)
=================  =============================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshnode.legion.streaming import FrameSender
from meshnode.link.costs import PacingConfig
from meshnode.link.pacer import MUX_FIELD, RESULT_TEXT_FIELD, Pacer
from meshnode.link.policy import ActionLike, StreamPolicy, StreamSink

SSE_ACTION = "sse"


@dataclass(frozen=True)
class Mode:
    name: str
    hello: bool
    """The requester opens the stream with a HELLO envelope."""
    compression: tuple[str, ...] = ("identity",)
    mux: bool = False
    paced: bool = False
    description: str = ""

    def hello_body(self) -> dict[str, Any] | None:
        if not self.hello:
            return None
        body: dict[str, Any] = {"codec_version": 1, "accept_compression": list(self.compression),
                                "accept_safety_policies": [], "intent": "chat"}
        if self.mux:
            body[MUX_FIELD] = 1
        if self.paced:
            body[RESULT_TEXT_FIELD] = False  # the frames carry the text; do not repeat it in the result
        return body


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("json-sse", hello=False, description="OpenAI-style JSON text chunk per token"),
    Mode("codec", hello=False, description="one Codec msgpack frame per token"),
    Mode("codec-zstd", hello=True, compression=("zstd", "identity"),
         description="one frame per token, per-stream streaming zstd"),
    Mode("meshnode", hello=True, compression=("zstd", "identity"), mux=True, paced=True,
         description="adaptive window + per-stream zstd + per-peer multiplexing + admission"),
    Mode("meshnode-solo", hello=True, compression=("zstd", "identity"), paced=True,
         description="adaptive window + per-stream zstd + admission, one message per stream"),
)}
DEFAULT_MODES = ("json-sse", "codec", "codec-zstd", "meshnode")


def stream_hello_needed(mode: Mode, streams_per_peer: int) -> bool:
    """codec mode needs envelopes (a stream id) once a peer runs several streams."""
    return mode.hello or (mode.name == "codec" and streams_per_peer > 1)


class _PerTokenSink:
    """One Codec frame per token, through the service's own FrameSender (bare or envelope)."""

    coalesce = (1, 0.0)

    def __init__(self, sender: FrameSender) -> None:
        self._sender = sender
        self.frames_sent = 0

    async def send(self, ids: list[int], finish_reason: str | None) -> None:
        last = len(ids) - 1 if finish_reason is not None else len(ids)
        for index, token in enumerate(ids[:last]):
            del index
            await self._sender.send([token], None)
            self.frames_sent += 1
        if finish_reason is not None:  # the last token rides on the done frame (legion-mesh §2.5)
            await self._sender.send(ids[last:], finish_reason)
            self.frames_sent += 1


class _JsonSseSink:
    """One OpenAI ``text_completion`` chunk per token as a JSON action."""

    coalesce = (1, 0.0)

    def __init__(self, action: ActionLike, peer_id: str, stream_id: str, model_id: str,
                 piece: Callable[[int, int], str]) -> None:
        self._action = action
        self._peer_id = peer_id
        self._id = f"cmpl-{stream_id}"
        self._model_id = model_id
        self._piece = piece
        self._index = 0
        self.frames_sent = 0

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"id": self._id, "object": "text_completion", "created": int(time.time()), "model": self._model_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    async def send(self, ids: list[int], finish_reason: str | None) -> None:
        for position, token in enumerate(ids):
            last = finish_reason is not None and position == len(ids) - 1
            text = self._piece(self._index, token)
            self._index += 1
            await self._action.send(self._chunk(text, finish_reason if last else None), target=self._peer_id)
            self.frames_sent += 1
        if finish_reason is not None and not ids:
            await self._action.send(self._chunk("", finish_reason), target=self._peer_id)
            self.frames_sent += 1


class BaselinePolicy:
    """:class:`StreamPolicy` for the unpaced modes: admit everything, one message per token."""

    def __init__(self, mode: Mode, *, sse_action: ActionLike | None = None, model_id: str = "",
                 piece: Callable[[int, int], str] | None = None) -> None:
        self.mode = mode
        self._sse_action = sse_action
        self._model_id = model_id
        self._piece = piece or (lambda index, token: f"<{token}>")

    def admit(self, peer_id: str, stream_id: str) -> str | None:
        return None

    def available(self) -> bool:
        return True

    def on_hello(self, peer_id: str, stream_id: str, body: Mapping[str, Any], compression: str) -> dict[str, Any]:
        return {}

    def open_stream(self, action: ActionLike, peer_id: str, stream_id: str, *, negotiated: bool,
                    compression: str) -> StreamSink:
        if self.mode.name == "json-sse":
            assert self._sse_action is not None
            return _JsonSseSink(self._sse_action, peer_id, stream_id, self._model_id, self._piece)
        sender = FrameSender(action, peer_id, stream_id=stream_id if negotiated else None, compression=compression)
        return _PerTokenSink(sender)

    def release(self, peer_id: str, stream_id: str) -> None:
        return None

    def result_content(self, peer_id: str, stream_id: str, content: dict[str, Any]) -> dict[str, Any]:
        return content


def make_pacer(mode: Mode, *, budget: float, rate: float, headroom: float = 0.85,
               max_window: float = 0.4) -> Pacer:
    """The node's pacer for a paced mode."""
    return Pacer(PacingConfig(budget_bytes_per_second=budget, token_rate=rate, headroom=headroom,
                              max_window_seconds=max_window, multiplex=mode.mux))


def policy_for(mode: Mode, *, pacer: Pacer | None, sse_action: ActionLike | None, model_id: str,
               piece: Callable[[int, int], str] | None) -> StreamPolicy:
    if mode.paced:
        assert pacer is not None
        return pacer
    return BaselinePolicy(mode, sse_action=sse_action, model_id=model_id, piece=piece)

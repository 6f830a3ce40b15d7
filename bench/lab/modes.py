"""The wire modes the bench compares.

=================  =============================================================================
``json-sse``       baseline: one OpenAI-style ``text_completion`` chunk per token as a JSON
                   message; what a JSON-SSE API would put on the channel
``codec``          baseline: one Codec msgpack frame per token (what Codec-patched servers
                   stream): a bare frame when a tab has one stream, DATA envelopes when several
``codec-zstd``     baseline: one frame per token in DATA envelopes, streaming zstd per stream
``unpaced``        the node as ``meshnode join`` runs without ``[link]`` budget: frames of up to
                   ``frame_max_ids`` ids every ``frame_max_delay_ms``, plain tabs
``meshnode``       the node with its ``[link]`` uplink budget (the :class:`Pacer` that
                   ``meshnode join --uplink`` builds): adaptive window, admission; plain tabs
``meshnode-hello`` the same node; the tabs negotiate through HELLO (per-stream zstd,
                   multiplexing when a tab runs several streams, no repeated text)
``node``           a real ``meshnode join --uplink …`` process, exactly as a user runs it, in front
                   of a replaying Codec-HTTP upstream (``--engine-url``); plain tabs
=================  =============================================================================

The baselines are link policies of the bench (a node does not offer them); every other mode
runs :class:`meshnode.node.node.Node` with settings loaded by meshnode's own loader.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.legion.streaming import FrameSender
from meshnode.link.pacer import MUX_FIELD, RESULT_TEXT_FIELD
from meshnode.link.policy import ActionLike, StreamSink


@dataclass(frozen=True)
class Mode:
    name: str
    hello: bool
    """The requester opens the stream with a HELLO envelope."""
    compression: tuple[str, ...] = ("identity",)
    mux: bool = False
    paced: bool = False
    """The node runs with its [link] budget."""
    baseline: bool = False
    """A bench-only link policy replaces the node's own (json-sse, codec, codec-zstd)."""
    process: bool = False
    """The node is a real `meshnode join` process."""
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
    Mode("json-sse", hello=False, baseline=True, description="OpenAI-style JSON text chunk per token"),
    Mode("codec", hello=False, baseline=True, description="one Codec msgpack frame per token"),
    Mode("codec-zstd", hello=True, compression=("zstd", "identity"), baseline=True,
         description="one frame per token, per-stream streaming zstd"),
    Mode("unpaced", hello=False, description="meshnode join without a link budget (16 ids / 50 ms frames)"),
    Mode("meshnode", hello=False, paced=True,
         description="meshnode join --uplink: adaptive window + admission, plain tabs"),
    Mode("meshnode-hello", hello=True, compression=("zstd", "identity"), mux=True, paced=True,
         description="the same node, HELLO askers: + per-stream zstd, multiplexing, no repeated text"),
    Mode("node", hello=False, paced=True, process=True,
         description="a real `meshnode join --uplink` process in front of a Codec-HTTP upstream, plain tabs"),
)}
DEFAULT_MODES = ("json-sse", "codec", "unpaced", "meshnode", "node")


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
    """:class:`StreamPolicy` for the baselines: admit everything, one message per token."""

    def __init__(self, mode: Mode, *, model_id: str = "", piece: Callable[[int, int], str] | None = None) -> None:
        self.mode = mode
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
        if self.mode.name == "json-sse":  # JSON messages on cf: the same framing as any action
            return _JsonSseSink(action, peer_id, stream_id, self._model_id, self._piece)
        sender = FrameSender(action, peer_id, stream_id=stream_id if negotiated else None, compression=compression)
        return _PerTokenSink(sender)

    def shape(self, action: ActionLike, peers: Callable[[], Sequence[str]], *, priority: int = 1) -> ActionLike:
        return action

    def connections_changed(self, count: int) -> None:
        return None

    def release(self, peer_id: str, stream_id: str) -> None:
        return None

    def result_content(self, peer_id: str, stream_id: str, content: dict[str, Any]) -> dict[str, Any]:
        return content

    async def close(self) -> None:
        return None

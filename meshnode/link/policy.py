"""The link-policy seam: how a service hands one stream's ids to whatever packs them for the link.

:class:`~meshnode.legion.service.LegionService` asks a :class:`StreamPolicy` to admit each stream,
to note what a HELLO negotiated, for a :class:`StreamSink` per stream, and for the final result's
content. :class:`~meshnode.link.pacer.Pacer` is the policy that paces every stream through one
byte budget; without a policy the service sends plain coalesced frames.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["ActionLike", "StreamPolicy", "StreamSink"]


class ActionLike(Protocol):
    async def send(self, payload: Any, target: str | list[str] | None = None) -> None: ...


class StreamSink(Protocol):
    """Where one stream's ids go; returned by :meth:`StreamPolicy.open_stream`."""

    coalesce: tuple[int, float]
    """(max_ids, max_delay_seconds) for the service's own coalescing before :meth:`send`."""
    frames_sent: int

    async def send(self, ids: list[int], finish_reason: str | None) -> None:
        """Take the next ids; a non-None `finish_reason` ends the stream (returns once it is sent)."""
        ...


class StreamPolicy(Protocol):
    """The hook :class:`meshnode.legion.service.LegionService` calls around each stream."""

    def admit(self, peer_id: str, stream_id: str) -> str | None:
        """Reserve room for a new stream; returns a refusal reason, or None when admitted."""
        ...

    def available(self) -> bool:
        """Whether a new stream would be admitted now (drives ``cap.available``)."""
        ...

    def on_hello(self, peer_id: str, stream_id: str, body: Mapping[str, Any], compression: str) -> dict[str, Any]:
        """Note what a HELLO negotiated; returns extra READY fields."""
        ...

    def open_stream(self, action: ActionLike, peer_id: str, stream_id: str, *, negotiated: bool,
                    compression: str) -> StreamSink:
        """The sink for an admitted stream (`negotiated`: the asker sent a HELLO for it)."""
        ...

    def shape(self, action: ActionLike, peers: Callable[[], Sequence[str]], *, priority: int = 1) -> ActionLike:
        """The action the service sends on: `action` itself, or one that keeps the node within its
        uplink (every message of the service goes through it, not only the frames; `peers` lists
        whom a broadcast reaches; when the uplink is full, lower `priority` goes first)."""
        ...

    def connections_changed(self, count: int) -> None:
        """The room now holds `count` connections (each costs the link upkeep, a new one its setup)."""
        ...

    def release(self, peer_id: str, stream_id: str) -> None:
        """The stream is over (finished, failed or cancelled); idempotent."""
        ...

    def result_content(self, peer_id: str, stream_id: str, content: dict[str, Any]) -> dict[str, Any]:
        """The engine_run result content to send once the stream has ended (may drop ``text``)."""
        ...

    async def close(self) -> None:
        """Stop whatever the policy runs (the node is leaving)."""
        ...

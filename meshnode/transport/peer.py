"""PeerLink: one aiortc RTCPeerConnection and its Trystero data channel ``"data"``.

trystero-wire §7: the offerer creates the channel (``createDataChannel("data")``: ordered,
reliable, in-band negotiated); the answerer receives it. aiortc gathers every local candidate
before a description is returned (P4), so offers and answers are complete SDPs. Remote trickled
candidates are queued until a remote description exists, filtered by ufrag and parsed with
``aiortc.sdp.candidate_from_sdp`` (P5). Only ``bytes`` are ever sent (P2). ``send`` waits on
``bufferedAmount`` (Trystero's 65 535-byte threshold by default): aiortc's own unbounded send
queue is thereby bounded to the high-water mark plus one frame per concurrent sender.

The connection is considered gone (and closed) when ICE/DTLS reports ``failed``/``closed``, when
it stays ``disconnected`` for 5 s, or when the data channel closes (§7.1). ICE configuration (servers,
the process-wide aioice policy) lives in :mod:`meshnode.transport.ice`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Literal

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidStateError
from aiortc.sdp import candidate_from_sdp

from meshnode.errors import MeshError
from meshnode.transport.ice import IceServerSpec, build_ice_servers

__all__ = [
    "DATA_CHANNEL_LABEL",
    "NegotiationFailed",
    "PeerClosed",
    "PeerError",
    "PeerLink",
    "PeerTimeout",
]

logger = logging.getLogger(__name__)

DATA_CHANNEL_LABEL = "data"
BUFFERED_AMOUNT_LOW_BYTES = 65535
"""Trystero's ``bufferedAmountLowThreshold`` (§7.1)."""
DRAIN_TIMEOUT_SECONDS = 10.0
"""Trystero waits at most 10 s for ``bufferedamountlow`` (§10)."""
DISCONNECTED_GRACE_SECONDS = 5.0
"""``disconnected`` for this long closes the connection (§10)."""
CLOSE_TIMEOUT_SECONDS = 5.0
"""Bound on ``RTCPeerConnection.close()``."""
MAX_QUEUED_CANDIDATES = 64



class PeerError(MeshError):
    """A problem with one remote peer's connection.

    Attributes:
        peer_id: the remote peer, when known.
    """

    def __init__(self, message: str, *, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class NegotiationFailed(PeerError):
    """An SDP offer/answer could not be applied or produced."""


class PeerClosed(PeerError):
    """The connection is closed (or closed while waiting)."""


class PeerTimeout(PeerError):
    """A wait on the peer (drain) timed out."""


def _count_candidates(sdp: str) -> int:
    return sum(1 for line in sdp.splitlines() if line.startswith("a=candidate:"))


def _ice_ufrag(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.split(":", 1)[1].strip()
    return None


class PeerLink:
    """One WebRTC connection to one remote peer, carrying the ``"data"`` channel.

    Use :meth:`create_offer` (then :meth:`accept_answer`) or :meth:`accept_offer`, add trickled
    candidates with :meth:`add_candidate`, await :attr:`opened`, then :meth:`send` bytes. Received
    binary messages go to `on_message`; text messages are dropped (Trystero never sends text).

    Args:
        ice_servers: ICE servers (``[]`` for loopback tests); never None.
        peer_id: the remote peer id, when known (set later for torrent offers).
        on_message: called with each received ``bytes`` message (keep it fast, it runs in the
            aiortc event path).
        on_open: called once when the data channel opens.
        on_close: called once when the link has closed, whatever the cause.
        buffered_amount_low_bytes: ``bufferedAmountLowThreshold`` of the channel.
        high_water_bytes: ``send`` waits while ``bufferedAmount`` is above this.
        drain_timeout_seconds: longest wait for the buffer to drain before :class:`PeerTimeout`.
        disconnected_grace_seconds: ``disconnected`` for this long closes the link.
        ice_transport_policy: ``all`` (default) or ``relay`` (TURN candidates only).
    """

    def __init__(
        self,
        *,
        ice_servers: Sequence[IceServerSpec],
        peer_id: str | None = None,
        on_message: Callable[[bytes], None] | None = None,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        buffered_amount_low_bytes: int = BUFFERED_AMOUNT_LOW_BYTES,
        high_water_bytes: int = BUFFERED_AMOUNT_LOW_BYTES,
        drain_timeout_seconds: float = DRAIN_TIMEOUT_SECONDS,
        disconnected_grace_seconds: float = DISCONNECTED_GRACE_SECONDS,
        ice_transport_policy: Literal["all", "relay"] = "all",
    ) -> None:
        self.peer_id = peer_id
        self._on_message = on_message
        self._on_open = on_open
        self._on_close = on_close
        self._low_bytes = buffered_amount_low_bytes
        self._high_water = max(high_water_bytes, buffered_amount_low_bytes)
        self._drain_timeout = drain_timeout_seconds
        self._disconnected_grace = disconnected_grace_seconds
        self._pc = RTCPeerConnection(
            RTCConfiguration(
                iceServers=build_ice_servers(ice_servers),
                # "relay": TURN candidates only (`meshnode bench` forces traffic through coturn).
                iceTransportPolicy=RTCIceTransportPolicy(ice_transport_policy),
            )
        )
        self._channel: RTCDataChannel | None = None
        self._remote_ufrag: str | None = None
        self._has_remote = False
        self._queued_candidates: list[tuple[str, str | None, int | None, str | None]] = []
        self._writable = asyncio.Event()
        self._writable.set()
        self._disconnected_timer: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.opened = asyncio.Event()
        """Set when the data channel is open."""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved once the link is closed."""
        self.role: Literal["offerer", "answerer"] | None = None
        self._pc.on("connectionstatechange", self._on_state_change)
        self._pc.on("iceconnectionstatechange", self._on_state_change)
        self._pc.on("datachannel", self._on_datachannel)

    def __repr__(self) -> str:
        return f"PeerLink({self.peer_id or '?'}, {self.role}, open={self.is_open})"

    # -- state -------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while the data channel is open and the link not closed."""
        return (
            not self.closed.done()
            and self._channel is not None
            and self._channel.readyState == "open"
        )

    @property
    def buffered_amount(self) -> int:
        return self._channel.bufferedAmount if self._channel is not None else 0

    def _log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        logger.log(level, "PeerLink(%s) " + message, self.peer_id or "?", *args, exc_info=exc_info)

    # -- negotiation -------------------------------------------------------------------------------

    async def create_offer(self) -> str:
        """Create the ``"data"`` channel and a complete offer; returns the offer SDP.

        Raises:
            NegotiationFailed: aiortc refused (e.g. the link is closed).
        """
        self.role = "offerer"
        self._attach_channel(self._pc.createDataChannel(DATA_CHANNEL_LABEL))
        try:
            await self._pc.setLocalDescription(await self._pc.createOffer())
        except (InvalidStateError, ValueError) as exc:
            raise NegotiationFailed(f"cannot create an offer: {exc}", peer_id=self.peer_id) from exc
        return self._local_sdp()

    async def accept_offer(self, sdp: str) -> str:
        """Apply a remote offer and return the complete answer SDP.

        Raises:
            NegotiationFailed: the offer is not a usable SDP.
        """
        self.role = "answerer"
        try:
            await self._set_remote(sdp, "offer")
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        except (InvalidStateError, ValueError, AssertionError, IndexError, KeyError) as exc:
            # aiortc's SDP parser asserts / indexes on malformed input.
            raise NegotiationFailed(
                f"cannot answer the offer: {exc}", peer_id=self.peer_id
            ) from exc
        return self._local_sdp()

    async def accept_answer(self, sdp: str) -> None:
        """Apply the remote answer to our offer.

        Raises:
            NegotiationFailed: the answer is not a usable SDP, or no offer is pending.
        """
        try:
            await self._set_remote(sdp, "answer")
        except (InvalidStateError, ValueError, AssertionError, IndexError, KeyError) as exc:
            raise NegotiationFailed(
                f"cannot apply the answer: {exc}", peer_id=self.peer_id
            ) from exc

    async def _set_remote(self, sdp: str, kind: str) -> None:
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        self._remote_ufrag = _ice_ufrag(sdp)
        self._has_remote = True
        queued, self._queued_candidates = self._queued_candidates, []
        for item in queued:
            await self._apply_candidate(*item)

    def _local_sdp(self) -> str:
        if self.closed.done() or self._close_task is not None:
            # Closed while gathering (e.g. the room was left): the description is meaningless.
            raise PeerClosed("closed during negotiation", peer_id=self.peer_id)
        description = self._pc.localDescription
        sdp = description.sdp
        if _count_candidates(sdp) == 0:
            # The loopback problem (test-harness §9): the remote cannot reach us.
            self._log(
                logging.ERROR,
                "local %s has no ICE candidates (loopback-only host? see host_addresses_mode)",
                description.type,
            )
        return sdp

    async def add_candidate(
        self,
        candidate: str,
        sdp_mid: str | None = None,
        sdp_mline_index: int | None = None,
        username_fragment: str | None = None,
    ) -> None:
        """Add a remote trickled candidate (``candidate:…`` line from ``RTCIceCandidate.toJSON``).

        Empty candidates (end-of-candidates) are skipped; candidates are queued until a remote
        description exists; ones whose ufrag differs from the remote description's are dropped
        (§7.1 candidate filtering). Malformed lines are logged and dropped.
        """
        if not candidate or self.closed.done():
            return
        item = (candidate, sdp_mid, sdp_mline_index, username_fragment)
        if not self._has_remote:
            if len(self._queued_candidates) < MAX_QUEUED_CANDIDATES:
                self._queued_candidates.append(item)
            return
        await self._apply_candidate(*item)

    async def _apply_candidate(
        self, line: str, sdp_mid: str | None, index: int | None, ufrag: str | None
    ) -> None:
        if ufrag and self._remote_ufrag and ufrag != self._remote_ufrag:
            self._log(logging.DEBUG, "dropping a candidate for another ufrag")
            return
        text = line.removeprefix("candidate:").strip()
        try:
            parsed = candidate_from_sdp(text)
        except (AssertionError, ValueError, IndexError) as exc:
            self._log(logging.DEBUG, "malformed remote candidate %r: %s", text, exc)
            return
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = index if index is not None or sdp_mid is not None else 0
        try:
            await self._pc.addIceCandidate(parsed)
        except (InvalidStateError, ValueError, ConnectionError) as exc:
            self._log(logging.DEBUG, "remote candidate refused: %s", exc)

    # -- data channel ------------------------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != DATA_CHANNEL_LABEL or self._channel is not None:
            self._log(logging.DEBUG, "ignoring extra data channel %r", channel.label)
            return
        self._attach_channel(channel)
        if channel.readyState == "open":  # aiortc opens in-band channels before emitting them
            self._channel_open()

    def _attach_channel(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        channel.bufferedAmountLowThreshold = self._low_bytes
        channel.on("open", self._channel_open)
        channel.on("close", lambda: self._schedule_close("data channel closed"))
        channel.on("message", self._channel_message)
        channel.on("bufferedamountlow", self._writable.set)

    def _channel_open(self) -> None:
        if self.opened.is_set() or self.closed.done():
            return
        self.opened.set()
        self._log(logging.DEBUG, "data channel open")
        if self._on_open is not None:
            self._callback(self._on_open)

    def _channel_message(self, data: bytes | str) -> None:
        if isinstance(data, str):  # Trystero sends binary only; text decodes to nothing (P2)
            self._log(logging.DEBUG, "dropping a text message")
            return
        if self._on_message is not None:
            self._callback(self._on_message, data)

    def _callback(self, callback: Callable[..., None], *args: object) -> None:
        # These run inside aiortc's event path; an exception there would break the SCTP receive
        # loop for the whole connection, so a failing callback is logged instead.
        try:
            callback(*args)
        except Exception:
            self._log(logging.ERROR, "callback failed", exc_info=True)

    async def send(self, data: bytes) -> None:
        """Send one binary message, first waiting while the channel's buffer is above high water.

        Raises:
            TypeError: `data` is not bytes-like (a str would go out as a text message, P2).
            PeerClosed: the link is closed or closes while waiting.
            PeerTimeout: the buffer did not drain within the drain timeout.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("PeerLink.send takes bytes")
        channel = self._channel
        if channel is None or not self.opened.is_set():
            raise PeerClosed("data channel is not open", peer_id=self.peer_id)
        if channel.bufferedAmount > self._high_water:
            await self._drain(channel)
        if self.closed.done() or channel.readyState != "open":
            raise PeerClosed("data channel closed", peer_id=self.peer_id)
        try:
            channel.send(bytes(data))
        except InvalidStateError as exc:
            raise PeerClosed(f"data channel closed: {exc}", peer_id=self.peer_id) from exc

    async def _drain(self, channel: RTCDataChannel) -> None:
        # "bufferedamountlow" sets _writable; so does closing, so a close ends the wait too.
        try:
            async with asyncio.timeout(self._drain_timeout):
                while channel.bufferedAmount > self._high_water:
                    if self.closed.done() or self._close_task is not None:
                        raise PeerClosed("closed while draining", peer_id=self.peer_id)
                    self._writable.clear()
                    await self._writable.wait()
        except TimeoutError as exc:
            raise PeerTimeout(
                f"send buffer did not drain within {self._drain_timeout:.1f} s",
                peer_id=self.peer_id,
            ) from exc

    async def flush(self, timeout: float) -> None:
        """Wait (bounded, never raising) until the channel buffer is empty or the link closed."""
        channel = self._channel
        if channel is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while channel.bufferedAmount > 0 and not self.closed.done() and loop.time() < deadline:
            self._writable.clear()
            previous = channel.bufferedAmountLowThreshold
            channel.bufferedAmountLowThreshold = 0
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._writable.wait()
            except TimeoutError:
                break
            finally:
                channel.bufferedAmountLowThreshold = previous
        self._writable.set()

    # -- close detection and closing ---------------------------------------------------------------

    def _on_state_change(self) -> None:
        states = (self._pc.connectionState, self._pc.iceConnectionState)
        if "failed" in states or "closed" in states:
            self._schedule_close(f"connection {'/'.join(states)}")
        elif "disconnected" in states:
            if self._disconnected_timer is None:
                loop = asyncio.get_running_loop()
                self._disconnected_timer = loop.call_later(
                    self._disconnected_grace, self._schedule_close, "disconnected too long"
                )
        elif self._disconnected_timer is not None:
            self._disconnected_timer.cancel()
            self._disconnected_timer = None

    def _schedule_close(self, reason: str) -> None:
        if self._close_task is None and not self.closed.done():
            self._log(logging.DEBUG, "closing: %s", reason)
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(), name=f"PeerLink[{self.peer_id}].close"
            )

    async def close(self) -> None:
        """Close the connection; idempotent, and concurrent callers wait for the same close."""
        if self._close_task is None and not self.closed.done():
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(), name=f"PeerLink[{self.peer_id}].close"
            )
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        if self._disconnected_timer is not None:
            self._disconnected_timer.cancel()
        self._writable.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._pc.close()
        except TimeoutError:
            self._log(logging.WARNING, "RTCPeerConnection.close() timed out")
        except Exception:  # aiortc internals on a half-built connection; we are closing anyway
            self._log(logging.DEBUG, "error while closing", exc_info=True)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)
            if self._on_close is not None:
                callback, self._on_close = self._on_close, None
                self._callback(callback)

    async def __aenter__(self) -> PeerLink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

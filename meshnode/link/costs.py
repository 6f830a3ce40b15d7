"""The link's cost model: bytes per message and per packet on a TURN-relayed data channel.

On the mesh, framing — not the token encoding — decides the bandwidth (legion-mesh §3.3): every
data-channel message pays Trystero framing, DTLS/SCTP/UDP/IP/TURN headers per packet, and the
receiver's SCTP acknowledges every packet. :func:`predict` turns a set of stream groups and a
coalescing window into bytes per second each way and messages per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SCTP_USER_DATA_BYTES", "PacingConfig", "UnitLoad", "WireCosts", "message_bytes", "predict"]

SCTP_USER_DATA_BYTES = 1160
"""aiortc's largest DATA chunk payload (``USERDATA_MAX_LENGTH``): bigger messages take more packets."""


@dataclass(frozen=True, kw_only=True)
class WireCosts:
    """Bytes per message and per packet on a TURN-relayed data channel (estimates, IPv4).

    Defaults: Trystero room frame + action chunk header = 103 B (trystero-wire §8.8); a DATA
    envelope around a body with a 15-character stream id ≈ 30 B (legion-mesh §5.5); per packet
    DTLS 1.2 AES-GCM record 37 B + SCTP common and DATA chunk headers 28 B + UDP/IP 28 B + TURN
    ChannelData 4 B = 97 B; the receiver's SACK ≈ 97 B back per packet.
    """

    trystero_bytes: int = 103
    envelope_bytes: int = 30
    packet_bytes: int = 97
    ack_bytes: int = 97
    frame_bytes: int = 13
    """A Codec frame's map keys and flags; zstd shrinks them to a few bytes after the first."""
    id_bytes: float = 2.6
    """One token id in a frame (msgpack uint16 mostly), before compression."""
    mux_item_bytes: int = 6
    """Per stream in a multiplexed message: array header, tag, bin header."""
    zstd_ratio: float = 0.75
    """Compressed/raw size of a frame (streaming zstd with a flush per message)."""
    zstd_block_bytes: int = 3
    keepalive_bytes_per_second: float = 60.0
    """One idle connection's transport upkeep each way: ICE consent checks and their answers,
    SCTP heartbeats, TURN refreshes (sent by aiortc itself, outside the node's byte bucket).
    With the cap heartbeat below: 115 B/s up per idle tab, as measured (``meshnode bench
    --idle-seconds 45``: 116 B/s up, 76 B/s down per tab through coturn)."""
    result_text_bytes_per_token: float = 5.0
    """The engine_run result repeats the answer's text for tabs that did not negotiate it away:
    about 5 B per token of English as JSON (5.0 on the recorded SmolLM2 answer)."""
    cap_heartbeat_bytes_per_second: float = 55.0
    """One tab's share of the cap heartbeat: a 1.3 KB cap (1.6 KB on the wire) every 30 s."""
    connection_setup_bytes: int = 6000
    """Uplink bytes of one connection's setup: ICE checks, the DTLS flight with its certificate,
    SCTP association, Trystero handshake and the cap (measured by ``meshnode bench``)."""


@dataclass(frozen=True, kw_only=True)
class PacingConfig:
    """Settings of a :class:`Pacer`."""

    budget_bytes_per_second: float
    """The link's byte budget per direction (0: unknown — windows stay at ``min_window``, no admission)."""
    headroom: float = 0.85
    """Admit streams while they fit this fraction of the budget at ``max_window`` (the rest is for
    control traffic, retransmissions and estimate errors)."""
    target_utilisation: float = 0.65
    """Choose the window for this fraction of the budget when ``max_window`` allows it; above it
    the window only widens as far as ``headroom`` needs (queues on a full link cost latency)."""
    stream_control_bytes: int = 1400
    """Bytes a stream costs on the link besides its frames, once per stream: READY, the engine_run
    result, acknowledgements of the asker's HELLO and call (measured by ``meshnode bench``)."""
    stream_seconds: float = 20.0
    """Expected stream lifetime until measured: spreads ``stream_control_bytes`` for admission."""
    startup_seconds: float = 2.0
    """Over how long a start-up's control bytes are spread when planning the window."""
    reopen_fraction: float = 0.05
    """Hysteresis: once full, ``available`` turns true again only when this fraction of the admitted
    streams (at least one) could still be added, so ``cap.available`` does not flap."""
    token_rate: float = 30.0
    """Tokens per second per stream assumed until the streams' own rate is measured."""
    min_window_seconds: float = 0.05
    max_window_seconds: float = 0.4
    """Upper bound of the coalescing window: the latency promise (p95 inter-token delay)."""
    max_messages_per_second: float = 400.0
    """Message-rate ceiling for the node (aiortc's SCTP/DTLS is pure Python: ~1 ms of CPU per message)."""
    multiplex: bool = True
    """Let peers that negotiate ``accept_mux`` share one message per window across their streams."""
    admission: bool = True
    """Refuse new streams that would not fit (False: admit everything, only adapt the window)."""
    costs: WireCosts = field(default_factory=WireCosts)


@dataclass
class UnitLoad:
    streams: int
    mux: bool
    negotiated: bool
    compressed: bool
    text_streams: int = 0
    """How many of its streams end with a result that repeats the text."""


def message_bytes(unit: UnitLoad, tokens: float, costs: WireCosts) -> float:
    """Predicted data-channel payload + Trystero framing of one message carrying `tokens` ids."""
    frame = costs.frame_bytes + tokens / max(1, unit.streams) * costs.id_bytes
    if unit.compressed:
        frame = frame * costs.zstd_ratio + costs.zstd_block_bytes
    body = unit.streams * (frame + (costs.mux_item_bytes if unit.mux else 0)) if unit.mux else frame
    wrapper = costs.envelope_bytes if unit.negotiated else 0
    return costs.trystero_bytes + wrapper + body


def predict(units: list[UnitLoad], window: float, rate: float, costs: WireCosts,
            connections: int = 0) -> tuple[float, float, float]:
    """(bytes/s out, bytes/s back, messages/s) for `units` at coalescing window `window`, plus the
    upkeep of `connections` open connections (streaming or not)."""
    back = connections * costs.keepalive_bytes_per_second
    out = back + connections * costs.cap_heartbeat_bytes_per_second
    messages = 0.0
    for unit in units:
        if unit.streams <= 0:
            continue
        token_rate = unit.streams * rate
        per_second = min(1.0 / window, token_rate)  # never more than one message per token
        size = message_bytes(unit, token_rate / per_second, costs)
        packets = math.ceil(size / SCTP_USER_DATA_BYTES)
        out += per_second * (size + packets * costs.packet_bytes)
        out += unit.text_streams * rate * costs.result_text_bytes_per_token
        back += per_second * packets * costs.ack_bytes
        messages += per_second
    return out, back, messages

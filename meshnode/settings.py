"""Every meshnode setting, with its default. Pure data: no I/O (config.py reads files and env).

Each section is a frozen dataclass; `configs/default.toml` lists the same keys (a test keeps the two
in step). Field docstrings are the documentation shown by `meshnode config show` and README.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

# Trystero's default STUN servers (trystero-wire §7.1); Unstable Legion tabs use the same list.
DEFAULT_ICE_SERVERS = [
    "stun:stun.l.google.com:19302",
    "stun:stun1.l.google.com:19302",
    "stun:stun2.l.google.com:19302",
    "stun:stun.cloudflare.com:3478",
]


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s|ps)?\s*$")
_RATE_UNITS = {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024.0, "mib": 1024.0 ** 2,
               "gib": 1024.0 ** 3, "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}


class ByteRate(float):
    """Bytes per second, written as a number or with a unit: ``"50KB/s"``, ``"400kbit"``, ``"1MiB/s"``.

    Byte units: B, KB (10^3), MB, GB, KiB (2^10), MiB, GiB; bit units: bit, kbit, Mbit, Gbit; each
    optionally followed by ``/s``. Lower-case ``b`` alone means bytes only with no prefix; ``kb``,
    ``mb`` and ``kbps`` are refused as ambiguous (bits or bytes?).
    """

    @classmethod
    def parse(cls, value: object) -> ByteRate:
        if isinstance(value, bool):
            raise ValueError(f"expected a byte rate, got {value!r}")
        if isinstance(value, int | float):
            number, unit = float(value), ""
        else:
            match = _RATE.match(str(value))
            if match is None:
                raise ValueError(f"expected a byte rate like 50KB/s or 400kbit, got {value!r}")
            number, unit = float(match.group(1)), match.group(2)
            if unit in {"kb", "mb", "gb"} or str(value).strip().lower().endswith("bps"):
                raise ValueError(f"{value!r} is ambiguous: write KB/s for kilobytes or kbit/s for kilobits")
        factor = _RATE_UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(f"unknown unit {unit!r} in {value!r} (B, KB, MB, KiB, MiB, bit, kbit, Mbit)")
        if number < 0:
            raise ValueError(f"a byte rate cannot be negative: {value!r}")
        return cls(number * factor)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    model: str = "embedded"
    """'embedded' (SmolLM2-135M-Instruct shipped in a PyPI wheel), a local HF folder, or a hub id."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (auto picks CUDA > MPS > CPU)."""
    dtype: str = "auto"
    """auto | bfloat16 | float16 | float32 (auto: bf16 on CUDA and on CPUs with native bf16, else
    fp32; fp16 on MPS)."""
    cache_dir: str = ""
    """Where converted models are cached; empty = $XDG_CACHE_HOME/meshnode or ~/.cache/meshnode."""
    device_map: str = ""
    """Spread a model too big for one GPU over the GPUs (and the CPU) with accelerate: auto |
    balanced | balanced_low_0 | sequential; empty = the whole model on model.device (which must
    stay auto with a map). Served by the torch engine (continuous batching), not the CUDA-graph
    engine; a model that would need disk offload is refused before loading."""
    max_memory: str = ""
    """With device_map: most weight bytes per device, e.g. "0=20GiB,1=20GiB,cpu=64GiB" (a GPU index,
    cpu or mps; B, KB, MB, GB, KiB, MiB, GiB); only the devices named are used; empty = the free
    memory of every device. It bounds the weights only: leave room for the KV cache."""


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    max_concurrent: int = 0
    """Streams decoded together in one batch; more requests wait in the queue. 0 = auto: 64 with
    the CUDA engine (its KV slots are preallocated and a step costs about the same up to there),
    8 otherwise (CPU/MPS)."""
    max_queue: int = 32
    """Requests allowed to wait for a batch slot; beyond that requests are refused as busy."""
    max_prompt_tokens: int = 4096
    """Longest accepted prompt (tokens after the chat template)."""
    max_tokens: int = 1024
    """Ceiling on max_tokens of any request."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none."""
    max_batch_tokens: int = 32768
    """Memory admission: prompt + max_tokens summed over running and queued requests; a request
    that would exceed it is refused as busy (0 = off). KV bytes ~ this x per-token KV size.
    The CUDA engine admits by free KV slot instead (see context_tokens)."""
    context_tokens: int = 0
    """CUDA engine: KV positions per stream (prompt + max_tokens must fit); 0 = max_prompt_tokens
    + max_tokens. Capped by the model's context; the stream count is what the GPU's free memory
    holds at this size (at most max_concurrent)."""
    prefill_budget_tokens: int = 0
    """Prompt tokens prefilled between two decode steps while streams decode, so arrivals do not
    stall them; 0 = auto (CUDA: the widest chunk costing under one decode step, measured at
    warm-up; CPU/MPS: 1024)."""
    prefix_cache_mib: int = 8192
    """CUDA engine: GPU memory (MiB) for KV of prompt prefixes shared across calls (system prompt,
    chat-template head, a tab's earlier turns), reused instead of prefilled; least recently used
    prefixes are evicted. At most a quarter of the KV memory; 0 = off."""
    compile_cache: bool = True
    """CUDA engine: keep torch.compile's artifacts under model.cache_dir/compile, so a restart
    warms up without compiling again."""
    upstreams: list[str] = field(default_factory=list)
    """Remote engines to serve from instead of a local model (empty = the local model):
    [codec|vllm|sglang|llamacpp+]http://HOST:PORT[?max_concurrent=N] (codec = a Codec HTTP server
    such as meshnode serve-http; see docs/engines.md). Calls go to the one with the most free
    capacity; max_concurrent (else what the server says, else engine.max_concurrent, else 8) is
    its limit, and engine.max_queue more calls in all may wait in the upstreams' queues."""
    tokenizer: str = ""
    """Tokenizer for remote upstreams that serve no Codec map (vLLM, SGLang, llama.cpp): a Hugging
    Face tokenizer folder or a tokenizer.json; it supplies the map, the text and the chat template
    (SGLang, llama.cpp). With a Codec upstream it decodes the text and is the map if none is served."""
    upstream_timeout_seconds: float = 30.0
    """Bound on connecting to an upstream and on the wait between two reads of its stream; past it
    the call fails over (before its first token) or ends with an error."""


@dataclass(frozen=True, kw_only=True)
class RoomSettings:
    room: str = "legion-demo"
    """Trystero roomId (the Unstable Legion classic demo room by default)."""
    app_id: str = "unstable-legion-demo-v0"
    """Trystero appId; tabs and meshnode must use the same one."""
    strategy: str = "mqtt"
    """Signaling strategy: mqtt | nostr | torrent | ws-relay (or a third-party adapter name)."""
    relays: list[str] = field(default_factory=list)
    """Relay URLs; empty = the strategy's defaults (the Unstable Legion MQTT brokers for mqtt)."""
    password: str = ""
    """Room password (encrypts signaling end to end). Prefer MESHNODE_ROOM__PASSWORD over the file."""


@dataclass(frozen=True, kw_only=True)
class WebRTCSettings:
    ice_servers: list[str] = field(default_factory=lambda: list(DEFAULT_ICE_SERVERS))
    """STUN/TURN URLs (turn:user:pass@host:port for credentials); [] for loopback tests."""
    host_addresses_mode: str = ""
    """auto (aioice's own addresses) | append (those plus host_addresses) | only (host_addresses
    alone); unset = append when host_addresses are given, else auto."""
    host_addresses: list[str] = field(default_factory=list)
    """Addresses ICE gathers host candidates on besides (append) or instead of (only) aioice's own,
    e.g. 127.0.0.1 on a loopback-only host (aioice never offers loopback by itself)."""
    ice_transport_policy: str = "all"
    """all | relay (TURN candidates only: tabs never learn this machine's addresses, and every
    byte crosses the TURN relay; needs a turn: server in ice_servers)."""


@dataclass(frozen=True, kw_only=True)
class LinkSettings:
    uplink_bytes_per_second: ByteRate = ByteRate(0)
    """The node's upload budget for its streams: bytes/s or with a unit ("50KB/s", "400kbit");
    0 = unlimited (no pacing: frames of up to legion.frame_max_ids ids every
    legion.frame_max_delay_ms). With a budget, every stream is paced through it: one coalescing
    window chosen from the budget, the connections and streams running and their measured token
    rate; a stream that would not fit is refused with the reason and cap.available turns false."""
    max_delay_ms: int = 400
    """With a budget: the longest a generated id waits for company in a frame (the widest
    coalescing window). Tabs see gaps of up to this plus jitter, and ids wait half of it on
    average: 400 keeps p95 inter-token gaps under 500 ms and the median added delay near 250 ms."""


@dataclass(frozen=True, kw_only=True)
class LegionSettings:
    nick: str = ""
    """Name shown to other peers; empty = meshnode-<4 chars of the peer id>."""
    skills: list[str] = field(default_factory=lambda: ["chat"])
    """Skills advertised in cap."""
    authoritative: list[str] = field(default_factory=list)
    """Skills this node claims authority for (cap.authoritative)."""
    system_prompt: str = ""
    """System prompt used when a request gives none."""
    answer_broadcast_ai: bool = True
    """Answer broadcast '/ai' chat (one meshnode per room is elected); false = directed only."""
    max_calls_per_peer: int = 2
    """Concurrent engine_run calls one peer may have open."""
    calls_per_minute: int = 30
    """engine_run / ping calls one peer may start per minute."""
    frame_max_ids: int = 16
    """Most token ids coalesced into one cf frame."""
    frame_max_delay_ms: int = 50
    """Longest a generated id waits to be coalesced before its frame is sent."""
    call_deadline_seconds: float = 20.0
    """A call that could not finish within this (estimated from the measured speed and the work
    in flight) is refused at once, and one still running at it ends with finish_reason "length":
    the Legion core gives up on a tool call after 30 s, its chat app after 20 s (0 = off)."""


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """Per-peer limits against hostile room members (docs/limits.md explains each default)."""

    max_message_bytes: int = 1048576
    """Largest inbound action message (reassembled); a peer that sends a larger one is dropped."""
    max_pending_messages_per_peer: int = 32
    """Partially received messages kept per peer; the oldest is evicted beyond."""
    max_pending_bytes_per_peer: int = 2097152
    """Bytes of partially received messages kept per peer; the oldest is evicted beyond."""
    max_queued_messages_per_peer: int = 64
    """Messages one peer may have waiting in one action's queue; beyond, its new ones are dropped."""
    max_queued_bytes_per_peer: int = 2097152
    """Bytes one peer may have waiting in one action's queue."""
    peer_rate_bytes_per_second: int = 262144
    """Sustained inbound bytes/s per peer; over its burst (max_message_bytes + 1 s of this) it is dropped."""
    peer_rate_messages_per_second: int = 200
    """Sustained inbound data-channel messages/s per peer (burst: 4 s worth); beyond, dropped."""
    max_connections: int = 64
    """WebRTC connections (open + negotiating) at once; further peers are refused."""
    ban_seconds: int = 60
    """How long a dropped peer is refused."""
    max_strikes_per_minute: int = 30
    """Invalid payloads + refused calls one peer may cause per minute before it is dropped."""
    max_prompt_chars: int = 64000
    """Longest engine_run prompt in characters (checked before tokenizing)."""


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    host: str = "127.0.0.1"
    """Bind address of serve-http."""
    port: int = 8000
    """Port of serve-http."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    room: RoomSettings = field(default_factory=RoomSettings)
    webrtc: WebRTCSettings = field(default_factory=WebRTCSettings)
    legion: LegionSettings = field(default_factory=LegionSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)


SECRET_KEYS = {("room", "password")}


def section_names() -> list[str]:
    return [f.name for f in fields(Settings)]

"""Seed inputs for the fuzz targets: one valid example per message kind, so that coverage-guided
fuzzing starts past the outer parsers (random bytes rarely make valid JSON or a room frame).

    .venv/bin/python fuzz/seeds.py      # writes fuzz/seeds/<target>/<name>

fuzz/run.py reads fuzz/seeds/<target>/ as an extra, read-only corpus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.targets import KEY
from meshnode.wire import legion
from meshnode.wire import roomframes as rf
from meshnode.wire.envelopes import Envelope, encode_envelope
from meshnode.wire.frames import CodecFrame, encode_frame
from signaling.protocol import messages
from signaling.protocol.sealing import Sealer

SEEDS = ROOT / "fuzz" / "seeds"


def framed(parts: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def build() -> dict[str, dict[str, bytes]]:
    sealer = Sealer(KEY)
    cap = legion.build_cap(ts_ms=1, nick="n", model_id="HuggingFaceTB/SmolLM2-135M-Instruct", available=True,
                           skills=["chat"], system_prompt_summary="s",
                           tools=[legion.tool_descriptor("engine_run", "d", legion.ENGINE_RUN_SCHEMA)],
                           authoritative=["chat"], load={"active": 0, "queued": 0, "max": 8})
    chat = legion.build_chat(ts_ms=1, from_id="f", to="", text="/ai hello")
    run = legion.build_call(ts_ms=1, call_id="tc-1", tool_name="engine_run",
                            args={"user": "hi", "system": "s", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                                  "messages": [{"role": "assistant", "content": "x"}]})
    ping = legion.build_call(ts_ms=1, call_id="tc-2", tool_name="ping", args={"payload": {"a": [1]}})
    result = legion.build_result(ts_ms=1, call_id="tc-3", status="error", error="e")
    frame = encode_frame(CodecFrame(ids=[1, 300, 70000], done=False, finish_reason=None))
    last = encode_frame(CodecFrame(ids=[], done=True, finish_reason="stop"))
    hello = encode_envelope(Envelope(kind=0, stream_id="tc-1", seq=0, body={"codec_version": 1,
                                                                         "accept_compression": ["zstd"]}))
    data = encode_envelope(Envelope(kind=2, stream_id="tc-1", seq=2, body=frame))
    end = encode_envelope(Envelope(kind=3, stream_id="tc-1", seq=3, body={"codec_version": 1,
                                                                       "finish_reason": "cancel"}))
    candidate = messages.build_candidate_json(messages.Candidate(
        candidate="candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", sdp_mid="0", sdp_mline_index=0,
        username_fragment="abcd"))
    sealed = sealer.seal(candidate, iv=bytes(16))
    signals = {
        "announce": messages.build_announce("a" * 20),
        "offer": messages.build_offer("a" * 20, "o" * 12, sealer.seal("v=0\r\n", iv=bytes(16))),
        "answer": messages.build_answer("a" * 20, sealer.seal("v=0\r\n", iv=bytes(16)), "o" * 12),
        "candidate": messages.build_offerer_candidate("a" * 20, "o" * 12, sealed),
    }
    tracker = [
        messages.build_tracker_announce("h" * 20, "p" * 20, [("o" * 20, sealed)]),
        {"action": "announce", "info_hash": "h" * 20, "peer_id": "q" * 20, "offer_id": "o" * 20,
         "offer": {"type": "offer", "sdp": sealed}},
        {"action": "announce", "info_hash": "h" * 20, "interval": 120},
        {"failure reason": "nope", "info_hash": "h" * 20},
    ]

    def chunks(name: str, payload: object, nonce: int = 0, metadata: object = rf.NO_METADATA) -> list[bytes]:
        body, tags = rf.encode_payload(payload)
        return rf.encode_action(name, nonce, body, tags, metadata)

    inbound = {
        "legion": framed(chunks("cap", cap) + chunks("tc", run, 1) + chunks("tc", ping, 2) + chunks("cm", chat, 3)),
        "envelopes": framed(chunks("cf", hello) + chunks("cf", end, 1) + chunks("cf", frame, 2)),
        "internal": framed(chunks("@_hsready", "") + chunks("@_ping", "") + chunks("@_hsdata", {"__trystero_pw": "challenge", "c": "x" * 36})
                           + chunks("@_signal", {"type": "candidate", "sdp": candidate}) + chunks("@_leave", "")),
        "multichunk": framed(chunks("tc", {"kind": "call", "v": 1, "ts": 1, "callId": "c", "toolName": "ping",
                                           "args": {"payload": "x" * 20000}}, 5, {"m": 1})),
    }
    return {
        "room_frame": {"room": rf.encode_room_frame("t" * 64, chunks("cap", cap)[0]),
                       "presence": rf.encode_presence_frame("t" * 64, True)},
        "action_chunks": {"stream": inbound["legion"], "multichunk": inbound["multichunk"]},
        "payload_decode": {"json": bytes([rf.TAG_JSON]) + json.dumps(cap).encode(), "text": b"\x00hello"},
        "cf_payload": {"frame": frame, "last": last, "hello": hello, "data": data, "end": end},
        "codec_stream": {"frames": framed([frame + last, frame[:5], frame[5:] + last])},
        "envelope_stream": {"stream": framed([hello, data, end])},
        "legion_json": {name: json.dumps(value).encode() for name, value in
                        {"cap": cap, "chat": chat, "run": run, "ping": ping, "result": result,
                         "args": run["args"]}.items()},
        "signal_text": {name: text.encode() for name, text in signals.items()},
        "sealed_blob": {"sealed": sealed.encode()},
        "candidate_json": {"candidate": candidate.encode()},
        "tracker_message": {f"t{i}": json.dumps(m).encode() for i, m in enumerate(tracker)},
        "relay_frames": {**{f"ws-{k}": json.dumps({"topic": "t", "payload": v}).encode() for k, v in signals.items()},
                         "nostr": json.dumps(["EVENT", "s", {"id": "i", "content": signals["offer"],
                                                              "tags": [["x", "t"]]}]).encode(),
                         "tracker": json.dumps(tracker[1]).encode()},
        "node_inbound": inbound,
    }


def main() -> int:
    for target, files in build().items():
        folder = SEEDS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    print(f"seeds written to {SEEDS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

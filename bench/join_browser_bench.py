"""Benchmark: join-to-peer-visible time between Chromium running real Trystero and a Python ``Room``.

For each strategy (mqtt, nostr, torrent) the local relay is started on a free 127.0.0.1 port (the
launchers of ``bench/lab/relays.py``), the Trystero test page (``tests/browser/www``) is served on
127.0.0.1, and one headless Chromium is launched with the flags of test-harness §4.2. Then
``--runs`` times a fresh tab and a fresh Python room join a fresh appId **at the same moment**;
recorded per run:

* ``tab_sees_python_seconds``: page clock, from the tab's ``joinRoom`` call to its ``onPeerJoin``;
* ``python_sees_tab_seconds``: Python clock, from the ``Room.join`` call to the ``join`` event;
* ``both_seconds``: the larger of the two (the pair is usable from then on);
* ``first_message_seconds``: a JSON action Python → tab, until the page recorded it.

Everything runs on loopback (``host_addresses_mode="only"``, ``ice_servers=[]``; the page always
passes ``relayConfig.urls`` and ``iceServers: []``).

    .venv/bin/python bench/join_browser_bench.py                    # 5 runs per strategy
    .venv/bin/python bench/join_browser_bench.py --runs 3 --strategies mqtt
    unshare -n -- bash -c 'ip link set lo up && .venv/bin/python bench/join_browser_bench.py'

Results go to ``bench/results/join_browser.json`` (command line, host, load) and a table on stdout.
Numbers depend heavily on host load: aiortc is pure Python, and Chromium competes for the same cores.
Needs ``web/node_modules`` (``cd web && npm ci``) and Debian's ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lab import relays
from bench.lab.browser import CHROMIUM, CHROMIUM_FLAGS, WWW, QuietHandler, Tab, loopback_only
from meshnode.room import Room, RoomConfig
from signaling.protocol.names import gen_id

STRATEGIES = ["mqtt", "nostr", "torrent"]
JOIN_TIMEOUT_SECONDS = 30.0
"""A run in which a side has not seen the other by then counts as failed."""
MESSAGE_TIMEOUT_SECONDS = 10.0
RESULTS = ROOT / "bench" / "results" / "join_browser.json"
LAUNCHERS = {"mqtt": relays.mosquitto_relay, "nostr": relays.nostr_relay, "torrent": relays.tracker_relay}


@contextlib.contextmanager
def page_server() -> Iterator[str]:
    """Serve tests/browser/www on a free 127.0.0.1 port from a thread."""
    handler = functools.partial(QuietHandler, directory=str(WWW))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def one_run(
    browser: Any, base_url: str, strategy: str, url: str, run: int, *, debug: bool = False
) -> dict[str, Any]:
    """One tab and one Python room join a fresh room at once; returns the run's sample."""
    app_id = f"bench-browser-{strategy}-{os.getpid()}-{run}-{time.monotonic_ns() % 10**9}"
    context = await browser.new_context()
    room: Room | None = None
    tab: Tab | None = None
    python_id = gen_id(20)
    python_errors: list[tuple[str, str]] = []
    try:
        page = await context.new_page()
        await page.goto(f"{base_url}/trystero.html")
        await page.wait_for_function("() => window.T && document.body.dataset.ready === '1'", timeout=10_000)
        tab = Tab(page, "bench")
        # Load the bundle first so that module parsing is not part of the join time.
        await page.evaluate(f"() => import('./lib/trystero-{strategy}.js')")
        config = RoomConfig(
            strategy=strategy,
            relay_urls=[url],
            app_id=app_id,
            room_id="bench",
            ice_servers=[],
            self_id=python_id,
        )

        async def join_python() -> tuple[Room, float]:
            started = time.monotonic()
            joined = await Room.join(config)
            joined.on_join_error(lambda peer, reason: python_errors.append((peer, reason)))
            try:
                event = await asyncio.wait_for(joined.next_event(), JOIN_TIMEOUT_SECONDS)
            except BaseException:
                await asyncio.wait_for(joined.leave(), 10)
                raise
            if event.kind != "join":
                await asyncio.wait_for(joined.leave(), 10)
                raise RuntimeError(f"unexpected first event {event}")
            return joined, time.monotonic() - started

        python_task = asyncio.create_task(join_python())
        tab_join = asyncio.create_task(tab.join(strategy, [url], app_id, "bench", debug=debug))
        try:
            room, python_seconds = await python_task
        finally:
            await tab_join
        await tab.wait_peer(room.self_id, timeout=JOIN_TIMEOUT_SECONDS)
        events = await tab.events()
        called = next(e["t"] for e in events if e["type"] == "joinCalled")
        seen = next(e["t"] for e in events if e["type"] == "join")
        tab_seconds = (seen - called) / 1000.0

        started = time.monotonic()
        await room.make_action("json").send({"ping": run})
        await tab.wait_messages("json", 1, room.self_id, timeout=MESSAGE_TIMEOUT_SECONDS)
        message_seconds = time.monotonic() - started
        return {
            "ok": True,
            "tab_sees_python_seconds": tab_seconds,
            "python_sees_tab_seconds": python_seconds,
            "both_seconds": max(tab_seconds, python_seconds),
            "first_message_seconds": message_seconds,
            "python_offers": room.self_id < (tab.self_id or ""),
        }
    except Exception as exc:  # a failed run is data, not a crash
        failure: dict[str, Any] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "python_id": python_id,
            "tab_id": tab.self_id if tab is not None else None,
            "python_join_errors": python_errors,
        }
        if tab is not None:
            with contextlib.suppress(Exception):
                failure["tab_events"] = await asyncio.wait_for(tab.events(), 5)
                failure["tab_pc_log"] = (await asyncio.wait_for(tab.get("pcLog"), 5))[-20:]
            if debug:
                with contextlib.suppress(Exception):
                    failure["tab_relay_log"] = (await asyncio.wait_for(tab.get("wsLog"), 5))[-60:]
        return failure
    finally:
        if room is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.leave(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(context.close(), 10)


def summarise(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


async def bench(strategies: list[str], runs: int, *, debug: bool = False) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="meshnode-chromium-bench-"))
    os.environ["TMPDIR"] = str(tmp)
    try:
        with page_server() as base_url:
            async with async_playwright() as p:
                browser = await p.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
                )
                try:
                    for strategy in strategies:
                        with LAUNCHERS[strategy]() as relay:
                            samples = [
                                await one_run(browser, base_url, strategy, relay.url, run, debug=debug)
                                for run in range(runs)
                            ]
                        ok = [s for s in samples if s["ok"]]
                        results[strategy] = {
                            "runs": runs,
                            "ok": len(ok),
                            **{
                                key: summarise([s[key] for s in ok])
                                for key in (
                                    "both_seconds",
                                    "tab_sees_python_seconds",
                                    "python_sees_tab_seconds",
                                    "first_message_seconds",
                                )
                            },
                            "samples": samples,
                        }
                finally:
                    await browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--debug", action="store_true", help="record the tab's relay traffic of failed runs")
    args = parser.parse_args(argv)
    if not os.access(CHROMIUM, os.X_OK):
        print(f"Chromium not found at {CHROMIUM}", file=sys.stderr)
        return 1
    subprocess.run([str(ROOT / "scripts" / "build-web.sh")], check=True)

    results = asyncio.run(bench(args.strategies, args.runs, debug=args.debug))
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "loopback_only_namespace": loopback_only(),
            "chromium": subprocess.run(
                [CHROMIUM, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
        },
        "what": "Chromium tab (real @trystero-p2p 0.25.3) and a Python Room join at once"
        " -> both see the other",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{'strategy':<9} {'ok':>5} {'both median':>12} {'min':>7} {'max':>7} "
        f"{'tab med':>8} {'py med':>7} {'msg med':>8}"
    )
    for strategy, r in results.items():
        both, tab_s, py_s, msg = (r[k] for k in ("both_seconds", "tab_sees_python_seconds",
                                                  "python_sees_tab_seconds", "first_message_seconds"))
        if both is None:
            print(f"{strategy:<9} {r['ok']:>2}/{r['runs']:<2} (no successful run)")
            continue
        print(
            f"{strategy:<9} {r['ok']:>2}/{r['runs']:<2} {both['median']:>11.3f}s {both['min']:>6.3f}s "
            f"{both['max']:>6.3f}s {tab_s['median']:>7.3f}s {py_s['median']:>6.3f}s {msg['median']:>7.3f}s"
        )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hostile-room scenario: a real Node serving a scripted engine, an honest asker calling back
to back, and hostile peers attacking it one after another (``tests/integration/test_abuse.py``
asserts on it in CI, ``bench/abuse.py`` runs it several times and records the figures).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from bench.lab import hostile
from bench.lab.fakes import TimedEngine, expected_ids
from bench.lab.meshkit import Asker, CallRecord, join_room, median, node_settings, start_node
from signaling.adapters.memory import MemoryHub

__all__ = ["RATE", "RATE_FLOOR", "TOKENS", "TTFT_BOUND_SECONDS", "check_complete", "run_scenario"]

RATE = 50.0
TOKENS = 40
TTFT_BOUND_SECONDS = 0.25
"""Median TTFT under abuse may exceed the baseline median by at most this much."""
RATE_FLOOR = 0.8
"""Median token rate under abuse must stay at or above this fraction of the baseline."""


def check_complete(record: CallRecord) -> None:
    assert record.result is not None and record.result.status == "ok", record.result
    assert record.ids == expected_ids(TOKENS)
    assert record.finish_reason == "length" and record.end_reason == "length"


async def run_scenario(app: str) -> dict[str, Any]:
    """The whole scenario (also run by bench/abuse.py); returns its figures."""
    hub = MemoryHub()
    # The honest peer calls back to back for the whole scenario (~60-120 calls a minute on a busy
    # machine): above the default 30 calls/minute, which is for humans. The flood is still caught
    # by the strike and message-rate limits.
    settings = node_settings(app, **{"legion.calls_per_minute": 1000})
    engine = TimedEngine(rate=RATE, tokens=TOKENS)
    running = await start_node(settings, engine, relays=[hub.relay()])
    node_room = running.node.room
    service = running.node.service
    assert node_room is not None and service is not None
    rooms = []

    async def join() -> Any:
        room = await join_room(settings, relays=[hub.relay()])
        rooms.append(room)
        return room

    honest_room = await join()
    await honest_room.wait_for_peers(1, 30)
    honest = Asker(honest_room, running.peer_id)
    figures: dict[str, Any] = {"rate_tokens_per_second": RATE, "tokens_per_call": TOKENS}
    try:
        baseline = [await honest.call({"user": "baseline", "max_tokens": TOKENS}) for _ in range(4)]
        for record in baseline:
            check_complete(record)

        stop = asyncio.Event()
        during: list[CallRecord] = []

        async def honest_loop() -> None:
            while not stop.is_set():
                during.append(await honest.call({"user": "honest", "max_tokens": TOKENS}))

        loop_task = asyncio.create_task(honest_loop())
        attacks: dict[str, Any] = {}
        node_id = running.peer_id
        run = functools.partial(hostile.attack, join, node_id)
        attacks["tc_flood"] = await run(hostile.tc_flood)
        attacks["huge_action_100MB"] = await run(hostile.huge_action)
        attacks["long_prompt_10k_tokens"] = await run(hostile.long_prompt)
        attacks["invalid_utf8"] = await run(hostile.invalid_utf8)
        attacks["nested_json"] = await run(hostile.nested_json)
        attacks["unknown_actions"] = await run(lambda h: hostile.unknown_actions(h, node_room))
        attacks["forged_from"] = await run(lambda h: hostile.forged_from(h, honest_room.self_id))
        live = [cid for cid, rec in honest.calls.items() if not rec.done.is_set()]
        attacks["foreign_streams"] = await run(lambda h: hostile.foreign_streams(h, live + list(honest.calls)[:3]))
        attacks["partial_chunks"] = await run(
            lambda h: hostile.partial_chunks(h, node_room, node_room.config.max_pending_messages_per_peer))
        stop.set()
        async with asyncio.timeout(30):
            await loop_task

        for record in during:
            check_complete(record)
        assert honest.foreign_frames == 0
        assert not running.task.done()
        assert honest_room.self_id in node_room.peers

        def stats(records: list[CallRecord]) -> dict[str, float]:
            return {"calls": len(records),
                    "ttft_ms_median": round(1000 * median([r.ttft or 0 for r in records]), 2),
                    "ttft_ms_max": round(1000 * max(r.ttft or 0 for r in records), 2),
                    "tokens_per_second_median": round(median([r.tokens_per_second or 0 for r in records]), 2)}

        figures.update(attacks=attacks, honest_without_abuse=stats(baseline), honest_during_abuse=stats(during),
                       streams_held_during_abuse=len(during), tokens_lost=0,
                       node={"peers_dropped": node_room._mesh.dropped_peers,
                             "service_strikes": service.strikes, "reassembler_drops": node_room._reassembler.dropped,
                             "pending_bytes_after": node_room._reassembler.pending_bytes})
        return figures
    finally:
        await honest.close()
        for room in rooms:
            await room.leave()
        await running.shutdown()



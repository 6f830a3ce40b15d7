"""Issue 8 §2: a hostile room member attacks a serving node while an honest peer streams.

A real Node (real Room, real aiortc on 127.0.0.1, MemoryHub signalling) serves a scripted engine
with real timing (bench/lab/fakes.py: the model is irrelevant to these limits). An honest asker runs
engine_run calls back to back; hostile peers (a fresh id per attack, bench/lab/hostile.py) flood `tc`,
send a 100 MB action, a 10k-token prompt, invalid UTF-8, deeply nested JSON, unknown actions, a
forged `from`, END envelopes for the honest peer's streams and endless partial chunks.

Asserted: every attack gets its documented reaction (clear error, dropped message, or the peer
dropped and banned); every honest stream arrives complete (all ids, in order, done frame, ok
result: nothing lost); the honest peer's median time to first token stays within
TTFT_BOUND_SECONDS of the unattacked baseline and its median token rate within RATE_FLOOR of it.
Hostile peers run in the same process and event loop as the node, so their own CPU time counts
against the honest figures (a pessimistic setting).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from bench.lab import hostile
from bench.lab.abuse import RATE_FLOOR, TTFT_BOUND_SECONDS, run_scenario
from bench.lab.meshkit import Asker, join_room, median, node_settings, start_node
from signaling.adapters.memory import MemoryHub
from signaling.protocol.names import gen_id
from tests.fixtures_model import embedded_loaded  # noqa: F401

pytestmark = pytest.mark.integration

def app_id(request: pytest.FixtureRequest) -> str:
    return "abuse-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-40:] + "-" + gen_id(6)


async def test_hostile_peers_cannot_hurt_the_honest_one(request: pytest.FixtureRequest) -> None:
    async with asyncio.timeout(150):
        figures = await run_scenario(app_id(request))
    base, abused = figures["honest_without_abuse"], figures["honest_during_abuse"]
    print("abuse figures:", figures)
    assert figures["streams_held_during_abuse"] >= 3
    assert abused["ttft_ms_median"] <= base["ttft_ms_median"] + 1000 * TTFT_BOUND_SECONDS
    assert abused["tokens_per_second_median"] >= RATE_FLOOR * base["tokens_per_second_median"]
    attacks = figures["attacks"]
    for name in ("tc_flood", "huge_action_100MB", "partial_chunks"):
        assert attacks[name]["dropped"], name
    assert attacks["huge_action_100MB"]["bytes_sent_before_drop"] < 8 * 1024 * 1024
    assert attacks["tc_flood"]["ok_replies"] == 0
    for name in ("long_prompt_10k_tokens", "unknown_actions", "foreign_streams"):
        assert not attacks[name]["dropped"], name
    assert figures["node"]["pending_bytes_after"] <= 2 * 1024 * 1024


REAL_TTFT_BOUND_SECONDS = 1.5
"""Real model: the flood burst (1000 messages through the node's Python SCTP stack, in the same
process as the attacker, plus the two streams the flooder may start before it is dropped) costs
the honest peer's next first token about 0.6 s on 2 cores (measured); the bound leaves room."""
REAL_RATE_FLOOR = 0.5


@pytest.mark.model
@pytest.mark.timeout(420)
async def test_real_model_honest_peer_under_flood(embedded_loaded: Any, request: pytest.FixtureRequest) -> None:
    """The one abuse test with the real model (embedded SmolLM2): each honest call runs while one
    attack happens (a 1000-call tc flood, a 60k-character prompt); the answers stay identical to the
    unattacked ones and TTFT / token rate stay within the bounds above."""
    from tests.fixtures_model import make_backend

    hub = MemoryHub()
    settings = node_settings(app_id(request))
    attacks = {"tc_flood": hostile.tc_flood, "long_prompt": lambda h: hostile.long_prompt(h, chars=60_000)}
    async with asyncio.timeout(400):
        engine = make_backend(embedded_loaded, max_concurrent=4)
        async with engine:
            running = await start_node(settings, engine, relays=[hub.relay()])
            rooms = []

            async def join() -> Any:
                room = await join_room(settings, relays=[hub.relay()])
                rooms.append(room)
                return room

            try:
                honest_room = await join()
                await honest_room.wait_for_peers(1, 30)
                honest = Asker(honest_room, running.peer_id)
                args = {"user": "Name three primary colours.", "max_tokens": 16, "temperature": 0}
                base = [await honest.call(args, timeout=120) for _ in range(2)]
                during, outcomes = [], {}
                for name, attack in attacks.items():
                    task = asyncio.create_task(hostile.attack(join, running.peer_id, attack))
                    while len(rooms) < 2 + len(outcomes) and not task.done():
                        await asyncio.sleep(0.01)  # the attacker is in; its attack is starting
                    during.append(await honest.call(args, timeout=120))
                    outcomes[name] = await task
                await honest.close()
            finally:
                for room in rooms:
                    await room.leave()
                await running.shutdown()
    assert outcomes["tc_flood"]["dropped"] and outcomes["long_prompt"]["status"] == "error"
    for record in base + during:
        assert record.result is not None and record.result.status == "ok" and record.ids == base[0].ids
    ttft_base, ttft_during = median([r.ttft or 0 for r in base]), max(r.ttft or 0 for r in during)
    rate_base = median([r.tokens_per_second or 0 for r in base])
    rate_during = min(r.tokens_per_second or 0 for r in during)
    print({"real_model_ttft_ms_without_abuse": round(1000 * ttft_base), "ttft_ms_during_abuse_worst": round(1000 * ttft_during),
           "tokens_per_second_without": round(rate_base, 2), "tokens_per_second_during_worst": round(rate_during, 2)})
    assert ttft_during <= ttft_base + REAL_TTFT_BOUND_SECONDS
    assert rate_during >= REAL_RATE_FLOOR * rate_base

"""Many meshnodes in one room: the tab's choice (freshest available cap), a node stepping back for a
lighter one, and load caps to the other meshnodes (tests/integration/test_room_many.py runs it for real)."""

from __future__ import annotations

import asyncio

from meshnode.legion.client import pick_order
from meshnode.legion.service import LegionService
from meshnode.wire import legion
from tests.unit.test_services import FakeEngine, FakeRoom, FakeStream, Msg, _cap, call, make_service

LOWER, HIGHER = "A" * 20, "Z" * 20
"""Sibling ids below and above the fake room's own id ("M" * 20)."""


def test_pick_order_is_the_freshest_available_engine_peer() -> None:
    no_engine = legion.parse_cap(legion.build_cap(ts_ms=1, nick="t", model_id="m", available=True, skills=[],
                                                  system_prompt_summary="", tools=[]))
    caps = {"old": (_cap(), 1.0), "new": (_cap(active=3), 3.0), "busy": (_cap(available=False), 9.0),
            "tab": (no_engine, 8.0), "also-new": (_cap(), 3.0)}
    # The load a meshnode advertises is not read; ties on arrival go by peer id.
    assert pick_order(caps) == ["also-new", "new", "old"]
    assert pick_order({}) == []


def sibling(service: LegionService, peer_id: str, *, available: bool = True, active: int = 0,
            verified: bool = True) -> None:
    entry = service.roster.update(peer_id, _cap(available=available, active=active))
    entry.verified_at = service.clock() if verified else None


def load(engine: FakeEngine, streams: int) -> None:
    engine.streams = [FakeStream([1], None) for _ in range(streams)]  # max_concurrent 8, max_queue 4


def test_a_node_steps_back_for_a_lighter_meshnode_that_has_shown_it_serves() -> None:
    engine = FakeEngine()
    service = make_service(FakeRoom(), engine)
    load(engine, 1)  # 1/8 of its slots
    assert service.is_available() and service.yields_to() is None  # alone in the room
    sibling(service, LOWER, active=0, verified=False)
    sibling(service, HIGHER, active=0, available=False)
    assert service.yields_to() is None  # unverified, or unavailable: no reason to step back
    sibling(service, LOWER, active=0)
    assert service.yields_to() == LOWER and not service.is_available() and service.has_capacity()
    # Towards a larger id only when lighter by more than one of its calls (1/4 of its 4 slots).
    sibling(service, LOWER, available=False)
    sibling(service, HIGHER, active=0)
    assert service.yields_to() is None
    load(engine, 3)  # 3/8 > 0 + 1/4
    assert service.yields_to() == HIGHER
    sibling(service, HIGHER, active=2)  # 2/4 > 3/8: no longer lighter
    assert service.yields_to() is None and service.is_available()
    load(engine, 12)  # full (8 slots + 4 queued): unavailable whatever the room says
    assert not service.has_capacity() and not service.is_available()


async def test_load_caps_go_to_meshnodes_and_a_lighter_one_flips_the_broadcast_cap() -> None:
    room, engine = FakeRoom(), FakeEngine()
    engine.gate = asyncio.Event()  # streams stay open
    service = make_service(room, engine)
    sibling(service, LOWER, active=0)
    sibling(service, "B" * 20, verified=False)  # claims to be a meshnode, never served a probe
    task = asyncio.create_task(service.run())
    caps = room.make_action("cap")
    try:
        async with asyncio.timeout(5):
            await caps.wait_for(lambda item: item[1] is None)  # the first heartbeat
            room.actions["tc"].inbox.put_nowait(Msg("T" * 20, call("c1", "engine_run", {"user": "hi"})))
            payload, _ = await caps.wait_for(lambda item: item[1] == LOWER and item[0]["load"]["active"] == 1)
            assert not [target for _, target in caps.sent if target == "B" * 20]
            # The sibling is lighter (0 < 1/8) and available: this node's broadcast cap says unavailable.
            flipped, _ = await caps.wait_for(lambda item: item[1] is None and not item[0]["available"])
            assert flipped["load"]["active"] == 1
            # The sibling's cap says it took three calls: this node is the lighter one again.
            busy = _cap(active=3).raw
            room.actions["cap"].inbox.put_nowait(Msg(LOWER, busy))
            back, _ = await caps.wait_for(lambda item: item[1] is None and item[0]["available"]
                                          and item[0]["load"]["active"] == 1)
            assert back["available"]
    finally:
        engine.gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

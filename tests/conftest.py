"""Shared pytest fixtures. Each engineer keeps fixtures in a clearly marked section."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab import relays
from meshnode.transport.ice import IcePolicy, apply_ice_policy

# aioice's host addresses are process-wide (meshnode.transport.ice): every test process serves and
# connects on loopback only, as the namespace it runs in has nothing else.
apply_ice_policy(IcePolicy(host_addresses_mode="only", host_addresses=("127.0.0.1",)))


def pytest_configure(config: pytest.Config) -> None:
    """Under CI (MESHNODE_REQUIRE_NETNS=1) refuse to run anywhere but a loopback-only namespace."""
    if os.environ.get("MESHNODE_REQUIRE_NETNS") != "1":
        return
    # /proc/net/dev belongs to this process's namespace; /sys/class/net shows the namespace that
    # mounted sysfs (the host's, under a bare `unshare -n`).
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    interfaces = sorted(line.split(":", 1)[0].strip() for line in lines)
    if interfaces != ["lo"]:
        raise pytest.UsageError(f"MESHNODE_REQUIRE_NETNS=1 but this network namespace has {interfaces}: run the "
                                "suite through scripts/test.sh (unshare -n), never on the host network")

# ------------------------------------------------------------------------------------------------
# Local relays (owner: signaling relays). Real relays on free 127.0.0.1 ports, see bench/lab/relays.py.
#
# Session scope (started once, shared; tests must NOT stop or restart them):
#   mqtt_broker    mosquitto: .ws_url (= .url), .tcp_url
#   nostr_server   nostr-relay: .url
#   tracker_server bittorrent-tracker: .url
#   wsrelay_server meshnode's WsRelayServer in a child process: .url
# Function scope (a private relay per test; .stop()/.restart() or .astop()/.arestart() freely):
#   mqtt_broker_fresh, nostr_server_fresh, tracker_server_fresh, wsrelay_server_fresh
# Every relay is killed (whole process group) at the end, also when the test failed.
# Use unique topics per test (e.g. derived from request.node.name) on the shared relays.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[relays.MosquittoRelay]:
    """mosquitto with a WebSocket and a TCP listener, shared by the session."""
    with relays.mosquitto_relay() as broker:
        yield broker


@pytest.fixture
def mqtt_broker_fresh() -> Iterator[relays.MosquittoRelay]:
    """A private mosquitto for one test (may be stopped and restarted)."""
    with relays.mosquitto_relay() as broker:
        yield broker


@pytest.fixture(scope="session")
def nostr_server() -> Iterator[relays.Relay]:
    """nostr-relay with a fresh sqlite database, shared by the session."""
    with relays.nostr_relay() as server:
        yield server


@pytest.fixture
def nostr_server_fresh() -> Iterator[relays.Relay]:
    """A private nostr-relay for one test (may be stopped and restarted; ~3 s to start)."""
    with relays.nostr_relay() as server:
        yield server


@pytest.fixture(scope="session")
def tracker_server() -> Iterator[relays.Relay]:
    """bittorrent-tracker (WebSocket + HTTP), shared by the session."""
    with relays.tracker_relay() as server:
        yield server


@pytest.fixture
def tracker_server_fresh() -> Iterator[relays.Relay]:
    """A private bittorrent-tracker for one test (may be stopped and restarted)."""
    with relays.tracker_relay() as server:
        yield server


@pytest.fixture(scope="session")
def wsrelay_server() -> Iterator[relays.Relay]:
    """meshnode's ws-relay server in a child process, shared by the session."""
    with relays.wsrelay_relay() as server:
        yield server


@pytest.fixture
def wsrelay_server_fresh() -> Iterator[relays.Relay]:
    """A private ws-relay server process for one test (may be stopped and restarted)."""
    with relays.wsrelay_relay() as server:
        yield server


# ------------------------------------------------------------------------------------------------
# end of section: local relays
# ------------------------------------------------------------------------------------------------

"""The bench's network: three namespaces, a TURN relay, a shaped link and kernel byte counters.

Topology (every address lives only inside namespaces this module creates and deletes)::

    [node ns] 10.77.1.2 --veth (shaped)-- 10.77.1.1 [relay ns] 10.77.2.1 --veth-- 10.77.2.2 [peers ns]
                                          coturn :3478 (both addresses, relay sockets on 10.77.1.1)
                                          ws-relay signalling :8765

* All data-channel traffic goes through **coturn** (a real TURN relay): every bench peer uses the
  ``relay`` ICE transport policy, and the relay namespace does not forward packets, so no direct
  path exists.
* The byte-rate cap is a **token bucket (tc tbf)** on both directions of the node's link to the
  relay. coturn's own limit (``--max-bps``) is a per-allocation policer that drops everything past
  the budget of the current second, and aiortc opens one allocation per peer connection, so it
  cannot express one budget shared by all streams; ``shaper="coturn"`` still offers it (budget
  split evenly over the expected allocations) for comparison.
* Bytes and packets are counted **at the link** by nftables counters on the receiving end of each
  direction (the relay's input for node→relay, the node's input for relay→node): IP packets of
  the TURN traffic (IP + UDP + TURN ChannelData + DTLS + SCTP + payload) that crossed the link.
  The sending ends count what was offered (including packets the shaper dropped), and tbf's drop
  counters come along. Nothing is counted by the application.

Requires root (namespaces, veth, tc, nft) and the Debian packages ``coturn``, ``nftables`` and
``iproute2``. Every process is started in its own session and killed by process group; namespaces
are deleted on close, and stale ones from dead bench runs are removed on start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from meshnode.errors import MeshError

logger = logging.getLogger(__name__)

NODE_IP, RELAY_NODE_IP = "10.77.1.2", "10.77.1.1"
PEERS_IP, RELAY_PEERS_IP = "10.77.2.2", "10.77.2.1"
TURN_PORT = 3478
SIGNAL_PORT = 8765
TURN_USER, TURN_PASSWORD, TURN_REALM = "bench", "bench", "bench.lab"
NS_PREFIX = "mnb"
COMMAND_TIMEOUT_SECONDS = 10.0
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
NFT_TABLE = "meshbench"

Shaper = Literal["tbf", "coturn", "none"]


class LabError(MeshError):
    """The bench network could not be built (not root, a tool missing, a command failed)."""


@dataclass(frozen=True)
class LinkCounters:
    """Kernel counters of the node's link to the relay at one instant (IP bytes, TURN traffic only)."""

    up_bytes: int
    """Bytes from the node that reached the relay (counted on the relay's input)."""
    up_packets: int
    down_bytes: int
    """Bytes from the relay that reached the node (counted on the node's input)."""
    down_packets: int
    up_offered_bytes: int
    """Bytes the node sent (counted on its output, before the shaper: includes dropped packets)."""
    up_offered_packets: int
    down_offered_bytes: int
    down_offered_packets: int
    up_drops: int
    """Packets the node-side shaper dropped."""
    down_drops: int
    """Packets the relay-side shaper dropped."""
    when: float

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


def missing_requirements() -> list[str]:
    """What keeps the lab from running here (empty when it can run)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root is needed (network namespaces, veth, tc, nft)")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (Debian package {package})")
    return problems


def _run(args: list[str], *, check: bool = True, input_text: str | None = None) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
                              input=input_text, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(args)}: timed out") from exc
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete ``mnb<pid>-*`` namespaces whose bench process is gone (a run that was SIGKILLed)."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NS_PREFIX) or "-" not in name:
            continue
        owner = name[len(NS_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not _pid_alive(int(owner)):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    if removed:
        logger.info("removed stale bench namespaces: %s", ", ".join(removed))
    return removed


class NetLab:
    """Builds the topology on :meth:`start` and tears everything down on :meth:`close`.

    Use as a context manager. ``close`` is idempotent and also runs when ``start`` fails halfway.

    Args:
        cap_bytes_per_second: the byte-rate cap of the node's link, per direction (0 = no cap).
        shaper: ``tbf`` (token bucket on the link), ``coturn`` (coturn's per-allocation
            ``--max-bps``) or ``none``.
        queue_ms: how much queueing delay the token bucket may build before it drops (tbf latency).
        workdir: where logs of the lab's processes go.
        expected_allocations: for ``shaper="coturn"``: the budget is split over this many
            allocations (one per node-side peer connection).
    """

    def __init__(self, *, cap_bytes_per_second: int, shaper: Shaper = "tbf", queue_ms: int = 200,
                 workdir: Path, expected_allocations: int = 1) -> None:
        self.cap = int(cap_bytes_per_second)
        self.shaper: Shaper = shaper if self.cap > 0 else "none"
        self.queue_ms = queue_ms
        self.workdir = Path(workdir)
        self.expected_allocations = max(1, expected_allocations)
        tag = f"{NS_PREFIX}{os.getpid()}"
        self.ns_relay, self.ns_node, self.ns_peers = f"{tag}-relay", f"{tag}-node", f"{tag}-peers"
        short = f"{os.getpid() % 100000}"
        self._veth = {"node": f"mbn{short}", "relay_node": f"mbrn{short}",
                      "peers": f"mbp{short}", "relay_peers": f"mbrp{short}"}
        self._namespaces: list[str] = []
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._closed = False

    # -- description ----------------------------------------------------------------------------

    @property
    def turn_url_node(self) -> str:
        return f"turn:{RELAY_NODE_IP}:{TURN_PORT}?transport=udp"

    @property
    def turn_url_peers(self) -> str:
        return f"turn:{RELAY_PEERS_IP}:{TURN_PORT}?transport=udp"

    @property
    def signal_url_node(self) -> str:
        return f"ws://{RELAY_NODE_IP}:{SIGNAL_PORT}"

    @property
    def signal_url_peers(self) -> str:
        return f"ws://{RELAY_PEERS_IP}:{SIGNAL_PORT}"

    def describe(self) -> dict[str, object]:
        """What carries and limits the traffic, for the report."""
        version = _run(["turnserver", "--version"], check=False).strip().splitlines()
        limiter = {
            "tbf": f"tc tbf token bucket {self.cap} B/s per direction on the node<->relay veth "
                   f"(queue {self.queue_ms} ms; the bucket counts Ethernet frames, 14 B more per packet "
                   "than the IP bytes reported)",
            "coturn": f"coturn --max-bps {self.cap // self.expected_allocations} B/s per allocation "
                      f"(x{self.expected_allocations}), --bps-capacity {self.cap}",
            "none": "no cap",
        }[self.shaper]
        return {
            "relay": f"coturn {version[0] if version else '?'} (TURN over UDP, relay-only ICE on every peer, "
                     "no IP forwarding in the relay namespace)",
            "limiter": limiter,
            "counted_at": "nftables counters on the receiving end of each direction of the node<->relay link "
                          "(IP packets of the TURN traffic that crossed it; offered bytes and drops separately)",
            "cap_bytes_per_second": self.cap,
            "shaper": self.shaper,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        problems = missing_requirements()
        if problems:
            raise LabError("; ".join(problems))
        self.workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_namespaces()
        try:
            self._build()
            self._start_coturn()
            self._start_signalling()
        except BaseException:
            self.close()
            raise

    def _ns(self, ns: str, *args: str, check: bool = True, input_text: str | None = None) -> str:
        return _run(["ip", "netns", "exec", ns, *args], check=check, input_text=input_text)

    def _build(self) -> None:
        for ns in (self.ns_relay, self.ns_node, self.ns_peers):
            _run(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            self._ns(ns, "ip", "link", "set", "lo", "up")
        v = self._veth
        for a, b, ns_a, ip_a, ip_b in (("node", "relay_node", self.ns_node, NODE_IP, RELAY_NODE_IP),
                                       ("peers", "relay_peers", self.ns_peers, PEERS_IP, RELAY_PEERS_IP)):
            _run(["ip", "link", "add", v[a], "type", "veth", "peer", "name", v[b]])
            _run(["ip", "link", "set", v[a], "netns", ns_a])
            _run(["ip", "link", "set", v[b], "netns", self.ns_relay])
            self._ns(ns_a, "ip", "addr", "add", f"{ip_a}/24", "dev", v[a])
            self._ns(ns_a, "ip", "link", "set", v[a], "up")
            self._ns(ns_a, "ip", "route", "add", "default", "via", ip_b)
            self._ns(self.ns_relay, "ip", "addr", "add", f"{ip_b}/24", "dev", v[b])
            self._ns(self.ns_relay, "ip", "link", "set", v[b], "up")
        # No forwarding in the relay namespace: TURN is the only way between node and peers.
        self._ns(self.ns_relay, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        if self.shaper == "tbf":
            burst = max(3000, self.cap // 50)  # >= 2 full-size frames, ~20 ms of rate at most
            for ns, dev in ((self.ns_node, v["node"]), (self.ns_relay, v["relay_node"])):
                self._ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.cap * 8}bit",
                         "burst", str(burst), "latency", f"{self.queue_ms}ms")
        node_rules = f"""
table inet {NFT_TABLE} {{
  counter up_offered {{ }}
  counter down {{ }}
  chain out {{ type filter hook output priority 0; policy accept; udp dport {TURN_PORT} counter name "up_offered"; }}
  chain in {{ type filter hook input priority 0; policy accept; udp sport {TURN_PORT} counter name "down"; }}
}}
"""
        relay_rules = f"""
table inet {NFT_TABLE} {{
  counter up {{ }}
  counter down_offered {{ }}
  chain in {{ type filter hook input priority 0; policy accept;
    iifname "{v['relay_node']}" udp dport {TURN_PORT} counter name "up"; }}
  chain out {{ type filter hook output priority 0; policy accept;
    oifname "{v['relay_node']}" udp sport {TURN_PORT} counter name "down_offered"; }}
}}
"""
        self._ns(self.ns_node, "nft", "-f", "-", input_text=node_rules)
        self._ns(self.ns_relay, "nft", "-f", "-", input_text=relay_rules)

    def _start_coturn(self) -> None:
        args = [
            "turnserver", "-n", "--no-cli", "--no-tls", "--no-dtls", "--no-rfc5780",
            "--listening-ip", RELAY_NODE_IP, "--listening-ip", RELAY_PEERS_IP, "--relay-ip", RELAY_NODE_IP,
            "--listening-port", str(TURN_PORT), "--min-port", "40000", "--max-port", "59999",
            "--lt-cred-mech", "--user", f"{TURN_USER}:{TURN_PASSWORD}", "--realm", TURN_REALM, "--fingerprint",
            "--no-software-attribute", "--no-multicast-peers", "--simple-log", "--no-stdout-log",
            "--log-file", str(self.workdir / "coturn.log"), "--pidfile", str(self.workdir / "coturn.pid"),
        ]
        if self.shaper == "coturn":
            args += ["--max-bps", str(self.cap // self.expected_allocations), "--bps-capacity", str(self.cap)]
        self.spawn(self.ns_relay, args, "coturn")
        self._wait_port(self.ns_relay, TURN_PORT, "udp")

    def _start_signalling(self) -> None:
        import sys

        self.spawn(self.ns_relay, [sys.executable, "-m", "bench.lab.roles", "signal", "--host", "0.0.0.0",
                                   "--port", str(SIGNAL_PORT)], "signal")
        self._wait_port(self.ns_relay, SIGNAL_PORT, "tcp")

    def _wait_port(self, ns: str, port: int, proto: str) -> None:
        flag = "-lun" if proto == "udp" else "-ltn"
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            for name, process in self._processes:
                if process.poll() is not None:
                    raise LabError(f"{name} exited with {process.returncode}; see {self.workdir}/{name}.log")
            if f":{port} " in self._ns(ns, "ss", "-H", flag, check=False):
                return
            time.sleep(0.1)  # process start-up: nothing to await but the socket appearing
        raise LabError(f"nothing listens on {proto} port {port} after {START_TIMEOUT_SECONDS:.0f} s")

    def spawn(self, ns: str, argv: list[str], name: str, *, stdin: int | None = subprocess.DEVNULL,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside namespace `ns` in its own session; the lab kills it on close."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=stdin,
                                   stdout=stdout if stdout is not None else log, stderr=log,
                                   start_new_session=True, cwd=Path(__file__).resolve().parents[2])
        log.close()
        self._processes.append((name, process))
        return process

    def forget(self, process: subprocess.Popen[bytes]) -> None:
        """A process that its owner has stopped itself."""
        self._processes = [(n, p) for n, p in self._processes if p is not process]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, process in reversed(self._processes):
            stop_process(process)
        self._processes.clear()
        for ns in reversed(self._namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()

    # -- measurement ------------------------------------------------------------------------------

    def counters(self) -> LinkCounters:
        """Read the link's counters now."""
        found: dict[str, tuple[int, int]] = {}
        for ns in (self.ns_node, self.ns_relay):
            data = json.loads(self._ns(ns, "nft", "-j", "list", "counters", "table", "inet", NFT_TABLE))
            for item in data.get("nftables", []):
                counter = item.get("counter")
                if counter:
                    found[counter["name"]] = (int(counter["bytes"]), int(counter["packets"]))
        drops = {}
        for key, ns, dev in (("up", self.ns_node, self._veth["node"]),
                             ("down", self.ns_relay, self._veth["relay_node"])):
            drops[key] = 0
            if self.shaper == "tbf":
                stats = json.loads(_run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]) or "[]")
                drops[key] = sum(int(q.get("drops", 0)) for q in stats)
        return LinkCounters(
            up_bytes=found["up"][0], up_packets=found["up"][1], down_bytes=found["down"][0],
            down_packets=found["down"][1], up_offered_bytes=found["up_offered"][0],
            up_offered_packets=found["up_offered"][1], down_offered_bytes=found["down_offered"][0],
            down_offered_packets=found["down_offered"][1], up_drops=drops["up"], down_drops=drops["down"],
            when=time.monotonic())


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout)

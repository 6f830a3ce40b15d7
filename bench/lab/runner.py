"""`meshnode bench`: run trials through the lab and find, per mode, the largest N that meets the
service level.

A trial = a node in a fresh room (the long-lived bench node process, or for ``node`` mode a fresh
``meshnode join`` process) and tab processes in the peers namespace: N streams on tabs of S
streams each (S = 1 by default, as in a Legion room), most of them connected before the streams
start, the rest (``late_fraction``) joining during the trial. The link counters are read right
before the streams start and right after the last one ends. Per mode the search grows N (guided
by the measured link utilisation) until a trial fails, bisects between the last pass and the
first failure, then offers ``overload`` × capacity to see how much goodput admission keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.lab.metrics import ServiceLevel, trial_metrics
from bench.lab.modes import DEFAULT_MODES, MODES
from bench.lab.netlab import LabError, LinkCounters, NetLab, Shaper
from bench.lab.source import DEFAULT_COMPLETION_PATH, Completion
from meshnode.errors import MeshError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NODE_CONFIG = ROOT / "configs" / "uplink-50KBps.toml"
UPSTREAM_PORT = 8931
GO_LEAD_SECONDS = 0.5
"""The tab processes start their streams this long after the runner says go (one shared origin)."""
NODE_START_TIMEOUT_SECONDS = 180.0
NODE_READY_TIMEOUT_SECONDS = 60.0
PEERS_READY_BASE_SECONDS = 45.0
PEERS_READY_PER_PEER_SECONDS = 1.5
RESULT_SLACK_SECONDS = 30.0
STATS_TIMEOUT_SECONDS = 15.0
PROCESS_STOP_SECONDS = 15.0
STREAM_LIMIT_BYTES = 256 * 1024 * 1024
SAMPLE_SECONDS = 1.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BenchError(MeshError):
    """A trial could not run (a process did not start, answer or stop in time)."""


@dataclass(kw_only=True)
class BenchConfig:
    """Everything one `meshnode bench` run needs."""

    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    cap_bytes_per_second: int = 50_000
    shaper: Shaper = "tbf"
    queue_ms: int = 200
    rate: float = 30.0
    tokens: int | None = None
    """Tokens per stream (default: the whole recorded completion)."""
    streams_per_peer: int = 1
    late_fraction: float = 0.1
    """Share of the streams whose tabs join the room during the trial (connections while others stream)."""
    tab_processes: int = 2
    """Processes the tabs are spread over (pure-Python WebRTC costs the requester side CPU too)."""
    idle_seconds: float = 0.0
    """Before the streams start, measure the connected tabs' idle upkeep for this long (0: skip)."""
    node_config: Path = DEFAULT_NODE_CONFIG
    """The node's TOML settings (``meshnode join --config``); the bench adds room, ICE and --uplink."""
    start_streams: int = 6
    """First N of the search; paced modes start at ``streams_per_peer`` (at least), so the first
    trial already has the per-peer mix that the node's capacity estimate extrapolates."""
    max_streams: int = 400
    fixed_streams: list[int] | None = None
    """Run exactly these N per mode instead of searching."""
    refine_steps: int = 2
    overload: float = 2.0
    arrival_rate: float = 20.0
    """New streams per second while a trial ramps up (N streams start over N / arrival_rate s)."""
    completion: Path = DEFAULT_COMPLETION_PATH
    slo: ServiceLevel = field(default_factory=ServiceLevel)
    workdir: Path = Path("/tmp/meshnode-bench")

    def expected_tokens(self) -> int:
        length = len(Completion.load(self.completion).ids)
        return min(self.tokens, length) if self.tokens else length

    def deadline_seconds(self, streams: int) -> float:
        # A stream that needs longer than this is below the service level's rate anyway.
        return self.ramp_seconds(streams) + self.expected_tokens() / self.slo.min_rate + 5.0

    def ramp_seconds(self, streams: int) -> float:
        return streams / self.arrival_rate

    def late_at(self, streams: int) -> float:
        """When the first late tab joins: half-way through the ramp, at least 3 s into the trial."""
        return max(3.0, self.ramp_seconds(streams) / 2)


def split(streams: int, per_peer: int, late_fraction: float) -> tuple[list[int], list[int]]:
    """(streams per early tab, streams per late tab) for N streams."""
    late = int(round(streams * late_fraction)) if streams >= 10 else 0
    late_tabs = layout(late, per_peer) if late else []
    return layout(streams - sum(late_tabs), per_peer), late_tabs


def layout(streams: int, per_peer: int) -> list[int]:
    """Streams per peer: `per_peer` each, the last peer takes the remainder."""
    full, rest = divmod(streams, per_peer)
    return [per_peer] * full + ([rest] if rest else [])


class _Child:
    """A role process inside a namespace, speaking JSON lines."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.log_messages: deque[str] = deque(maxlen=500)
        """A meshnode process's last log messages (JSON log lines on stderr)."""
        self._marked = asyncio.Event()
        self._tee: asyncio.Task[None] | None = None

    def tee_stderr(self, log: Any, marker: str) -> None:
        """Copy stderr to `log`; the first message containing `marker` is the ``log-match`` event."""
        self._tee = asyncio.get_running_loop().create_task(self._pump(log, marker), name=f"bench.tee[{self.name}]")

    async def _pump(self, log: Any, marker: str) -> None:
        assert self.process.stderr is not None
        try:
            async for line in self.process.stderr:
                log.write(line)
                log.flush()
                try:
                    message = str(json.loads(line).get("msg", ""))
                except (ValueError, AttributeError):
                    message = line.decode(errors="replace")
                self.log_messages.append(message)
                if marker in message:
                    self._marked.set()
        finally:
            log.close()

    def last_json(self, prefix: str) -> Any:
        """The JSON after `prefix` in the last log message that starts with it (None if none)."""
        for message in reversed(self.log_messages):
            if message.startswith(prefix):
                with contextlib.suppress(ValueError):
                    return json.loads(message[len(prefix):])
        return None

    async def event(self, wanted: str, timeout: float) -> dict[str, Any]:
        if self._tee is not None:  # a meshnode process: its events are log lines
            return await self._log_event(wanted, timeout)
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.process.stdout.readline()
                    if not line:
                        raise BenchError(f"{self.name} exited (code {await self.process.wait()}) before '{wanted}'")
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(message, dict) and message.get("event") == wanted:
                        return message
        except TimeoutError:
            raise BenchError(f"{self.name}: no '{wanted}' within {timeout:.0f} s") from None

    async def _log_event(self, wanted: str, timeout: float) -> dict[str, Any]:
        assert self._tee is not None and wanted == "log-match"
        marked = asyncio.ensure_future(self._marked.wait())
        try:
            await asyncio.wait([marked, self._tee], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            marked.cancel()
        if self._marked.is_set():
            return {"event": wanted}
        last = self.log_messages[-1] if self.log_messages else "no log"
        if self._tee.done():
            raise BenchError(f"{self.name} exited (code {await self.process.wait()}): {last}")
        raise BenchError(f"{self.name}: not serving within {timeout:.0f} s (last log: {last})")

    async def say(self, line: str) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.process.stdin.write(line.encode() + b"\n")
            await self.process.stdin.drain()

    async def stop(self) -> None:
        """Close stdin (the role's stop signal), then SIGTERM and SIGKILL its process group."""
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        # meshnode itself stops on SIGTERM (it drains and leaves); the bench roles on EOF.
        first = (signal.SIGTERM, PROCESS_STOP_SECONDS) if self._tee is not None else (None, PROCESS_STOP_SECONDS)
        for sig, wait in (first, (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
            try:
                async with asyncio.timeout(wait):
                    await self.process.wait()
                break
            except TimeoutError:
                continue
        if self._tee is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._tee


class Bench:
    """Runs the trials of one configuration inside one lab."""

    def __init__(self, config: BenchConfig, lab: NetLab, *, on_trial: Callable[[dict[str, Any]], None] | None = None,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.lab = lab
        self.on_trial = on_trial or (lambda trial: None)
        self.on_status = on_status or (lambda text: None)
        self.trials: list[dict[str, Any]] = []
        self._children: list[_Child] = []
        self._expected = config.expected_tokens()
        self._node: _Child | None = None
        self._upstream: _Child | None = None

    async def _node_process(self) -> _Child:
        """The long-lived bench node (imports and the replay load once); restarted if it died."""
        if self._node is not None and self._node.process.returncode is None:
            return self._node
        if self._node is not None:
            self._children.remove(self._node)
        self._node = await self._spawn("node", self.lab.ns_node, ["-m", "bench.lab.roles", "node",
                                       "--signal", self.lab.signal_url_node, "--turn", self.lab.turn_url_node,
                                       "--config", str(self.config.node_config),
                                       "--completion", str(self.config.completion)])
        await self._node.event("started", NODE_START_TIMEOUT_SECONDS)
        return self._node

    async def _upstream_process(self) -> str:
        """The Codec-HTTP upstream that `node` mode's meshnode join fronts (in the node namespace)."""
        if self._upstream is None or self._upstream.process.returncode is not None:
            if self._upstream is not None:
                self._children.remove(self._upstream)
            self._upstream = await self._spawn("upstream", self.lab.ns_node, [
                "-m", "bench.lab.roles", "upstream", "--port", str(UPSTREAM_PORT), "--rate", str(self.config.rate),
                "--tokens", str(self._expected), "--completion", str(self.config.completion)])
            await self._upstream.event("started", NODE_START_TIMEOUT_SECONDS)
        return f"http://127.0.0.1:{UPSTREAM_PORT}"

    async def _join_process(self, room: str, index: int) -> _Child:
        """`meshnode join` exactly as a user runs it on this link: the node's config file, the lab's
        room and TURN relay, --uplink set to the link's cap, in front of the upstream."""
        from bench.lab.roles import APP_ID, turn_server, workload_flags
        from meshnode.cli.config import env_name

        url = await self._upstream_process()
        config = self.config
        argv = ["-m", "meshnode", "join", "--config", str(config.node_config), "--room", room, "--app-id", APP_ID,
                "--strategy", "ws-relay", "--relay", self.lab.signal_url_node,
                "--ice-server", turn_server(self.lab.turn_url_node), "--ice-transport-policy", "relay",
                "--uplink", f"{config.cap_bytes_per_second}B/s", "--engine-url", url, "--log-format", "json"]
        # The workload's other needs (calls per tab, answer length) go in the environment, as a user would.
        env = {env_name(key): str(value) for key, value in workload_flags(
            budget=config.cap_bytes_per_second, streams_per_tab=config.streams_per_peer,
            tokens=self._expected).items() if key[0] != "link"}
        child = await self._spawn(f"join-{index}", self.lab.ns_node, argv, env=env, watch_stderr="serving ")
        await child.event("log-match", NODE_START_TIMEOUT_SECONDS)
        return child

    async def _spawn(self, name: str, namespace: str, argv: list[str], *, env: dict[str, str] | None = None,
                     watch_stderr: str | None = None) -> _Child:
        log = open(self.config.workdir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", namespace, sys.executable, *argv,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE if watch_stderr else log,
                start_new_session=True, cwd=ROOT, limit=STREAM_LIMIT_BYTES,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
            )
        finally:
            if not watch_stderr:
                log.close()
        child = _Child(name, process)
        if watch_stderr:  # a meshnode process: its log goes to the file; a marker line becomes an event
            child.tee_stderr(log, watch_stderr)
        self._children.append(child)
        return child

    async def close(self) -> None:
        await asyncio.gather(*(child.stop() for child in self._children), return_exceptions=True)
        self._children.clear()

    async def _start_tabs(self, mode: str, room: str, streams: int, index: int,
                          ramp: float) -> tuple[list[_Child], int]:
        """Spawn the tab processes; returns them and the number of early tabs."""
        config, lab = self.config, self.lab
        early, late = split(streams, config.streams_per_peer, config.late_fraction)
        procs = max(1, min(config.tab_processes, len(early)))
        join_timeout = PEERS_READY_BASE_SECONDS + PEERS_READY_PER_PEER_SECONDS * len(early) / procs
        children = []
        for p in range(procs):
            mine = list(range(p, len(early), procs))
            late_mine = list(range(p, len(late), procs))
            argv = ["-m", "bench.lab.roles", "tabs", "--mode", mode, "--room", room,
                    "--tokens", str(self._expected), "--signal", lab.signal_url_peers, "--turn", lab.turn_url_peers,
                    "--streams", ",".join(str(early[i]) for i in mine),
                    "--late", ",".join(str(late[i]) for i in late_mine),
                    "--late-at", str(config.late_at(streams) + 0.5 * (late_mine[0] if late_mine else 0)),
                    "--late-spacing", str(0.5 * procs), "--first-index", str(p),
                    "--first-late-index", str(len(early) + p), "--total-tabs", str(len(early)),
                    "--total-streams", str(sum(early)), "--stagger", str(ramp),
                    "--deadline", str(config.deadline_seconds(streams)), "--join-timeout", str(join_timeout)]
            children.append(await self._spawn(f"tabs-{index}-{p}", lab.ns_peers, argv))
        return children, len(early)

    async def trial(self, mode: str, streams: int, *, purpose: str = "search", ramp: float | None = None) -> dict[str, Any]:
        """Run one trial and return its metrics (``passed`` false also when it could not run).

        `ramp`: seconds over which the streams start (default ``streams / arrival_rate``).
        """
        ramp = self.config.ramp_seconds(streams) if ramp is None else ramp
        config, lab = self.config, self.lab
        index = len(self.trials) + 1
        early, late = split(streams, config.streams_per_peer, config.late_fraction)
        room = f"t{index}-{secrets.token_hex(3)}"
        self.on_status(f"{mode}: N={streams} ({len(early)} tabs x {config.streams_per_peer}, {len(late)} late) "
                       "connecting")
        started = time.monotonic()
        record: dict[str, Any] = {"mode": mode, "streams": streams, "peers": len(early) + len(late),
                                  "late_peers": len(late), "streams_per_peer": config.streams_per_peer,
                                  "purpose": purpose}
        node: _Child | None = None
        joined: _Child | None = None
        tabs: list[_Child] = []
        in_trial = False
        try:
            if MODES[mode].process:
                joined = await self._join_process(room, index)
                server = joined
            else:
                node = await self._node_process()
                await node.say(json.dumps({"cmd": "trial", "mode": mode, "room": room, "rate": config.rate,
                                           "tokens": self._expected, "budget": config.cap_bytes_per_second,
                                           "streams_per_tab": config.streams_per_peer}))
                in_trial = True
                await node.event("ready", NODE_READY_TIMEOUT_SECONDS)
                server = node
            tabs, wanted = await self._start_tabs(mode, room, streams, index, ramp)
            record["ramp_s"] = round(ramp, 2)
            join_timeout = PEERS_READY_BASE_SECONDS + PEERS_READY_PER_PEER_SECONDS * wanted
            readies = await asyncio.gather(*(t.event("ready", join_timeout + 30) for t in tabs))
            connected = sum(int(r["peers"]) for r in readies)
            if connected < wanted:
                raise BenchError(f"only {connected} of {wanted} tabs connected to the node")
            record["connect_s"] = round(time.monotonic() - started, 2)
            if config.idle_seconds > 0:  # what connected, idle tabs cost the link (keep-alives, caps)
                self.on_status(f"{mode}: N={streams} connected, measuring {config.idle_seconds:g} s idle")
                idle_from = lab.counters()
                await asyncio.sleep(config.idle_seconds)
                idle = lab.counters() - idle_from
                record["idle"] = {"seconds": round(idle.when, 2), "tabs": connected,
                                  "up_bytes_per_s_per_tab": round(idle.up_bytes / idle.when / max(1, connected), 1),
                                  "down_bytes_per_s_per_tab": round(idle.down_bytes / idle.when / max(1, connected), 1)}
            self.on_status(f"{mode}: N={streams} streaming")
            before = lab.counters()
            pids = [server.process.pid, *(t.process.pid for t in tabs)]
            cpu_before = [cpu_seconds(pid) for pid in pids]
            origin = time.monotonic() + GO_LEAD_SECONDS
            await asyncio.gather(*(t.say(f"go {origin}") for t in tabs))
            sampler = asyncio.get_running_loop().create_task(self._sample(before), name="bench.sampler")
            try:
                results = await asyncio.gather(*(t.event("result", config.deadline_seconds(streams)
                                                         + RESULT_SLACK_SECONDS) for t in tabs))
            finally:
                sampler.cancel()
                (series,) = await asyncio.gather(sampler, return_exceptions=True)
                record["series"] = series if isinstance(series, dict) else None
            after = lab.counters()
            seconds = max(1e-6, after.when - before.when)
            spent = [cpu_seconds(pid) - before_s for pid, before_s in zip(pids, cpu_before, strict=True)]
            record["cpu"] = {"node_s": round(spent[0], 2), "node_share": round(spent[0] / seconds, 3),
                             "peers_s": round(sum(spent[1:]), 2), "peers_share": round(sum(spent[1:]) / seconds, 3),
                             "load_average": round(os.getloadavg()[0], 2)}
            record["late_connect_s"] = [c for r in results for c in r.get("late_connect_s", [])]
            record["multi_object_messages"] = sum(int(r.get("multi_object_messages", 0)) for r in results)
            record.update(trial_metrics([s for r in results for s in r["streams"]], offered=streams,
                                        rate=config.rate, expected=self._expected, counters=after - before,
                                        cap=config.cap_bytes_per_second, slo=config.slo,
                                        plain_tabs=not MODES[mode].hello))
        except BenchError as exc:
            logger.warning("trial %d (%s, N=%d) could not run: %s", index, mode, streams, exc)
            record.update({"passed": False, "failure": str(exc)})
        finally:
            for child in tabs:
                await child.stop()
                self._children.remove(child)
            if joined is not None:
                await joined.stop()  # SIGTERM after stdin closes: the node drains and leaves
                self._children.remove(joined)
                record["node"] = joined.last_json("paced: ")
            if node is not None and in_trial:
                try:
                    await node.say(json.dumps({"cmd": "end"}))
                    stats = await node.event("stats", STATS_TIMEOUT_SECONDS)
                    record["node"] = stats.get("pacer")
                except BenchError as exc:
                    logger.warning("node did not end trial %d cleanly: %s; restarting it", index, exc)
                    await node.stop()
        record["wall_s"] = round(time.monotonic() - started, 1)
        self.trials.append(record)
        self.on_trial(record)
        return record

    async def _sample(self, start: LinkCounters) -> dict[str, list[float]]:
        """Link use once per SAMPLE_SECONDS while the streams run (bytes/s each direction, drops)."""
        series: dict[str, list[float]] = {"t": [], "up_bytes_per_s": [], "down_bytes_per_s": [], "drops": []}
        previous = start
        try:
            while True:
                await asyncio.sleep(SAMPLE_SECONDS)
                now = await asyncio.to_thread(self.lab.counters)
                delta = now - previous
                seconds = max(delta.when, 1e-6)
                series["t"].append(round(now.when - start.when, 2))
                series["up_bytes_per_s"].append(round(delta.up_bytes / seconds))
                series["down_bytes_per_s"].append(round(delta.down_bytes / seconds))
                series["drops"].append(delta.up_drops + delta.down_drops)
                previous = now
        except asyncio.CancelledError:
            return series

    def _next(self, mode: str, streams: int, trial: dict[str, Any]) -> int:
        """The next N to try after a pass, aiming at the capacity:

        * paced modes: the node's own estimate (its cost model at the widest window);
        * the others: the cap divided by what one stream costs at the service level's rate, from
          the bytes per token just measured;

        never less than 1.2x (plus one) nor more than 4x (10x with a node estimate) the current N.
        """
        config = self.config
        link = trial.get("link") or {}
        hint = (trial.get("node") or {}).get("capacity_hint")
        if MODES[mode].paced and hint:
            return max(int(streams * 1.2) + 1, min(int(hint), streams * 10))
        if link.get("up_bytes_per_token"):
            guess = int(0.85 * config.cap_bytes_per_second / (link["up_bytes_per_token"] * config.slo.min_rate))
        else:
            guess = streams * 2
        return max(int(streams * 1.2) + 1, min(guess, streams * 4))

    async def search(self, mode: str) -> dict[str, Any]:
        """Largest N that passes for `mode`, then the overload trial."""
        config = self.config
        if config.fixed_streams:
            results = [await self.trial(mode, n, purpose="fixed") for n in config.fixed_streams]
            passing = [r for r in results if r.get("passed")]
            shown = max(passing, key=lambda r: r["streams"]) if passing else results[-1]
            return {"mode": mode, "capacity": shown["streams"] if passing else 0, "first_failure": None,
                    "at_capacity": _headline(shown) if "delay_ms" in shown else None, "overload": None}
        best, fail = 0, None
        best_trial: dict[str, Any] | None = None
        n = max(config.start_streams, config.streams_per_peer) if MODES[mode].paced else config.start_streams
        while n <= config.max_streams:
            trial = await self.trial(mode, n)
            if trial.get("failure"):
                fail = n
                break
            if trial["passed"]:
                best, best_trial = n, trial
                if n == config.max_streams:
                    break
                n = min(self._next(mode, n, trial), config.max_streams)
            else:
                fail = n
                break
        for _ in range(config.refine_steps):
            if fail is None or fail - best <= max(1, best // 8):
                break
            mid = (best + fail) // 2
            trial = await self.trial(mode, mid, purpose="refine")
            if trial.get("passed"):
                best, best_trial = mid, trial
            else:
                fail = mid
        overload = None
        if best > 0 and config.overload > 1:
            offered = max(best + 1, int(round(best * config.overload)))
            trial = await self.trial(mode, offered, purpose="overload")
            peak = best_trial["sustained_goodput_tok_s"] if best_trial else 0.0
            overload = {"offered": offered, "goodput_tok_s": trial.get("goodput_tok_s", 0.0),
                        "slo_goodput_tok_s": trial.get("slo_goodput_tok_s", 0.0),
                        "sustained_goodput_tok_s": trial.get("sustained_goodput_tok_s", 0.0),
                        "peak_sustained_goodput_tok_s": peak,
                        "kept": round(trial.get("sustained_goodput_tok_s", 0.0) / peak, 3) if peak else None,
                        "admitted": trial.get("admitted"), "refused": trial.get("refused"),
                        "streams_within_slo": trial.get("streams_within_slo")}
        return {"mode": mode, "capacity": best, "first_failure": fail,
                "full_speed_capacity": self._full_speed(mode),
                "at_capacity": _headline(best_trial), "overload": overload}

    def _full_speed(self, mode: str) -> int:
        """Largest passing N whose every stream kept 90 % of the source rate (no growing backlog)."""
        fast = [t["streams"] for t in self.trials if t["mode"] == mode and t.get("passed")
                and (t.get("min_stream_rate") or 0.0) >= 0.9 * self.config.rate]
        return max(fast, default=0)

    async def run(self) -> dict[str, Any]:
        summaries = []
        for mode in self.config.modes:
            summaries.append(await self.search(mode))
        return {"summary": summaries, "trials": self.trials}


def _headline(trial: dict[str, Any] | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    link = trial.get("link") or {}
    return {"streams": trial["streams"], "up_bytes_per_token": link.get("up_bytes_per_token"),
            "down_bytes_per_token": link.get("down_bytes_per_token"),
            "up_packets_per_token": link.get("up_packets_per_token"),
            "up_bytes_per_s": link.get("up_bytes_per_s"), "down_bytes_per_s": link.get("down_bytes_per_s"),
            "delay_ms": trial["delay_ms"], "added_delay_ms": trial["added_delay_ms"], "ttft_ms": trial["ttft_ms"],
            "min_stream_rate": trial["min_stream_rate"], "goodput_tok_s": trial["goodput_tok_s"],
            "stalls": trial["stalls"], "tokens_lost": trial["tokens_lost"]}


async def run_bench(config: BenchConfig, *, on_trial: Callable[[dict[str, Any]], None] | None = None,
                    on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the lab, run every mode, tear everything down (also on failure or Ctrl-C)."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    for mode in config.modes:
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    peers_max = math.ceil(config.max_streams * max(1.0, config.overload) / config.streams_per_peer)
    lab = NetLab(cap_bytes_per_second=config.cap_bytes_per_second, shaper=config.shaper,
                 queue_ms=config.queue_ms, workdir=config.workdir, expected_allocations=max(1, peers_max // 4))
    started = time.time()
    try:
        await asyncio.to_thread(lab.start)
    except LabError as exc:
        raise BenchError(f"cannot build the bench network: {exc}") from exc
    bench = Bench(config, lab, on_trial=on_trial, on_status=on_status)
    try:
        outcome = await bench.run()
    finally:
        await bench.close()
        await asyncio.to_thread(lab.close)
    completion = Completion.load(config.completion)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "setup": {**setup, "slo_text": config.slo.describe(), "tokens_per_stream": config.expected_tokens(),
                  "completion": {"model_id": completion.model_id, "tokens": len(completion.ids)},
                  "network": lab.describe(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  "wall_s": round(time.time() - started, 1), "cpus": os.cpu_count(),
                  "load_average": [round(x, 2) for x in os.getloadavg()]},
        **outcome,
    }



"""`meshnode bench`: run trials through the lab and find, per mode, the largest N that meets the
service level.

A trial = one fresh node process and one requesters process (N streams over ceil(N/S) peers, S
streams per peer), started inside the lab's namespaces; the link counters are read right before
the streams start and right after the last one ends. Per mode the search grows N (guided by the
measured link utilisation) until a trial fails, bisects between the last pass and the first
failure, then offers ``overload`` × capacity to see how much goodput admission control keeps.
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
    streams_per_peer: int = 10
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
    headroom: float = 0.85
    engine: str = "replay"
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


def layout(streams: int, per_peer: int) -> list[int]:
    """Streams per peer: `per_peer` each, the last peer takes the remainder."""
    full, rest = divmod(streams, per_peer)
    return [per_peer] * full + ([rest] if rest else [])


class _Child:
    """A role process inside a namespace, speaking JSON lines."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process

    async def event(self, wanted: str, timeout: float) -> dict[str, Any]:
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
        for sig, wait in ((None, PROCESS_STOP_SECONDS), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
            try:
                async with asyncio.timeout(wait):
                    await self.process.wait()
                return
            except TimeoutError:
                continue


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

    async def _node_process(self) -> _Child:
        """The long-lived node (torch and the model load once); restarted if it died."""
        if self._node is not None and self._node.process.returncode is None:
            return self._node
        if self._node is not None:
            self._children.remove(self._node)
        self._node = await self._spawn("node", self.lab.ns_node, [
            "node", "--signal", self.lab.signal_url_node, "--turn", self.lab.turn_url_node,
            "--engine", self.config.engine, "--completion", str(self.config.completion)])
        await self._node.event("started", NODE_START_TIMEOUT_SECONDS)
        return self._node

    async def _spawn(self, name: str, namespace: str, argv: list[str]) -> _Child:
        log = open(self.config.workdir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", namespace, sys.executable, "-m", "bench.lab.roles", *argv,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                start_new_session=True, cwd=ROOT, limit=STREAM_LIMIT_BYTES,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
            )
        finally:
            log.close()
        child = _Child(name, process)
        self._children.append(child)
        return child

    async def close(self) -> None:
        await asyncio.gather(*(child.stop() for child in self._children), return_exceptions=True)
        self._children.clear()

    async def trial(self, mode: str, streams: int, *, purpose: str = "search", ramp: float | None = None) -> dict[str, Any]:
        """Run one trial and return its metrics (``passed`` false also when it could not run).

        `ramp`: seconds over which the streams start (default ``streams / arrival_rate``).
        """
        ramp = self.config.ramp_seconds(streams) if ramp is None else ramp
        config, lab = self.config, self.lab
        index = len(self.trials) + 1
        counts = layout(streams, config.streams_per_peer)
        prefix = f"t{index}-{secrets.token_hex(3)}"
        self.on_status(f"{mode}: N={streams} ({len(counts)} peers x {config.streams_per_peer}) connecting")
        started = time.monotonic()
        record: dict[str, Any] = {"mode": mode, "streams": streams, "peers": len(counts),
                                  "streams_per_peer": config.streams_per_peer, "purpose": purpose}
        node = peers = None
        in_trial = False
        try:
            node = await self._node_process()
            await node.say(json.dumps({"cmd": "trial", "mode": mode, "prefix": prefix, "rooms": len(counts),
                                       "rate": config.rate, "tokens": self._expected,
                                       "budget": config.cap_bytes_per_second, "headroom": config.headroom}))
            in_trial = True
            await node.event("ready", NODE_READY_TIMEOUT_SECONDS)
            join_timeout = PEERS_READY_BASE_SECONDS + PEERS_READY_PER_PEER_SECONDS * len(counts)
            peers = await self._spawn(f"peers-{index}", lab.ns_peers, [
                "peers", "--mode", mode, "--prefix", prefix, "--tokens", str(self._expected),
                "--signal", lab.signal_url_peers, "--turn", lab.turn_url_peers,
                "--streams", ",".join(map(str, counts)), "--stagger", str(ramp),
                "--deadline", str(config.deadline_seconds(streams)), "--join-timeout", str(join_timeout)])
            record["ramp_s"] = round(ramp, 2)
            ready = await peers.event("ready", join_timeout + 30)
            if ready["peers"] < len(counts):
                raise BenchError(f"only {ready['peers']} of {len(counts)} peers connected to the node")
            record["connect_s"] = round(time.monotonic() - started, 2)
            self.on_status(f"{mode}: N={streams} streaming")
            before = lab.counters()
            cpu_before = (cpu_seconds(node.process.pid), cpu_seconds(peers.process.pid))
            await peers.say("go")
            sampler = asyncio.get_running_loop().create_task(self._sample(before), name="bench.sampler")
            try:
                result = await peers.event("result", config.deadline_seconds(streams) + RESULT_SLACK_SECONDS)
            finally:
                sampler.cancel()
                (series,) = await asyncio.gather(sampler, return_exceptions=True)
                record["series"] = series if isinstance(series, dict) else None
            after = lab.counters()
            seconds = max(1e-6, after.when - before.when)
            node_cpu = cpu_seconds(node.process.pid) - cpu_before[0]
            peers_cpu = cpu_seconds(peers.process.pid) - cpu_before[1]
            record["cpu"] = {"node_s": round(node_cpu, 2), "node_share": round(node_cpu / seconds, 3),
                             "peers_s": round(peers_cpu, 2), "peers_share": round(peers_cpu / seconds, 3),
                             "load_average": round(os.getloadavg()[0], 2)}
            record.update(trial_metrics(result["streams"], offered=streams, rate=config.rate,
                                        expected=self._expected, counters=after - before,
                                        cap=config.cap_bytes_per_second, slo=config.slo))
        except BenchError as exc:
            logger.warning("trial %d (%s, N=%d) could not run: %s", index, mode, streams, exc)
            record.update({"passed": False, "failure": str(exc)})
        finally:
            if peers is not None:
                await peers.stop()
                self._children.remove(peers)
            if node is not None and in_trial:
                try:
                    await node.say(json.dumps({"cmd": "end"}))
                    record["node"] = (await node.event("stats", STATS_TIMEOUT_SECONDS)).get("pacer")
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



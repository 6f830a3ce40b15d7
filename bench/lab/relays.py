"""Real local relays for tests: mosquitto, nostr-relay, bittorrent-tracker and meshnode's ws-relay.

Each relay runs as a child process in its own process group, listens on free 127.0.0.1 ports
(test-harness §5), and is awaited until its ports accept TCP connections (with a deadline, never a
fixed sleep). ``stop()`` kills the whole process group (SIGKILL: it simulates a relay dying and is
instant); ``restart()`` brings it back **on the same ports**, so adapters can reconnect to the same
URL. Leaving a context manager always stops the relay and removes its run directory, also when the
body failed; the relay's output is logged when it failed to start or the body raised.

Synchronous context managers, so session-scoped pytest fixtures do not depend on an event loop;
``astop()`` / ``arestart()`` run the blocking parts in a thread for use inside async tests.

    with mosquitto_relay() as broker:
        broker.ws_url, broker.tcp_url
        broker.stop(); broker.restart()

Run directly, ``python -m bench.lab.relays wsrelay --port N`` serves `signaling.servers.wsrelay.WsRelayServer`
(that is how `wsrelay_relay` runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WEB_DIR = ROOT / "web"
TRACKER_SCRIPT = Path(__file__).resolve().parent / "tracker.mjs"
MOSQUITTO = os.environ.get("MESHNODE_MOSQUITTO", "/usr/sbin/mosquitto")
NOSTR_RELAY = ROOT / ".venv-relay" / "bin" / "nostr-relay"
NODE = shutil.which("node") or "/usr/bin/node"
HOST = "127.0.0.1"

STARTUP_TIMEOUT_SECONDS = 30.0
"""Deadline for a relay's ports to accept connections (nostr-relay needs 2-3 s on an idle host)."""
STOP_TIMEOUT_SECONDS = 10.0
PORT_POLL_INTERVAL_SECONDS = 0.05
OUTPUT_TAIL_CHARS = 8000


class RelayStartError(RuntimeError):
    """A relay process exited or did not open its ports before the deadline."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to (host, port) succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RelayProcess:
    """One relay child process, restartable on the same ports.

    Args:
        name: for logs and errors.
        argv: the command line.
        ports: TCP ports that must accept connections before the relay counts as started.
        cwd: working directory of the process.
        run_dir: directory for the output log (and the relay's own files).
        env: extra environment variables.
        startup_timeout_seconds: deadline for the ports.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        ports: list[int],
        cwd: Path,
        run_dir: Path,
        env: dict[str, str] | None = None,
        startup_timeout_seconds: float = STARTUP_TIMEOUT_SECONDS,
    ) -> None:
        self.name = name
        self.argv = argv
        self.ports = ports
        self.cwd = cwd
        self.run_dir = run_dir
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_seconds = startup_timeout_seconds
        self.log_path = run_dir / f"{name}.log"
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), or None when stopped."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process and wait until every port accepts connections.

        Raises:
            RelayStartError: the process exited or the ports stayed closed past the deadline; the
                process group is killed first and the message carries its output.
        """
        if self.running:
            return
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaps gunicorn workers too
            )
        deadline = time.monotonic() + self.startup_timeout_seconds
        pending = list(self.ports)
        while pending:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                msg = f"{self.name} exited with {code} during start-up:\n{self.output()}"
                raise RelayStartError(msg)
            if port_open(HOST, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.stop()
                msg = (
                    f"{self.name} did not open port {pending[0]} within "
                    f"{self.startup_timeout_seconds} s:\n{self.output()}"
                )
                raise RelayStartError(msg)
            time.sleep(PORT_POLL_INTERVAL_SECONDS)
        logger.info("%s started (pid %d, ports %s)", self.name, self._process.pid, self.ports)

    def stop(self) -> None:
        """Kill the whole process group (like a crash) and reap the process. Idempotent."""
        process = self._process
        if process is None:
            return
        self._process = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not exit after SIGKILL", self.name, process.pid)
        logger.info("%s stopped", self.name)

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        self.start()

    async def astop(self) -> None:
        """`stop` in a worker thread, for async tests."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        """`restart` in a worker thread, for async tests (nostr-relay takes seconds to start)."""
        await asyncio.to_thread(self.restart)

    def output(self) -> str:
        """The tail of everything the process wrote (all starts)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-OUTPUT_TAIL_CHARS:]


class Relay:
    """A started relay: its URLs and its process (``stop`` / ``restart`` / ``output``)."""

    def __init__(self, process: RelayProcess, url: str) -> None:
        self.process = process
        self.url = url
        """The WebSocket URL adapters connect to."""

    @property
    def port(self) -> int:
        """The relay's first (WebSocket) port."""
        return self.process.ports[0]

    @property
    def running(self) -> bool:
        """True while the relay process is alive."""
        return self.process.running

    def stop(self) -> None:
        """Kill the relay (simulates it dying)."""
        self.process.stop()

    def restart(self) -> None:
        """Bring the relay back on the same ports (a fresh process)."""
        self.process.restart()

    async def astop(self) -> None:
        """`stop` without blocking the event loop."""
        await self.process.astop()

    async def arestart(self) -> None:
        """`restart` without blocking the event loop."""
        await self.process.arestart()

    def output(self) -> str:
        """The relay's output so far."""
        return self.process.output()


class MosquittoRelay(Relay):
    """mosquitto with a WebSocket listener (`ws_url`, also `url`) and a TCP listener (`tcp_url`)."""

    def __init__(self, process: RelayProcess, ws_url: str, tcp_url: str) -> None:
        super().__init__(process, ws_url)
        self.ws_url = ws_url
        self.tcp_url = tcp_url


def _make_run_dir(prefix: str) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix=f"meshnode-{prefix}-"))
    # mosquitto started as root drops privileges to user "mosquitto", which must read its config.
    run_dir.chmod(0o755)
    return run_dir


@contextlib.contextmanager
def _running(process: RelayProcess, relay_factory: Callable[[], Relay]) -> Iterator[Relay]:
    try:
        process.start()
        yield relay_factory()
    except BaseException:
        logger.error("%s output:\n%s", process.name, process.output())
        raise
    finally:
        process.stop()
        shutil.rmtree(process.run_dir, ignore_errors=True)


MOSQUITTO_CONF = """\
# Generated by bench/lab/relays.py (see configs/mosquitto.conf and test-harness §5.1).
per_listener_settings false
allow_anonymous true
persistence false
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
connection_messages true

listener {tcp_port} 127.0.0.1
protocol mqtt

listener {ws_port} 127.0.0.1
socket_domain ipv4
protocol websockets
"""


@contextlib.contextmanager
def mosquitto_relay() -> Iterator[MosquittoRelay]:
    """mosquitto on two free loopback ports: MQTT over WebSocket and plain MQTT/TCP.

    Yields:
        a `MosquittoRelay` with ``ws_url`` (``ws://127.0.0.1:P``, any path works), ``tcp_url``
        (``mqtt://127.0.0.1:Q``), ``url`` (= ``ws_url``), ``stop()`` and ``restart()``.
    """
    run_dir = _make_run_dir("mosquitto")
    ws_port, tcp_port = free_port(), free_port()
    config = run_dir / "mosquitto.conf"
    config.write_text(MOSQUITTO_CONF.format(ws_port=ws_port, tcp_port=tcp_port))
    config.chmod(0o644)
    process = RelayProcess(
        "mosquitto",
        [MOSQUITTO, "-c", str(config)],
        ports=[ws_port, tcp_port],
        cwd=run_dir,
        run_dir=run_dir,
    )
    ws_url = f"ws://{HOST}:{ws_port}"

    def make() -> MosquittoRelay:
        return MosquittoRelay(process, ws_url, f"mqtt://{HOST}:{tcp_port}")

    with _running(process, make) as relay:
        assert isinstance(relay, MosquittoRelay)
        yield relay


def _nostr_relay_config(run_dir: Path, port: int) -> str:
    """The package's bundled config with the three changes of test-harness §5.2."""
    import yaml

    bundled = sorted((ROOT / ".venv-relay" / "lib").glob("python3*/site-packages/nostr_relay/config.yaml"))
    config: dict[str, Any] = yaml.safe_load(bundled[0].read_text()) if bundled else {}
    config.setdefault("storage", {})["sqlalchemy.url"] = (
        f"sqlite+aiosqlite:///{run_dir / 'nostr.sqlite3'}"
    )
    gunicorn = config.setdefault("gunicorn", {})
    gunicorn.update({"bind": f"{HOST}:{port}", "workers": 1, "loglevel": "warning", "reload": False})
    config.setdefault("purple", {}).update({"host": HOST, "port": port})
    config["loglevel"] = "warning"
    return str(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def nostr_relay() -> Iterator[Relay]:
    """nostr-relay (PyPI, own venv) with a fresh sqlite database, on a free loopback port.

    Yields:
        a `Relay` with ``url`` = ``ws://127.0.0.1:P``. A restart keeps the database.
    """
    run_dir = _make_run_dir("nostr")
    port = free_port()
    config = run_dir / "nostr-relay.yaml"
    config.write_text(_nostr_relay_config(run_dir, port))
    process = RelayProcess(
        "nostr-relay",
        [str(NOSTR_RELAY), "-c", str(config), "serve"],
        ports=[port],
        cwd=run_dir,
        run_dir=run_dir,
    )
    url = f"ws://{HOST}:{port}"
    with _running(process, lambda: Relay(process, url)) as relay:
        yield relay


@contextlib.contextmanager
def tracker_relay() -> Iterator[Relay]:
    """bittorrent-tracker's ``Server`` (bench/lab/tracker.mjs) on a free loopback port.

    Yields:
        a `Relay` with ``url`` = ``ws://127.0.0.1:P`` (WebSocket tracker; HTTP on the same port).
    """
    run_dir = _make_run_dir("tracker")
    port = free_port()
    process = RelayProcess(
        "bittorrent-tracker",
        [NODE, str(TRACKER_SCRIPT), str(port)],
        ports=[port],
        cwd=WEB_DIR,
        run_dir=run_dir,
    )
    url = f"ws://{HOST}:{port}"
    with _running(process, lambda: Relay(process, url)) as relay:
        yield relay


@contextlib.contextmanager
def wsrelay_relay() -> Iterator[Relay]:
    """meshnode's `WsRelayServer` in a child Python process on a free loopback port.

    Yields:
        a `Relay` with ``url`` = ``ws://127.0.0.1:P``.
    """
    run_dir = _make_run_dir("wsrelay")
    port = free_port()
    process = RelayProcess(
        "ws-relay",
        [sys.executable, "-m", "bench.lab.relays", "wsrelay", "--host", HOST, "--port", str(port)],
        ports=[port],
        cwd=ROOT,
        run_dir=run_dir,
        env={"PYTHONUNBUFFERED": "1"},
    )
    url = f"ws://{HOST}:{port}"
    with _running(process, lambda: Relay(process, url)) as relay:
        yield relay


async def _serve_wsrelay(host: str, port: int) -> None:
    from signaling.servers.wsrelay import WsRelayServer

    async with WsRelayServer(host, port) as server:
        print(f"ws-relay listening on {server.url}", flush=True)
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.lab.relays wsrelay --host H --port P``: serve a ws-relay until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.lab.relays")
    parser.add_argument("relay", choices=["wsrelay"])
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve_wsrelay(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

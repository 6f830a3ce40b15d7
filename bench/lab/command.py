"""`meshnode bench`: argument parser and entry point (called from :mod:`meshnode.cli.main`)."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lab.metrics import ServiceLevel
from bench.lab.modes import DEFAULT_MODES, MODES
from bench.lab.source import DEFAULT_COMPLETION_PATH

DEFAULT_NODE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "uplink-50KBps.toml"

DEFAULT_OUT = Path("bench/results/bench_50kBps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags (the lead's cli.py adds the common -v/-q/--log-format/--config)."""
    group = parser.add_argument_group("bench")
    group.add_argument("--cap", type=int, default=50_000, metavar="BYTES_PER_S",
                       help="byte-rate cap of the node's relay link, per direction (default 50000)")
    group.add_argument("--modes", default=",".join(DEFAULT_MODES),
                       help=f"comma-separated, from: {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)})")
    group.add_argument("--rate", type=float, default=30.0, help="tokens per second per stream (default 30)")
    group.add_argument("--tokens", type=int, help="tokens per stream (default: the whole recorded completion)")
    group.add_argument("--streams-per-peer", type=int, default=1, metavar="S",
                       help="streams each requesting tab runs (default 1, as in a Legion room: N streams, N tabs)")
    group.add_argument("--late-fraction", type=float, default=0.1, metavar="F",
                       help="share of the streams whose tabs join the room during the trial (default 0.1)")
    group.add_argument("--tab-processes", type=int, default=2, metavar="K",
                       help="processes the tabs are spread over (default 2)")
    group.add_argument("--idle-seconds", type=float, default=0.0, metavar="S",
                       help="before each trial's streams, measure what the connected idle tabs cost the link "
                            "(keep-alives, caps) for S seconds (default 0: skip)")
    group.add_argument("--node-config", type=Path, default=DEFAULT_NODE_CONFIG, metavar="FILE.toml",
                       help="the node's settings (meshnode join --config; default configs/uplink-50KBps.toml); the "
                            "bench adds the lab's room and TURN relay and --uplink CAP")
    group.add_argument("--streams", metavar="N[,N...]", help="run exactly these N per mode instead of searching")
    group.add_argument("--start", type=int, default=6,
                       help="first N of the search (default 6; paced modes start at --streams-per-peer or more)")
    group.add_argument("--max-streams", type=int, default=320, help="largest N tried (default 320)")
    group.add_argument("--refine", type=int, default=2, help="bisection steps after the first failure (default 2)")
    group.add_argument("--overload", type=float, default=2.0,
                       help="after the search, offer this multiple of the capacity (default 2; 0 = skip)")
    group.add_argument("--arrival-rate", type=float, default=20.0, metavar="STREAMS_PER_S",
                       help="how fast new streams arrive while a trial ramps up (default 20/s)")
    group.add_argument("--shaper", choices=["tbf", "coturn", "none"], default="tbf",
                       help="how the cap is enforced: tc tbf on the link (default), coturn --max-bps, none")
    group.add_argument("--queue-ms", type=int, default=200, help="token-bucket queue before drops (default 200)")
    group.add_argument("--min-rate", type=float, default=10.0, help="service level: tok/s per stream (default 10)")
    group.add_argument("--max-p95-ms", type=float, default=500.0,
                       help="service level: p95 inter-token delay in ms (default 500)")
    group.add_argument("--completion", type=Path, default=DEFAULT_COMPLETION_PATH, help="recorded completion JSON")
    group.add_argument("--record-completion", action="store_true",
                       help="generate the recorded completion with the embedded model, then exit")
    group.add_argument("--out", type=Path, default=DEFAULT_OUT,
                       help="output path without extension: writes OUT.json and OUT.png (default %(default)s)")
    group.add_argument("--no-plot", action="store_true", help="skip the PNG")
    group.add_argument("--workdir", type=Path, help="where process logs go (default: a fresh temporary folder)")


def config_from_args(args: argparse.Namespace) -> Any:
    from bench.lab.runner import BenchConfig

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"meshnode bench: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    return BenchConfig(
        modes=modes, cap_bytes_per_second=args.cap, shaper=args.shaper, queue_ms=args.queue_ms, rate=args.rate,
        tokens=args.tokens, streams_per_peer=args.streams_per_peer, start_streams=args.start,
        max_streams=args.max_streams, refine_steps=args.refine, overload=args.overload,
        fixed_streams=[int(n) for n in args.streams.split(",")] if args.streams else None,
        arrival_rate=args.arrival_rate, late_fraction=args.late_fraction, tab_processes=args.tab_processes,
        node_config=args.node_config, idle_seconds=args.idle_seconds, completion=args.completion,
        slo=ServiceLevel(min_rate=args.min_rate, max_p95_delay_seconds=args.max_p95_ms / 1000.0), workdir=workdir,
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the bench; returns the process exit code."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bench.lab.report import print_report, write_json, write_plot
    from bench.lab.runner import BenchError, run_bench
    from bench.lab.source import record_completion

    console = Console()
    if args.record_completion:
        completion = asyncio.run(record_completion(args.completion))
        console.print(f"recorded {len(completion.ids)} tokens to {args.completion}")
        return 0
    config = config_from_args(args)
    command = "meshnode bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    console.print(f"logs: {config.workdir}")

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[done]} trials"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            bar = progress.add_task("starting the lab (coturn, namespaces)", total=None, done=0)

            def on_trial(trial: dict[str, Any]) -> None:
                link = trial.get("link") or {}
                verdict = "[green]pass[/]" if trial.get("passed") else "[red]fail[/]"
                progress.console.print(
                    f"{trial['mode']:>14} N={trial['streams']:<4} {verdict}  "
                    f"{link.get('up_bytes_per_token', '–')} B/tok out, delay p95 "
                    f"{(trial.get('delay_ms') or {}).get('p95', '–')} ms, min "
                    f"{trial.get('min_stream_rate', '–')} tok/s, lost {trial.get('tokens_lost', '–')}, "
                    f"refused {trial.get('refused', '–')}  {trial.get('failure') or ''}")
                progress.update(bar, done=progress.tasks[0].fields["done"] + 1)

            def on_status(text: str) -> None:
                progress.update(bar, description=text)

            try:
                return await run_bench(config, on_trial=on_trial, on_status=on_status)
            finally:
                loop.remove_signal_handler(signal.SIGTERM)

    started = time.monotonic()
    try:
        result = asyncio.run(main())
    except BenchError as exc:
        console.print(f"[red]meshnode bench: {exc}[/]")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted; everything was stopped and removed[/]")
        return 130
    result["command"] = command
    result["setup"]["wall_s"] = round(time.monotonic() - started, 1)
    print_report(result, Console(width=max(console.width, 200)))
    out: Path = args.out
    write_json(result, out.with_suffix(".json"))
    wrote = [out.with_suffix(".json")]
    if not args.no_plot:
        try:
            write_plot(result, out.with_suffix(".png"))
            wrote.append(out.with_suffix(".png"))
        except ImportError:
            console.print("[yellow]matplotlib is not installed: no plot[/]")
    console.print("wrote " + " and ".join(map(str, wrote)))
    return 0

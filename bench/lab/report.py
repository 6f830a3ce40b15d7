"""Bench output: a rich table, the JSON document and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(result: dict[str, Any]) -> Table:
    """One row per mode: streams sustained and what the link carried at that point."""
    setup = result["setup"]
    table = Table(title=f"Streams sustained on a {setup['cap_bytes_per_second']:,} B/s link "
                        f"({setup['rate']:g} tok/s per stream, {setup['tokens_per_stream']} tokens)",
                  caption=f"streams: most that met the service level ({setup['slo_text']}); full speed: most "
                          "whose every stream kept 90% of the source rate; added: delay beyond the stream's most "
                          "punctual token; at 2x: sustained SLO goodput kept with twice the capacity offered")
    for column in ("mode", "streams", "full speed", "B/tok out", "B/tok back", "pkts/tok", "out B/s",
                   "gap p50/95/99 ms", "added p50/95 ms", "TTFT p50 ms", "min tok/s", "stalls", "lost", "at 2x"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in result["summary"]:
        head = row.get("at_capacity") or {}
        delay = head.get("delay_ms") or {}
        added = head.get("added_delay_ms") or {}
        overload = row.get("overload") or {}
        kept = overload.get("kept")
        table.add_row(
            row["mode"], _fmt(row["capacity"]), _fmt(row.get("full_speed_capacity")),
            _fmt(head.get("up_bytes_per_token"), 1), _fmt(head.get("down_bytes_per_token"), 1),
            _fmt(head.get("up_packets_per_token"), 3), _fmt(head.get("up_bytes_per_s"), 0),
            "/".join(_fmt(delay.get(k), 0) for k in ("p50", "p95", "p99")) if delay else "–",
            "/".join(_fmt(added.get(k), 0) for k in ("p50", "p95")) if added else "–",
            _fmt((head.get("ttft_ms") or {}).get("p50"), 0), _fmt(head.get("min_stream_rate"), 1),
            _fmt(head.get("stalls")), _fmt(head.get("tokens_lost")),
            (f"{kept * 100:.0f}% of {overload['offered']}"
             + (f" ({overload['refused']} refused)" if overload.get("refused") else "")) if kept is not None else "–",
        )
    return table


def trials_table(result: dict[str, Any]) -> Table:
    table = Table(title="All trials")
    for column in ("mode", "N", "peers", "pass", "B/tok out", "B/tok back", "util", "drops",
                   "p50/p95/p99 ms", "min tok/s", "lost", "refused", "goodput tok/s", "window ms", "note"):
        table.add_column(column)
    for trial in result["trials"]:
        link = trial.get("link") or {}
        delay = trial.get("delay_ms") or {}
        window = ((trial.get("node") or {}).get("window_ms") or {})
        table.add_row(
            trial["mode"], str(trial["streams"]), str(trial["peers"]), "yes" if trial.get("passed") else "no",
            _fmt(link.get("up_bytes_per_token"), 1), _fmt(link.get("down_bytes_per_token"), 1),
            _fmt(link.get("up_utilisation"), 2), _fmt((link.get("up_drops") or 0) + (link.get("down_drops") or 0)),
            "/".join(_fmt(delay.get(k), 0) for k in ("p50", "p95", "p99")) if delay else "–",
            _fmt(trial.get("min_stream_rate"), 1), _fmt(trial.get("tokens_lost")), _fmt(trial.get("refused")),
            _fmt(trial.get("goodput_tok_s"), 0), _fmt(window.get("max"), 0),
            trial.get("failure") or trial["purpose"],
        )
    return table


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 200))
    network = result["setup"]["network"]
    console.print(f"[bold]relay:[/] {network['relay']}")
    console.print(f"[bold]cap:[/] {network['limiter']}")
    console.print(f"[bold]bytes counted:[/] {network['counted_at']}")
    console.print(trials_table(result))
    console.print(summary_table(result))


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Three panels: streams sustained per mode; bytes per token per mode; delay percentiles vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    modes = [row["mode"] for row in summary]
    colours = {mode: f"C{i}" for i, mode in enumerate(modes)}
    figure, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    setup = result["setup"]
    figure.suptitle(f"meshnode bench: {setup['cap_bytes_per_second']:,} B/s link through coturn, "
                    f"{setup['rate']:g} tok/s per stream ({setup['shaper']})")

    ax = axes[0]
    capacity = [row["capacity"] for row in summary]
    bars = ax.bar(modes, capacity, color=[colours[m] for m in modes])
    ax.bar_label(bars)
    ax.set_title("concurrent streams meeting the service level")
    ax.set_ylabel("streams")
    ax.tick_params(axis="x", rotation=20)

    ax = axes[1]
    out = [((row.get("at_capacity") or {}).get("up_bytes_per_token") or 0) for row in summary]
    back = [((row.get("at_capacity") or {}).get("down_bytes_per_token") or 0) for row in summary]
    positions = range(len(modes))
    ax.bar([p - 0.2 for p in positions], out, width=0.4, label="node → relay", color=[colours[m] for m in modes])
    ax.bar([p + 0.2 for p in positions], back, width=0.4, label="relay → node (acks, requests)",
           color=[colours[m] for m in modes], alpha=0.45)
    for p, value in zip(positions, out, strict=True):
        ax.annotate(f"{value:.0f}", (p - 0.2, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(positions), modes, rotation=20)
    ax.set_yscale("log")
    ax.set_title("wire bytes per token at capacity (IP, counted on the link)")
    ax.set_ylabel("bytes / token")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, -0.14), ncol=2)

    ax = axes[2]
    for mode in modes:
        trials = sorted((t for t in result["trials"] if t["mode"] == mode and t.get("delay_ms")),
                        key=lambda t: t["streams"])
        if not trials:
            continue
        n = [t["streams"] for t in trials]
        for source, key, style in (("delay_ms", "p95", "-"), ("delay_ms", "p99", "--"),
                                   ("added_delay_ms", "p50", ":")):
            values = [max(1.0, t[source][key] or 0.0) for t in trials]
            ax.plot(n, values, style, color=colours[mode], marker="o", markersize=3,
                    label=mode if (source, key) == ("delay_ms", "p95") else None)
    ax.axhline(setup["slo"]["max_p95_delay_seconds"] * 1000, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams N")
    ax.set_ylabel("ms (0 shown as 1)")
    ax.set_title("inter-token delay p95 (solid) / p99 (dashed),\nadded delay p50 (dotted) vs N")
    ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""PNG of ``bench/gpu_bench.py`` results: throughput against streams per model, prefix TTFT.

    python3 bench/gpu_plot.py bench/results/gpu_part1.json bench/results/gpu_part2.json --png bench/results/gpu_bench.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def plot(paths: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict[str, Any] = {}
    gpu, commands = "", []
    for path in paths:
        data = json.loads(Path(path).read_text())
        gpu = data.get("machine", {}).get("gpu", gpu)
        commands.append(data.get("command", ""))
        models.update(data.get("models", {}))
    prefix = {name: part["ours"]["prefix_ttft"] for name, part in models.items()
              if isinstance(part.get("ours", {}).get("prefix_ttft"), dict) and "cached" in part["ours"]["prefix_ttft"]}
    panels = len(models) + (1 if prefix else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(6 * max(1, panels), 4.8), squeeze=False)
    for ax, (name, part) in zip(axes[0], models.items(), strict=False):
        runs = part.get("ours", {}).get("runs", [])
        burst = [(r["streams_target"], r["aggregate_tok_s"]) for r in runs if r["mode"] == "burst"]
        steady = [(r["streams_target"], r["steady_tok_s"]) for r in runs if r["mode"] == "poisson" and "steady_tok_s" in r]
        if burst:
            ax.plot(*zip(*burst, strict=True), marker="o", label="CudaEngine burst")
        if steady:
            ax.plot(*zip(*steady, strict=True), marker="s", label="CudaEngine Poisson (steady)")
        base = part.get("baselines", {})
        static = sorted((v["batch"], v["aggregate_tok_s"]) for k, v in base.items()
                        if k.startswith("generate_static") and "aggregate_tok_s" in v)
        if static:
            ax.plot(*zip(*static, strict=True), marker="^", linestyle="--", label="generate static+compile (fixed batch)")
        batch = sorted((v["requests"], v["aggregate_tok_s"]) for k, v in base.items()
                       if k.startswith("generate_batch") and "aggregate_tok_s" in v)
        if batch:
            ax.plot(*zip(*batch, strict=True), marker="v", linestyle=":", label="generate_batch")
        eager = base.get("generate_eager_b1", {})
        if "aggregate_tok_s" in eager:
            ax.scatter([1], [eager["aggregate_tok_s"]], marker="x", color="k", label="generate eager b1", zorder=5)
        roof = part.get("roofline", {}).get("batch1_tok_s")
        if roof:
            ax.axhline(roof, color="grey", linewidth=0.8, label="weight-read roofline (b1, measured copy)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams / batch")
        ax.set_ylabel("aggregate decode tok/s")
        ax.set_title(f"{name} shape")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if prefix:
        ax = axes[0][len(models)]
        names = list(prefix)
        for offset, (key, label) in enumerate((("uncached", "1k prefix uncached"), ("cached", "1k prefix cached"))):
            values = [prefix[n][key].get("ttft_p50_ms", 0) for n in names]
            ax.bar([i + 0.4 * offset for i in range(len(names))], values, width=0.4, label=f"{label} (p50)")
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_ylabel("TTFT ms")
        ax.set_title("shared 1k-token prefix")
        ax.legend(fontsize=7)
    fig.suptitle(f"meshnode CudaEngine vs transformers, {gpu}; random-init shapes, 128-token prompts, 256 new tokens",
                 fontsize=9)
    fig.text(0.01, 0.005, " | ".join(c for c in commands if c)[:400], fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description="Draw the GPU bench PNG from its JSON files.")
    parser.add_argument("json", nargs="+")
    parser.add_argument("--png", default="bench/results/gpu_bench.png")
    args = parser.parse_args()
    plot(args.json, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

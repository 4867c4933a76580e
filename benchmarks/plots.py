"""PNG plots next to the results JSON: latency CDF per lane, throughput per lane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.stats import cdf

__all__ = ["write_plots"]


def write_plots(samples: dict[str, list[float]], lanes: dict[str, Any], stem: Path) -> list[Path]:
    """Write ``<stem>-latency-cdf.png`` and ``<stem>-throughput.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cdf_path = stem.with_name(stem.name + "-latency-cdf.png")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in samples.items():
        xs, ys = cdf(values)
        ax.plot(xs, ys, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency, ms (log scale), one request in flight")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF per lane (all rounds pooled)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cdf_path, dpi=110)
    plt.close(fig)

    tput_path = stem.with_name(stem.name + "-throughput.png")
    names = [
        n for n, lane in lanes.items() if lane.get("throughput_per_s") or lane.get("samples_per_s")
    ]
    values = [lanes[n].get("throughput_per_s") or lanes[n]["samples_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3)
    ax.set_xlabel("per second (requests with a window in flight; in_process: samples at batch 64)")
    ax.set_title("Throughput per lane (median of rounds)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(tput_path, dpi=110)
    plt.close(fig)
    return [cdf_path, tput_path]

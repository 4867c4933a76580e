"""PNG plots next to the results JSON: latency CDF per lane, throughput per lane, open loop.

The open-loop plot (when the ``open_loop`` lane ran) draws each worker's p50
and p99 latency against the throughput it achieved at each offered rate, with
the p99 target as a horizontal line.  The scaling plot (``python -m
benchmarks scaling``) draws req/s against the worker count, beside linear
scaling from one worker.  The overload plot (``python -m benchmarks overload``)
draws goodput against the offered load, admission control on and off, beside
the capacity, and what became of the requests at each level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.stats import cdf

__all__ = ["open_loop_plot", "overload_plot", "scaling_plot", "write_plots"]


def write_plots(samples: dict[str, list[float]], lanes: dict[str, Any], stem: Path) -> list[Path]:
    """Write ``<stem>-latency-cdf.png``, ``<stem>-throughput.png`` and, with the ``open_loop``
    lane, ``<stem>-open-loop.png``; return their paths."""
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
    if samples:  # a run of lanes without one-in-flight round trips (e.g. model_gain) has none
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
    paths = [cdf_path, tput_path]
    if "open_loop" in lanes:
        paths.append(
            open_loop_plot(lanes["open_loop"], stem.with_name(stem.name + "-open-loop.png"))
        )
    return paths


def open_loop_plot(lane: dict[str, Any], path: Path) -> Path:
    """Latency (p50, p99) against achieved throughput, one line pair per worker; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (worker, figures), color in zip(
        lane["workers"].items(), ("#4c72b0", "#dd8452"), strict=False
    ):
        points = [p for p in figures["points"] if p["latency_ms"]]
        xs = [p["achieved_req_s"] for p in points]
        for stat, style in (("p50", "--"), ("p99", "-")):
            ys = [p["latency_ms"][stat] for p in points]
            ax.plot(xs, ys, style, marker="o", color=color, label=f"{worker} {stat}")
    target = lane["p99_target_ms"]
    ax.axhline(
        target, color="grey", linewidth=0.8, linestyle=":", label=f"p99 target {target:g} ms"
    )
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput, requests/s (Poisson arrivals, median of rounds)")
    ax.set_ylabel("latency from scheduled send, ms (log scale)")
    capacity = lane["capacity_req_s"]
    ax.set_title(
        f"Open loop: latency vs throughput (offered {lane['factors'][0]:g}x to "
        f"{lane['factors'][-1]:g}x of {capacity:,.0f} req/s)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plot(lane: dict[str, Any], path: Path) -> Path:
    """The ``scaling`` lane: req/s by worker count (each round, and the median) beside
    n x the 1-worker req/s; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(n) for n in lane["req_s"]]
    medians = [lane["req_s"][str(n)] for n in counts]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(counts, medians, "-o", color="#4c72b0", label="measured (median of rounds)")
    for n in counts:
        rounds = lane["per_round"].get(f"req_s.{n}", [])
        ax.plot([n] * len(rounds), rounds, ".", color="#4c72b0", alpha=0.4)
    if "1" in lane["req_s"]:
        one = lane["req_s"]["1"]
        ax.plot(
            counts, [n * one for n in counts], "--", color="grey", label="linear (n x 1 worker)"
        )
    for n, v in zip(counts, medians, strict=True):
        eff = lane["efficiency"].get(str(n))
        if eff is not None:
            ax.annotate(f"{eff:.2f}", (n, v), textcoords="offset points", xytext=(4, -12))
    cores = lane["cores"]
    ax.set_xticks(counts)
    ax.set_xlabel(f"worker processes ({cores['affinity']} usable CPUs); labels: efficiency")
    ax.set_ylabel("saturated requests/s")
    ax.set_title(f"Scaling behind the router: {lane['model']} on {lane['device']}")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overload_plot(lane: dict[str, Any], path: Path) -> Path:
    """The ``overload`` lane: goodput by offered load, admission on and off (left), and each
    level's outcomes as fractions of the requests attempted (right); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = lane["modes"]
    colors = {"admission": "#4c72b0", "no_admission": "#dd8452"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for mode, figures in modes.items():
        points = figures["points"]
        xs = [p["offered_req_s"] for p in points]
        ys = [p["goodput_req_s"] for p in points]
        left.plot(xs, ys, "-o", color=colors.get(mode), label=mode.replace("_", " "))
    capacity = lane["capacity_req_s"]
    if capacity:
        left.axhline(capacity, color="grey", linestyle=":", label=f"capacity {capacity:,.0f} req/s")
    left.set_xlabel("offered load, requests/s (Poisson arrivals)")
    left.set_ylabel(f"goodput: replies within {lane['deadline_ms']:g} ms, per s")
    left.set_title(f"Goodput under overload: {lane['model']} on {lane['device']}")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)
    left.legend()
    outcomes = ("good", "late", "expired", "refused", "failed", "lost", "unsent")
    shades = ("#55a868", "#ccb974", "#c44e52", "#8172b3", "#937860", "#222222", "#aaaaaa")
    labels, bottoms = [], []
    for mode, figures in modes.items():
        for p in figures["points"]:
            labels.append(f"{p['factor']:g}x\n{'on' if mode == 'admission' else 'off'}")
            bottoms.append(p["fractions"])
    base = [0.0] * len(labels)
    for outcome, shade in zip(outcomes, shades, strict=True):
        heights = [f.get(outcome) or 0.0 for f in bottoms]
        right.bar(labels, heights, bottom=base, color=shade, label=outcome)
        base = [b + h for b, h in zip(base, heights, strict=True)]
    right.set_ylabel("fraction of the requests scheduled")
    right.set_title("Outcomes by level (admission on / off)")
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""``python -m benchmarks compare BEFORE.json AFTER.json``: two results files side by side.

Checks the shape first: the same lane names, the same keys in each lane, the
same ratio keys (exit status 1 when any differs).  Then each lane's headline
figures and every ratio, before and after, with the change; a change beyond
``--tolerance`` (a fraction, default 0.25) is marked ``!`` (figures of two
runs on a busy machine move: the mark is a pointer, not a verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["HEADLINE", "compare", "main"]

HEADLINE = (
    "rtt_ms.p50",
    "rtt_ms.p95",
    "throughput_per_s",
    "saturated_req_s",
    "samples_per_s",
    "publish_us",
    "worker_rss_mb",
    "decision_us_p99",
    "sticky_hit_rate",
    "by_batch.1",
    "by_batch.64",
)


def _get(lane: dict[str, Any], dotted: str) -> Any:
    value: Any = lane
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _row(name: str, a: Any, b: Any, tolerance: float) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:,.3f}" if isinstance(v, float) else str(v)

    change, mark = "", ""
    if isinstance(a, int | float) and isinstance(b, int | float) and a:
        delta = (b - a) / abs(a)
        change, mark = f"{delta:+.1%}", "!" if abs(delta) > tolerance else ""
    return f"  {name:52} {fmt(a):>14} {fmt(b):>14} {change:>9} {mark}"


def _shape(label: str, before: set[str], after: set[str]) -> list[str]:
    out = []
    if before - after:
        out.append(f"  {label} only before: {', '.join(sorted(before - after))}")
    if after - before:
        out.append(f"  {label} only after: {', '.join(sorted(after - before))}")
    return out


def compare(before: dict[str, Any], after: dict[str, Any], tolerance: float) -> tuple[bool, str]:
    """Whether the two files have the same shape, and the side-by-side text."""
    lb, la = before["lanes"], after["lanes"]
    shape = _shape("lanes", set(lb), set(la)) + _shape(
        "ratios", set(before["ratios"]), set(after["ratios"])
    )
    for name in (n for n in lb if n in la):
        shape += _shape(f"{name} keys", set(lb[name]), set(la[name]))
    lines = ["shape: " + ("same lanes, lane keys and ratio keys" if not shape else "DIFFERENT")]
    lines += shape
    lines.append(f"  {'figure':52} {'before':>14} {'after':>14} {'change':>9}")
    for name in (n for n in lb if n in la):
        lines.append(f"{name}")
        for key in HEADLINE:
            a, b = _get(lb[name], key), _get(la[name], key)
            if a is not None or b is not None:
                lines.append(_row(key, a, b, tolerance))
    lines.append("ratios")
    for key in before["ratios"]:
        lines.append(_row(key, before["ratios"][key], after["ratios"].get(key), tolerance))
    return not shape, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.25, help="mark changes beyond this")
    args = parser.parse_args(argv)
    same, text = compare(
        json.loads(args.before.read_text()), json.loads(args.after.read_text()), args.tolerance
    )
    print(f"{args.before} -> {args.after}")
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

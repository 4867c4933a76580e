"""``python -m benchmarks compare BEFORE.json AFTER.json``: two results files side by side.

First what differs in shape: lanes, keys of a lane and ratio keys present in
only one file are listed as ``added`` (only after) or ``removed`` (only
before).  A run that adds a lane or a ratio is still comparable on the rest,
so this is information, not a failure: the exit status is 0 unless an input
cannot be read as a results file (2).  Then each lane's headline figures and
every ratio, before and after, with the change (``added`` / ``removed`` in
place of a change where only one file has it).  A change is marked ``!``
when it exceeds what the rounds of the two runs already spread over: where
both files record the figure's value in each round (the lane's
``per_round``), when ``|after - before|`` exceeds ``--spread`` (default 1) times
the combined spread, the sum of each file's max - min across its rounds
(column ``basis``: ``spread`` and that threshold).  Where either file has no
per-round values for a figure (results files older than ``per_round``, and
every ratio, which is computed from medians), it falls back to the fixed
``--tolerance`` (a fraction, default 0.25; basis ``tol``), and says so.  The
mark is a pointer, not a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HEADLINE", "Rule", "compare", "main", "significant"]

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
    "sequential_msgs_s",
    "map_msgs_s",
    "by_batch.1",
    "by_batch.64",
    "cpu_ms_per_request.total",
    "capacity_req_s",
    "max_rate_p99_50ms.infer",
    "max_rate_p99_50ms.batched",
    "gain.resnet50",
    "gain.minilm",
    "req_s.1",  # scaling: req/s and efficiency by worker count
    "req_s.2",
    "req_s.4",
    "req_s.8",
    "efficiency.2",
    "efficiency.4",
    "efficiency.8",
    "goodput_4x_vs_1x.admission",  # overload: goodput at 4x over 1x the capacity, per mode
    "goodput_4x_vs_1x.no_admission",
)


@dataclass(frozen=True)
class Rule:
    """When a change counts: beyond ``spread`` x the rounds' combined spread, else ``tolerance``."""

    tolerance: float = 0.25  # fraction of before, where a file has no per-round values
    spread: float = 1.0  # multiple of (max - min of before's rounds) + (max - min of after's)


def _range(values: Any) -> float | None:
    if not isinstance(values, list) or len(values) < 2:
        return None
    nums = [v for v in values if isinstance(v, int | float)]
    return float(max(nums) - min(nums)) if len(nums) == len(values) else None


def significant(a: float, b: float, rounds_a: Any, rounds_b: Any, rule: Rule) -> tuple[bool, str]:
    """Whether ``a -> b`` is a real change, and its basis (``spread X`` or ``tol X%``)."""
    ra, rb = _range(rounds_a), _range(rounds_b)
    if ra is not None and rb is not None:
        threshold = rule.spread * (ra + rb)
        return abs(b - a) > threshold, f"spread {threshold:,.3f}"
    return bool(a) and abs((b - a) / a) > rule.tolerance, f"tol {rule.tolerance:.0%}"


def _get(lane: dict[str, Any], dotted: str) -> Any:
    value: Any = lane
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:,.3f}" if isinstance(v, float) else str(v)


def _row(name: str, a: Any, b: Any, rule: Rule, rounds_a: Any = None, rounds_b: Any = None) -> str:
    change, mark, basis = "", "", ""
    if isinstance(a, int | float) and isinstance(b, int | float) and a:
        change = f"{(b - a) / abs(a):+.1%}"
        real, basis = significant(a, b, rounds_a, rounds_b, rule)
        mark = "!" if real else ""
    return f"  {name:52} {_fmt(a):>14} {_fmt(b):>14} {change:>9} {mark:1} {basis}".rstrip()


def _presence_row(name: str, a: Any, b: Any, where: str) -> str:
    """A figure only one file has: its value, and ``added`` / ``removed`` as the change."""
    return f"  {name:52} {_fmt(a):>14} {_fmt(b):>14} {where:>9}"


def _shape(label: str, before: set[str], after: set[str]) -> list[str]:
    out = []
    if after - before:
        out.append(f"  {label} added: {', '.join(sorted(after - before))}")
    if before - after:
        out.append(f"  {label} removed: {', '.join(sorted(before - after))}")
    return out


def _has(lane: dict[str, Any], dotted: str) -> bool:
    """Whether ``lane`` has the key path at all (a recorded None counts as present)."""
    value: Any = lane
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _lane_rows(name: str, before: Any, after: Any, rule: Rule) -> list[str]:
    """The headline figures of one lane; what only one file has is ``added`` / ``removed``."""
    if before is None or after is None:
        where = "added" if before is None else "removed"
        lane = after if before is None else before
        rows = [f"{name} ({where})"]
        for key in HEADLINE:
            value = _get(lane, key)
            if value is not None:
                a, b = (None, value) if where == "added" else (value, None)
                rows.append(_presence_row(key, a, b, where))
        return rows
    per_before, per_after = before.get("per_round", {}), after.get("per_round", {})
    rows = [name]
    for key in HEADLINE:
        a, b = _get(before, key), _get(after, key)
        in_a, in_b = _has(before, key), _has(after, key)
        if in_a != in_b:
            rows.append(_presence_row(key, a, b, "added" if in_b else "removed"))
        elif a is not None or b is not None:
            rows.append(_row(key, a, b, rule, per_before.get(key), per_after.get(key)))
    return rows


def compare(
    before: dict[str, Any], after: dict[str, Any], rule: Rule | float = Rule()
) -> tuple[bool, str]:
    """Whether the two files have the same shape, and the side-by-side text.

    A different shape (lanes, lane keys or ratio keys added or removed) is
    reported, not an error.  ``rule``: a :class:`Rule`, or a bare tolerance (a
    fraction) with the default spread.
    """
    rule = rule if isinstance(rule, Rule) else Rule(tolerance=rule)
    lb, la = before["lanes"], after["lanes"]
    rb, ra = before["ratios"], after["ratios"]
    shape = _shape("lanes", set(lb), set(la)) + _shape("ratios", set(rb), set(ra))
    for name in (n for n in lb if n in la):
        shape += _shape(f"{name} keys", set(lb[name]), set(la[name]))
    lines = ["shape: " + ("same lanes, lane keys and ratio keys" if not shape else "differs")]
    lines += shape
    for label, data in (("before", before), ("after", after)):
        if not any("per_round" in lane for lane in data["lanes"].values()):
            lines.append(
                f"{label} has no per-round figures: its lanes are judged with the fixed "
                f"tolerance {rule.tolerance:.0%}"
            )
    lines.append(
        f"! = change beyond {rule.spread:g} x the rounds' combined spread (max - min of each "
        f"file), or {rule.tolerance:.0%} where a file has no per-round figure (ratios always)"
    )
    lines.append(f"  {'figure':52} {'before':>14} {'after':>14} {'change':>9}   basis")
    for name in [*lb, *(n for n in la if n not in lb)]:
        lines += _lane_rows(name, lb.get(name), la.get(name), rule)
    lines.append("ratios")
    for key in [*rb, *(k for k in ra if k not in rb)]:
        if key not in ra or key not in rb:
            where = "removed" if key in rb else "added"
            lines.append(_presence_row(key, rb.get(key), ra.get(key), where))
        else:
            lines.append(_row(key, rb[key], ra[key], rule))
    return not shape, "\n".join(lines)


def _load(path: Path) -> dict[str, Any]:
    """A results file, or ValueError saying why it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), dict) for k in ("lanes", "ratios")
    ):
        raise ValueError(f"{path}: not a benchmark results file (no 'lanes' and 'ratios')")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="without per-round figures: mark changes beyond this fraction",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="with per-round figures: mark changes beyond this multiple of the combined spread",
    )
    args = parser.parse_args(argv)
    try:
        before, after = _load(args.before), _load(args.after)
    except ValueError as e:
        print(f"python -m benchmarks compare: {e}", file=sys.stderr)
        return 2
    _, text = compare(before, after, Rule(tolerance=args.tolerance, spread=args.spread))
    print(f"{args.before} -> {args.after}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

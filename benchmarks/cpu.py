"""CPU accounting: the CPU milliseconds per request of every process a lane involves.

Each process's own CPU time (``psutil.Process.cpu_times()``, user + system)
is read just before and just after one measured round of one lane, and the
difference is divided by the requests served in that window.  RabbitMQ
(``beam.smp``) and Redis (``redis-server``) serve every lane, and the lanes run
one after another, so reading them around that lane's round alone attributes
their work to it (background traffic, e.g. heartbeats, lands on whichever lane
is running).

A *group* is a callable returning ``{key: cumulative CPU seconds}``: one key per
process, plus one for the CPU a parent has reaped from children that already
exited.  Between two samples a group's CPU is the sum over the keys of the
second sample of ``after - before`` (a key new in the window counts from 0; a
process that exited inside the window loses its last slice unless its parent
reaped it).  Groups: :func:`own` (one process), :func:`descendants` (the
process tree below one process, e.g. a worker's pool children).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import psutil

__all__ = [
    "CpuMeter",
    "Group",
    "descendants",
    "find_process",
    "own",
    "per_request_ms",
    "round_ms",
]

Group = Callable[[], dict[str, float]]  # key -> cumulative CPU seconds


class ProcessLike(Protocol):
    """What the meter reads of a process (``psutil.Process``, or a fake in tests)."""

    pid: int

    def cpu_times(self) -> Any: ...

    def children(self, recursive: bool = False) -> Any: ...


def _seconds(times: Any) -> float:
    return float(times.user + times.system)


def _reaped(times: Any) -> float:
    return float(getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0))


def own(proc: ProcessLike | None) -> Group:
    """The CPU of ``proc`` itself, all its threads (nothing when it is gone or None)."""

    def sample() -> dict[str, float]:
        if proc is None:
            return {}
        try:
            return {str(proc.pid): _seconds(proc.cpu_times())}
        except psutil.Error:
            return {}

    return sample


def descendants(proc: ProcessLike | None) -> Group:
    """The CPU of every live process below ``proc``, plus what ``proc`` reaped from exited ones."""

    def sample() -> dict[str, float]:
        if proc is None:
            return {}
        try:
            out = {f"{proc.pid}:reaped": _reaped(proc.cpu_times())}
            kids: Iterable[ProcessLike] = proc.children(recursive=True)
        except psutil.Error:
            return {}
        for child in kids:
            try:
                out[str(child.pid)] = _seconds(child.cpu_times())
            except psutil.Error:  # exited between the listing and the read
                continue
        return out

    return sample


def find_process(name: str) -> psutil.Process | None:
    """The first process on this host called ``name`` (e.g. ``beam.smp``), or None."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == name:
            return proc
    return None


class CpuMeter:
    """CPU seconds of named groups of processes over one window (``start`` ... ``stop``)."""

    def __init__(self, groups: Mapping[str, Group]) -> None:
        self.groups = dict(groups)
        self._before: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        self._before = {name: group() for name, group in self.groups.items()}

    def stop(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """CPU seconds of each group since :meth:`start`, plus ``extra`` (e.g. reported by peers)."""
        out: dict[str, float] = {}
        for name, group in self.groups.items():
            before, after = self._before.get(name, {}), group()
            if not after and not before:
                continue  # the group has no process here (e.g. the broker runs elsewhere)
            out[name] = sum(max(0.0, v - before.get(k, 0.0)) for k, v in after.items())
        for name, seconds in (extra or {}).items():
            out[name] = out.get(name, 0.0) + seconds
        return out


def round_ms(cpu_s: Mapping[str, float], served: int) -> dict[str, float]:
    """One round's CPU ms per request of each group, and their ``total``."""
    ms = {k: v * 1000.0 / served for k, v in cpu_s.items()}
    return {**ms, "total": sum(ms.values())}


def per_request_ms(rounds: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Median over rounds of each group's CPU ms per request, and of the rounds' ``total``.

    ``rounds``: each round's CPU seconds per group and the requests it served.
    ``total`` is the median of the per-round totals, so it need not equal the
    sum of the medians.
    """
    per_round = [round_ms(cpu_s, served) for cpu_s, served in rounds if served > 0]
    keys = [k for k in dict.fromkeys(k for r in per_round for k in r) if k != "total"]
    if not keys:
        return {}
    return {
        k: round(statistics.median(r[k] for r in per_round if k in r), 3) for k in [*keys, "total"]
    }

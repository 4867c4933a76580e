"""The capability router, plugged into Celery's ``task_routes``.

Celery calls ``router(name, args, kwargs, options, task=None, **kw)`` for every
task it publishes; the first non-None answer is the route.  For inference
tasks the decision ladder is:

1. sticky hit: the worker remembered for this (model, requirements) key is
   alive, still capable and under its in-flight limit -> its own queue;
2. sticky worker alive and capable but at its in-flight limit, or not
   accepting (it cannot consume now): *spill* this one request to the best
   other capable worker (one that consumes, even if busy, before one that
   cannot), and keep the sticky entry (affinity survives a burst; a busy
   worker is not forgotten);
3. otherwise (no entry, or its worker died or lost the capability) the best
   capable worker (model already loaded, least loaded, most free memory)
   -> its own queue, and remember it;
4. otherwise, if the registry snapshot is older than a heartbeat interval,
   refresh it once (one store read, at most one per 100 ms) and decide again,
   so a stale snapshot never refuses a live fleet;
5. otherwise refuse: ``apply_async`` raises before anything is published.
   If live workers exist but none advertises the requested ``dtype``, that is
   :func:`~models.errors.unsupported_dtype` (an ``UnsupportedDtype``, as a
   worker would raise); else :class:`~models.errors.NoCapableWorker` naming
   each worker's unmet requirement;
6. admission (a request with a deadline, :mod:`routing.admission`): if the
   chosen worker's expected wait does not fit the time left, the capable
   worker whose wait fits best takes it; if none fits,
   :class:`~models.errors.Overloaded`, nothing published.

The router reads a cached registry snapshot and waits on the network only in
step 4.  A ``requires`` header that is not a valid requirement raises
:class:`~models.errors.BadRequirements` (see :meth:`TaskRequirements.merged`).
A caller's explicit ``queue=`` always wins (Celery merges options over the
route), and such calls are not routed at all.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from models.errors import InferenceError, NoCapableWorker, UnsupportedDtype, unsupported_dtype
from routing.admission import Admission, deadline_of
from routing.capabilities import DTYPES, TaskRequirements, WorkerCapabilities, best, match, unmet
from routing.sticky import StickyCache

__all__ = ["REQUIRES_HEADER", "CapabilityRouter", "RouterStats"]

# Per-call requirements travel in this message header, e.g.
# infer.apply_async(args, headers={"requires": {"device": "cuda", "dtype": "bf16"}})
REQUIRES_HEADER = "requires"


@dataclass
class RouterStats:
    """Decision counts and a bounded reservoir of decision times (µs)."""

    decisions: int = 0
    sticky_hits: int = 0
    fallbacks: int = 0  # sticky worker gone or no longer capable: chose and recorded another
    spills: int = 0  # sticky worker at its in-flight limit: this request went elsewhere
    misses: int = 0  # no sticky entry: chose fresh
    errors: int = 0  # refused: NoCapableWorker or UnsupportedDtype raised
    overloaded: int = 0  # refused by admission control: Overloaded raised
    rerouted: int = 0  # the chosen worker's wait did not fit the deadline: another one's did
    decision_us: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sticky_hit_rate(self) -> float:
        return self.sticky_hits / self.decisions if self.decisions else 0.0

    def as_dict(self) -> dict[str, Any]:
        times = sorted(self.decision_us)
        pct = (
            {f"p{q}": times[min(len(times) - 1, int(len(times) * q / 100))] for q in (50, 99)}
            if times
            else {}
        )
        return {
            "decisions": self.decisions,
            "sticky_hits": self.sticky_hits,
            "fallbacks": self.fallbacks,
            "spills": self.spills,
            "misses": self.misses,
            "errors": self.errors,
            "overloaded": self.overloaded,
            "rerouted": self.rerouted,
            "sticky_hit_rate": round(self.sticky_hit_rate, 4),
            "decision_us": {k: round(v, 2) for k, v in pct.items()},
        }


class CapabilityRouter:
    """Routes requests to capable workers' own queues, with sticky model affinity."""

    def __init__(
        self,
        workers: Callable[[], Mapping[str, WorkerCapabilities]],
        requirements_for: Callable[[str, Any, Any], TaskRequirements | None],
        sticky: StickyCache | None = None,
        clock: Callable[[], float] = time.perf_counter,
        admission: Admission | None = None,
    ) -> None:
        self._workers = workers
        self._requirements_for = requirements_for
        self.sticky = sticky or StickyCache()
        self.admission = admission or Admission()
        self.stats = RouterStats()
        self._clock = clock
        # The LiveRegistry feeding ``workers``, when there is one: refreshed once before a refusal.
        self.registry: Any = None
        # How the client looks a model's spec up (tasks.client.specs.SpecLookup), when built by it.
        self.specs: Any = None

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        if options.get("queue") or options.get("routing_key"):
            return None
        # As the caller gave them: a string or a non-mapping is the caller's mistake to name.
        base = self._requirements_for(name, args, kwargs)
        if base is None:
            return None  # not an inference task: Celery's default routing applies
        overrides = (options.get("headers") or {}).get(REQUIRES_HEADER)
        req = base if overrides is None else base.merged(overrides)  # BadRequirements
        return {"queue": self.decide(req, deadline_of(options)).queue}

    def decide(self, req: TaskRequirements, deadline: float | None = None) -> WorkerCapabilities:
        """The ladder, then admission against ``deadline`` (wall-clock seconds; see the module)."""
        chosen = self._decide(req)
        if deadline is not None and self.admission.enabled:
            workers = self._workers()
            try:
                admitted = self.admission.choose(chosen, match(req, workers.values()), deadline)
            except InferenceError:
                self._count("overloaded", decision=False)
                raise
            if admitted is not chosen:
                self._count("rerouted", decision=False)
                chosen = admitted
        self.admission.routed(chosen)
        return chosen

    def _decide(self, req: TaskRequirements) -> WorkerCapabilities:
        """The ladder: sticky hit, spill, best capable worker, else refuse (see the module)."""
        started = self._clock()
        try:
            workers = self._workers()
            key = req.key
            remembered = self.sticky.get(key)
            if remembered is not None:
                w = workers.get(remembered)
                if w is not None and unmet(req, w) is None:
                    if w.in_flight < w.max_in_flight and w.accepting:
                        self._count("sticky_hits")
                        return w
                    spill, busy = best(req, workers.values(), exclude=w.name)
                    self._count("spills")
                    if spill is None and not w.accepting and busy is not None and busy.accepting:
                        spill = busy  # a busy worker that consumes beats one that cannot
                    return spill or w  # everyone else busy or incapable: queue behind it
                self.sticky.invalidate(key)
            chosen = self._best(req, workers)
            if chosen is None and self._refreshed():
                workers = self._workers()
                chosen = self._best(req, workers)
            if chosen is None:
                self._count("errors", decision=False)
                raise _refusal(req, workers)
            self.sticky.put(key, chosen.name, req.model)
            self._count("fallbacks" if remembered is not None else "misses")
            return chosen
        finally:
            self.stats.decision_us.append((self._clock() - started) * 1e6)

    def _best(
        self, req: TaskRequirements, workers: Mapping[str, WorkerCapabilities]
    ) -> WorkerCapabilities | None:
        top_free, top_any = best(req, workers.values(), affinity=self.sticky.keys_per_worker())
        return top_free or top_any  # all busy: the least loaded capable one

    def _refreshed(self) -> bool:
        """Whether the registry renewed a stale snapshot just now (at most once per 100 ms)."""
        return self.registry is not None and bool(self.registry.refresh_if_stale())

    def explain(self, req: TaskRequirements) -> list[str]:
        """The decision ladder for ``req`` as readable lines, without changing any state."""
        workers = self._workers()
        lines = [f"requirements: {req}", f"sticky key: {req.key}"]
        remembered = self.sticky.get(req.key)
        if remembered is None:
            lines.append("1. sticky: no entry in this process (each client keeps its own cache)")
        else:
            w = workers.get(remembered)
            state = (
                "gone (no heartbeat)"
                if w is None
                else f"lacks {unmet(req, w)}"
                if unmet(req, w)
                else f"in flight {w.in_flight}/{w.max_in_flight}"
            )
            lines.append(f"1. sticky: remembered {remembered}: {state}")
        lines.append(f"2. workers ({len(workers)} live), best first:")
        ranked = {w.name: i for i, w in enumerate(match(req, workers.values()))}
        for w in sorted(workers.values(), key=lambda w: ranked.get(w.name, len(ranked))):
            why = unmet(req, w)
            if why:
                lines.append(f"   - {w.name}: cannot serve: lacks {why}")
            else:
                lines.append(
                    f"   - {w.name}: capable; queue {w.queue}; in flight {w.in_flight}/"
                    f"{w.max_in_flight}; free {w.free_memory_mb} MB; loaded "
                    f"{', '.join(w.models_loaded) or '-'}"
                )
        try:
            chosen = _peek(self, req, workers)
        except (NoCapableWorker, UnsupportedDtype) as e:
            lines.append(f"3. decision: {type(e).__name__}: {e}")
        else:
            lines.append(f"3. decision: {chosen.name} -> queue {chosen.queue}")
        return lines

    def _count(self, outcome: str, decision: bool = True) -> None:
        with self.stats._lock:
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            if decision:
                self.stats.decisions += 1


def _peek(
    router: CapabilityRouter, req: TaskRequirements, workers: Mapping[str, WorkerCapabilities]
) -> WorkerCapabilities:
    """What ``decide`` would return, on a copy of the state (no sticky update, no stats)."""
    probe = CapabilityRouter(lambda: workers, router._requirements_for, router.sticky.copy())
    return probe._decide(req)


def _refusal(req: TaskRequirements, workers: Mapping[str, WorkerCapabilities]) -> InferenceError:
    """Why nobody can serve ``req``: the precision when no live worker runs it at all, else
    every worker's unmet requirement."""
    if workers and req.dtype is not None:
        fleet = {d for w in workers.values() for d in w.dtypes}
        if req.dtype not in fleet:
            order = {d: i for i, d in enumerate(DTYPES)}
            supported = sorted(fleet, key=lambda d: (order.get(d, len(order)), d))
            return unsupported_dtype(req.dtype, "any live worker", supported)
    return NoCapableWorker(_explain(req, workers))


def _explain(req: TaskRequirements, workers: Mapping[str, WorkerCapabilities]) -> str:
    if not workers:
        return (
            "no live worker is registered: start one (make worker, or celery -A tasks worker) and "
            "check that it can reach the broker and the registry"
        )
    reasons = "; ".join(f"{w.name} lacks {unmet(req, w)}" for w in workers.values())
    return (
        f"no live worker can serve model {req.model!r} with {req}: {reasons}. Relax the "
        "requirement (headers={'requires': ...}) or start a worker that has it"
    )

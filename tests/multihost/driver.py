"""The client host's program: load through the router, and the ledger of every request.

The multihost tests run this on the client host (``ip netns exec <client>
python -m tests.multihost.driver``), so the client's connections leave from
the client's own address like every other process of the deployment.  The
test drives it over stdin/stdout, one JSON object per line each way:

``{"op": "start", "rate": 40, "models": ["mlp"]}``
    publish ``infer`` requests with stock ``apply_async`` through the
    project's router, ``rate`` per second, in a thread, until ``stop``;
``{"op": "stats"}``, ``{"op": "stop"}``
    counts so far (``stop`` first ends the load and waits for the thread);
``{"op": "burst", "n": 60, "queue": "..."}``
    ``n`` requests to one queue (a worker's own, to see that it serves);
``{"op": "registry"}``
    the workers this client's router sees alive now (a fresh read);
``{"op": "routed", "since": ..., "until": ...}``
    publishes per routing key in that time window, and the last one's time;
``{"op": "report", "timeout": 120}``
    the ledger: every id's outcome (see :mod:`tests.reliability.ledger`),
    plus each unpublished call's error class and how long it took to raise,
    latencies (submit to stored result) and the longest gap in completions.

Every ``apply_async`` is timed: a call that raises is ``unpublished`` with
its error's class; the scenario checks that each is a typed
:class:`~models.errors.InferenceError` raised within the publish-retry window.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from celery.signals import before_task_publish

from models.errors import InferenceError
from tasks.app import InferenceApp
from tasks.settings import Settings
from tests.reliability.ledger import Ledger, sample

__all__ = ["Driver", "main"]


def inputs(model: str, seed: int) -> dict[str, Any]:
    """One request's input for a small zoo model (mlp, cnn or transformer)."""
    if model == "mlp":
        return sample(seed)
    import numpy as np

    from tasks.wire.codec import encode

    rng = np.random.default_rng(seed)
    if model == "cnn":
        return encode(rng.standard_normal((1, 3, 32, 32)).astype(np.float32), binary=True)
    if model == "transformer":
        return encode(rng.integers(0, 1000, (1, 16)).astype(np.int64), binary=True)
    raise ValueError(f"the driver has no input for {model!r}")


class Driver:
    def __init__(self, scenario: str, run_id: str) -> None:
        self.app = InferenceApp(Settings.from_env())
        self.ledger = Ledger(self.app, scenario, run_id)
        self.infer = self.app.tasks["tasks.infer"]
        self.lock = threading.Lock()
        self.submitted_at: dict[str, float] = {}
        self.failed_calls: list[dict[str, Any]] = []
        self.publishes: list[tuple[float, str, str]] = []  # (time, routing key, id) of each publish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seq = 0
        self.seen: dict[str, float] = {}  # task id -> when this client saw its outcome published
        before_task_publish.connect(self._on_publish, weak=False)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """Note when each outcome reaches this client (Redis PUBLISHes every stored result).

        That, not the worker's ``date_done`` (stamped before the write crosses its
        link), is the completion time a caller sees.
        """
        keyprefix = self.app.backend.task_keyprefix
        prefix = keyprefix.decode() if isinstance(keyprefix, bytes) else str(keyprefix)
        while True:
            try:
                pubsub = self.app.backend.client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(prefix + "*")
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    at = time.time()
                    meta = self.app.backend.decode_result(message["data"])
                    if meta.get("status") in ("SUCCESS", "FAILURE"):
                        task_id = message["channel"].decode()[len(prefix) :]
                        self.seen.setdefault(task_id, at)
            except Exception:
                time.sleep(0.5)

    def _on_publish(
        self, routing_key: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        with self.lock:
            self.publishes.append((time.time(), routing_key or "", str((headers or {}).get("id"))))

    # ----- load ---------------------------------------------------------------------------

    def send_one(self, model: str, **options: Any) -> None:
        with self.lock:
            self.seq += 1
            seq = self.seq
        task_id = str(uuid.uuid4())
        headers = {**self.ledger.headers, **options.pop("headers", {})}
        t0 = time.time()
        try:
            self.infer.apply_async(
                (model, inputs(model, seq)), task_id=task_id, headers=headers, **options
            )
        except Exception as e:
            with self.lock:
                self.ledger.unpublished.append(task_id)
                self.failed_calls.append(
                    {
                        "id": task_id,
                        "error": type(e).__name__,
                        "typed": isinstance(e, InferenceError),
                        "seconds": round(time.time() - t0, 3),
                        "message": str(e)[:300],
                        "at": t0,
                    }
                )
            return
        with self.lock:
            self.ledger.ids.append(task_id)
            self.submitted_at[task_id] = t0

    def _load(self, rate: float, models: list[str], limit: int | None) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set() and (limit is None or i < limit):
            self.send_one(models[i % len(models)])
            i += 1
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)
            else:  # a slow publish (a failover): carry on at the rate from now, no catch-up burst
                next_at = time.monotonic()

    def start(self, rate: float, models: list[str], limit: int | None = None) -> dict[str, Any]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._load, args=(rate, models, limit), daemon=True)
        self._thread.start()
        return self.stats()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "published": len(self.ledger.ids),
                "unpublished": len(self.ledger.unpublished),
                "time": time.time(),
            }

    def burst(self, n: int, queue: str, model: str = "mlp") -> dict[str, Any]:
        ids_before = len(self.ledger.ids)
        for _ in range(n):
            self.send_one(model, queue=queue)
        with self.lock:
            ids = self.ledger.ids[ids_before:]
        outcomes = self.ledger.wait(60.0, ids)
        served_by: dict[str, int] = {}
        for meta in outcomes.values():
            result = meta.get("result")
            if meta.get("status") == "SUCCESS" and isinstance(result, dict):
                worker = str(result.get("worker"))
                served_by[worker] = served_by.get(worker, 0) + 1
        return {"sent": len(ids), "done": len(outcomes), "served_by": served_by}

    # ----- views --------------------------------------------------------------------------

    def registry(self) -> dict[str, Any]:
        registry = self.app.router.registry
        registry.refresh()
        return {"workers": sorted(registry.workers()), "time": time.time()}

    def routed(self, since: float, until: float | None = None) -> dict[str, Any]:
        """How many publishes went to each routing key in ``[since, until]``, and the last one's time."""
        until = until or time.time()
        counts: dict[str, int] = {}
        last: dict[str, float] = {}
        with self.lock:
            for at, key, _ in self.publishes:
                if since <= at <= until:
                    counts[key] = counts.get(key, 0) + 1
                    last[key] = max(last.get(key, 0.0), at)
        return {"counts": counts, "last": last}

    def report(self, timeout: float) -> dict[str, Any]:
        self.stop()
        report = self.ledger.report(timeout, save=False)
        outcomes = self.ledger.outcomes()
        latencies: list[float] = []
        done_times: list[float] = []
        completions: list[tuple[str, float, float, str]] = []  # id, submitted, done, worker
        served_by: dict[str, int] = {}
        for task_id, meta in outcomes.items():
            done = meta.get("date_done")
            if isinstance(done, datetime):
                stamp = done.replace(tzinfo=done.tzinfo or UTC).timestamp()
            elif isinstance(done, str):
                stamp = datetime.fromisoformat(done).replace(tzinfo=UTC).timestamp()
            else:
                continue
            stamp = self.seen.get(task_id, stamp)
            done_times.append(stamp)
            result = meta.get("result")
            worker = str(result.get("worker")) if isinstance(result, dict) else "-"
            if task_id in self.submitted_at:
                latencies.append(stamp - self.submitted_at[task_id])
                completions.append((task_id, self.submitted_at[task_id], stamp, worker))
            if meta.get("status") == "SUCCESS" and isinstance(result, dict):
                served_by[worker] = served_by.get(worker, 0) + 1
        done_times.sort()
        gaps = [(b - a, a) for a, b in itertools.pairwise(done_times)]
        longest = max(gaps, default=(0.0, 0.0))
        executions = self.ledger.executions()
        unpublished_ran = [i for i in self.ledger.unpublished if executions.get(i, 0) > 0]
        return {
            "ledger": report.__dict__,
            "line": report.line(),
            "failed_calls": self.failed_calls,
            "unpublished_but_ran": len(unpublished_ran),
            "latencies": sorted(latencies),
            "longest_gap_s": round(longest[0], 3),
            "longest_gap_from": longest[1],
            "served_by": served_by,
            "seen_by_client": sum(1 for i in outcomes if i in self.seen),
            "completions": sorted(completions, key=lambda c: c[1]),
            "publishes": self.publishes,
        }


def main() -> int:
    scenario, run_id = sys.argv[1], sys.argv[2]
    driver = Driver(scenario, run_id)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        try:
            reply: Any = getattr(driver, op)(**command)
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply, default=str), flush=True)
        if op == "report":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

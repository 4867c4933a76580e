"""The batch sizer: each model's cap, from its forward passes' compute time per sample."""

from __future__ import annotations

from tasks.worker.sizing import BatchSizer, size_bin


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bins_are_powers_of_two() -> None:
    assert [size_bin(n) for n in (0, 1, 2, 3, 4, 31, 32, 33, 64)] == [1, 1, 2, 2, 4, 16, 32, 32, 64]


def test_a_model_whose_batches_get_cheaper_per_sample_is_never_capped() -> None:
    sizer = BatchSizer(clock=Clock())
    assert sizer.cap("minilm@1", 64) == 64  # nothing observed yet
    sizer.observe("minilm@1", 1, 14.0)  # 14 ms a sentence alone
    sizer.observe("minilm@1", 64, 64 * 5.8)  # 5.8 ms a sentence in a batch of 64
    assert sizer.cap("minilm@1", 64) == 64
    sizer.observe("minilm@1", 8, 8 * 7.0)
    assert sizer.cap("minilm@1", 64) == 64  # the largest size is the cheapest: no cap


def test_a_model_whose_batches_get_dearer_is_capped_where_it_is_cheapest() -> None:
    # ResNet-50 on one CPU thread, measured in process: 121 ms an image alone, 178 in a batch of 32.
    sizer = BatchSizer(clock=Clock())
    sizer.observe("resnet50@1", 1, 121.0)
    sizer.observe("resnet50@1", 32, 32 * 178.0)
    assert sizer.cap("resnet50@1", 32) == 1
    sizer.observe("resnet50@1", 4, 4 * 125.0)  # within 10% of the best: still worth it
    assert sizer.cap("resnet50@1", 32) == 4
    assert sizer.cap("resnet50@1", 2) == 2  # never above the model's own limit
    assert sizer.cap("mlp@1", 32) == 32  # each model on its own


def test_a_capped_model_probes_one_size_up_now_and_then() -> None:
    clock = Clock()
    sizer = BatchSizer(explore_s=60.0, explore_window_s=10.0, clock=clock)
    sizer.observe("m@1", 1, 100.0)
    sizer.observe("m@1", 16, 16 * 150.0)
    assert sizer.cap("m@1", 16) == 1
    clock.t += 59.0
    assert sizer.cap("m@1", 16) == 1
    clock.t += 2.0  # a minute after the cap: one size up, until a pass that big is observed
    assert sizer.cap("m@1", 16) == 2
    assert sizer.cap("m@1", 16) == 2
    sizer.observe("m@1", 2, 2 * 104.0)  # as cheap as batch 1 (within 10%): the cap grows
    assert sizer.cap("m@1", 16) == 2
    clock.t += 61.0
    assert sizer.cap("m@1", 16) == 4  # the next probe goes one size further
    sizer.observe("m@1", 4, 4 * 140.0)  # dearer: the cap stays at 2
    assert sizer.cap("m@1", 16) == 2
    sizer.observe("m@1", 16, 16 * 90.0)  # conditions changed: big batches pay now
    assert sizer.cap("m@1", 16) == 2  # one big pass: its average is 132 ms
    for _ in range(3):  # 119.4, 110.6, 104.4 ms: within 10% of the best (100)
        sizer.observe("m@1", 16, 16 * 90.0)
    assert sizer.cap("m@1", 16) == 16  # the largest size is within reach: no cap


def test_an_exploration_with_no_big_pass_ends_after_its_window() -> None:
    clock = Clock()
    sizer = BatchSizer(explore_s=60.0, explore_window_s=10.0, clock=clock)
    sizer.observe("m@1", 1, 100.0)
    sizer.observe("m@1", 16, 16 * 150.0)
    clock.t += 61.0
    assert sizer.cap("m@1", 16) == 2  # probing
    clock.t += 11.0  # too few requests came to form a batch of 2: the window closes
    assert sizer.cap("m@1", 16) == 1


def test_nonsense_passes_are_ignored() -> None:
    sizer = BatchSizer(clock=Clock())
    sizer.observe("m@1", 0, 10.0)
    sizer.observe("m@1", 4, 0.0)
    sizer.observe("m@1", 1, 10.0)
    assert sizer.cap("m@1", 8) == 8  # one size observed: nothing to compare yet


def test_a_tiny_model_is_never_capped_by_noise_the_pass_overhead_dwarfs() -> None:
    sizer = BatchSizer(clock=Clock())  # 2 ms a pass besides its forward pass
    sizer.observe("mlp@1", 1, 0.05, 64)
    sizer.observe("mlp@1", 32, 32 * 0.08, 64)  # 60% dearer per sample in compute alone
    assert sizer.cap("mlp@1", 32) == 32  # but a pass of 32 shares the 2 ms: far cheaper


def test_text_passes_compare_per_token_not_per_sentence() -> None:
    # One 8-token sentence alone, then four sentences padded to 64 tokens: dearer per sentence
    # (12 ms against 20.5 with the pass overhead), cheaper per token (1.5 against 0.32). Compared
    # per sentence, the worker of tests/integration/test_real_models.py capped minilm at 1.
    sizer = BatchSizer(clock=Clock())
    sizer.observe("minilm@1", 1, 10.0, 8)
    sizer.observe("minilm@1", 4, 80.0, 64)
    assert sizer.cap("minilm@1", 64) == 64
    per_sentence = BatchSizer(clock=Clock())  # the same passes, sizes ignored
    per_sentence.observe("minilm@1", 1, 10.0)
    per_sentence.observe("minilm@1", 4, 80.0)
    assert per_sentence.cap("minilm@1", 64) == 1

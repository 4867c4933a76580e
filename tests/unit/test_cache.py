from __future__ import annotations

import logging

import pytest

from models.cache import ModelCache
from models.errors import ModelTooLarge

SIZES = {"a": 40, "b": 30, "c": 50, "huge": 101}


def make(budget: int = 100) -> tuple[ModelCache[str, str], list[str]]:
    loads: list[str] = []

    def load(key: str) -> str:
        loads.append(key)
        return f"model-{key}"

    return ModelCache(budget, load=load, size_of=lambda v: SIZES[v.removeprefix("model-")]), loads


def test_hits_do_not_reload() -> None:
    cache, loads = make()
    assert cache.get("a") == "model-a"
    assert cache.get("a") == "model-a"
    assert loads == ["a"] and cache.stats.hits == 1 and cache.stats.loads == 1


def test_least_recently_used_is_evicted_under_budget(caplog: pytest.LogCaptureFixture) -> None:
    cache, loads = make(budget=100)
    cache.get("a")  # 40
    cache.get("b")  # 70
    cache.get("a")  # a is now most recent
    with caplog.at_level(logging.WARNING, logger="models.cache"):
        cache.get("c")  # 120 > 100: evict b (LRU), not a
    assert cache.keys() == ["a", "c"]
    assert cache.used_bytes == 90 <= cache.budget_bytes
    assert cache.stats.evictions == 1
    assert "evicted model 'b'" in caplog.text and "over budget" in caplog.text
    cache.get("b")  # back in: evicts a (LRU now)
    assert cache.keys() == ["c", "b"] and loads == ["a", "b", "c", "b"]


def test_model_bigger_than_budget_is_refused_and_evicts_nothing() -> None:
    cache, _ = make(budget=100)
    cache.get("a")
    with pytest.raises(ModelTooLarge, match="INFER_CACHE_BUDGET_MB"):
        cache.get("huge")
    assert cache.keys() == ["a"]


def test_evict_on_request_calls_hook() -> None:
    evicted: list[str] = []
    cache: ModelCache[str, str] = ModelCache(100, load=str, size_of=len, on_evict=evicted.append)
    cache.get("x")
    assert cache.evict("x") and not cache.evict("x")
    assert evicted == ["x"] and "x" not in cache

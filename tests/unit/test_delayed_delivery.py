"""Native delayed delivery is set up through the connected node of a cluster, not through each."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tasks.worker.consumer import TelemetryConsumer
from tasks.worker.delayed_delivery import ClusterDelayedDelivery

NODES = "amqp://g:g@n1:5672//;amqp://g:g@n2:5672//;amqp://g:g@n3:5672//"


def _consumer(connected_host: str) -> Any:
    conf = SimpleNamespace(broker_url=NODES, broker_native_delayed_delivery_queue_type="quorum")
    return SimpleNamespace(
        app=SimpleNamespace(conf=conf),
        connection=SimpleNamespace(hostname=connected_host, port=5672),
    )


def test_the_consumer_blueprint_uses_the_cluster_step() -> None:
    steps = TelemetryConsumer.Blueprint.default_steps
    assert "tasks.worker.delayed_delivery:ClusterDelayedDelivery" in steps
    assert not any(s.endswith("delayed_delivery:DelayedDelivery") for s in steps)


@pytest.mark.parametrize(
    ("connected", "down", "tried"),
    [
        ("n2", set(), ["n2"]),  # the node it is connected to, and no other
        ("n3", {"n3"}, ["n3", "n1"]),  # that one fails: the next, in order
        ("n1", {"n1", "n2", "n3"}, ["n1", "n2", "n3"]),  # all down: each once, then it gives up
    ],
)
def test_set_up_through_the_connected_node_first(
    connected: str, down: set[str], tried: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def setup(c: Any, url: str) -> None:
        host = url.split("@")[1].split(":")[0]
        seen.append(host)
        if host in down:
            raise ConnectionRefusedError(host)

    step = ClusterDelayedDelivery.__new__(ClusterDelayedDelivery)
    monkeypatch.setattr(step, "_validate_configuration", lambda app: None)
    monkeypatch.setattr(step, "_setup_delayed_delivery", setup)
    step.start(_consumer(connected))
    assert seen == tried

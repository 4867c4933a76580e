"""Issue 16's seven scenarios, each under publish-and-consume load through the router.

Every scenario keeps the fault suite's ledger (submitted, succeeded, failed
typed, lost, unpublished, run twice), prints it and saves it, with its own
figures, to ``var/multihost/<scenario>.json`` (``python -m tests.multihost.table``
renders the docs table from those files).  The load is ``infer`` on ``mlp``
from the client host, ``scale.rate`` requests a second.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from tests.multihost.conftest import (
    BROKER_HEARTBEAT_S,
    FULL,
    HEARTBEAT_S,
    WORKERS,
    Deployment,
    Driver,
    Scale,
    save,
)

pytestmark = [pytest.mark.multihost, pytest.mark.integration, pytest.mark.timeout(600)]

# How long a router may still send to a worker after it fell silent: its record's TTL (two
# heartbeats), plus the client's registry refresh (0.5 s) and a beat in progress.
DROP_WITHIN_S = 2 * HEARTBEAT_S + 1.5
MODELS = ["mlp", "cnn", "transformer"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def check_ledger(record: dict[str, Any], window_s: float | None = None) -> None:
    """0 lost, no untyped failure; every raised publish typed and within the window."""
    ledger = record["ledger"]
    assert ledger["lost"] == 0, record["line"]
    assert ledger["failed"] == {}, record["line"]
    assert ledger["succeeded"] + ledger["unpublished"] == ledger["submitted"], record["line"]
    for call in record["failed_calls"]:
        assert call["typed"], f"an untyped publish error reached the caller: {call}"
        # A fault may fail a publish, never make a good request look bad.
        assert call["error"] == "PublishFailed", f"not a publish failure: {call}"
        if window_s is not None:
            assert call["seconds"] <= window_s, (
                f"raised after {call['seconds']}s > {window_s}s: {call}"
            )


def finish(driver: Driver, scenario: str, wait: float = 180.0, **extra: Any) -> dict[str, Any]:
    record = driver.call("report", timeout=wait, wait=wait + 60)
    driver.close()
    record.update(extra, scale="full" if FULL else "reduced")
    lat = record["latencies"]
    record["p50_ms"] = round(percentile(lat, 0.5) * 1000, 1)
    record["p99_ms"] = round(percentile(lat, 0.99) * 1000, 1)
    save(scenario, record)
    return record


def busiest(driver: Driver, deployment: Deployment, since: float) -> str:
    """The worker host whose own queue this client sent most to since ``since`` (the sticky one)."""
    counts = driver.call("routed", since=since)["counts"]
    by_host = {h: counts.get(deployment.workers[h].own_queue, 0) for h in WORKERS}
    return max(by_host, key=lambda h: by_host[h])


def loaded(
    d: Deployment, scenario: str, scale: Scale, warm_s: float | None = None
) -> tuple[Driver, str]:
    """The scenario's driver publishing ``mlp`` at ``scale.rate``, and after ``warm_s``
    (default ``scale.seconds``) of it, the worker host its router sticks to."""
    driver = d.driver(scenario)
    started = time.time()
    driver.call("start", rate=scale.rate, models=["mlp"])
    time.sleep(scale.seconds if warm_s is None else warm_s)
    return driver, busiest(driver, d, started)


def wait_for(predicate: Any, timeout: float, every: float = 0.25) -> float | None:
    """Poll ``predicate`` until true; the time it became true, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(every)
    return None


def test_kill_queue_leader_broker(healthy: Deployment, scale: Scale) -> None:
    """1. ``kill -9`` of the node leading the class queue: 0 confirmed publishes lost."""
    d = healthy
    status = d.cluster.queue_status("cpu")
    assert len(status["members"]) == 3, f"class queue not replicated on 3 nodes: {status}"
    victim = d.cluster.by_node(str(status["leader"]))
    driver = d.driver("broker_leader_kill")
    # Three models: three sticky keys, spread over the three workers' own queues, whose
    # leaders (each declared through its worker's first node) spread over the nodes.
    driver.call("start", rate=scale.rate, models=MODELS)
    time.sleep(scale.seconds)
    leaders = {
        q: d.cluster.queue_status(q).get("leader")
        for q in ["cpu", *(w.own_queue for w in d.workers.values())]
    }
    killed_at = time.time()
    victim.kill9()
    time.sleep(scale.seconds * 2)
    record = finish(
        driver, "broker_leader_kill", killed=victim.node, killed_at=killed_at, leaders=leaders
    )
    after = [c for c in record["completions"] if c[1] >= killed_at]
    flowing = min((c[2] for c in after), default=None)
    record["flowing_again_s"] = round(flowing - killed_at, 2) if flowing else None
    led = sorted(q for q, node in leaders.items() if node == victim.node)
    record["summary"] = (
        f"killed the leader of {', '.join(led)}; a task published after the kill completed "
        f"{record['flowing_again_s']} s after it; longest pause between completions "
        f"{record['longest_gap_s']} s; p99 {record['p99_ms']} ms"
    )
    save("broker_leader_kill", record)
    check_ledger(record)
    assert after, "no task published after the kill completed"
    new_leader = d.cluster.queue_status(
        "cpu", via=d.cluster.nodes[(d.cluster.nodes.index(victim) + 1) % 3]
    )
    assert new_leader.get("leader") != victim.node, new_leader
    victim.start()
    victim.wait_running()


def test_minority_partition(healthy: Deployment, scale: Scale) -> None:
    """2. One broker node cut off from the other two, then healed: its clients fail over."""
    d = healthy
    minority = "broker3"  # worker3 and the client list it first
    driver = d.driver("broker_minority_partition")
    driver.call("start", rate=scale.rate, models=MODELS)
    time.sleep(scale.seconds)
    cut_at = time.time()
    d.topology.drop(minority, ["broker1", "broker2"], "both")
    node = d.cluster.nodes[2]
    # pause_minority: the cut node notices (net_ticktime) and stops its listeners.
    paused_at = wait_for(lambda: not d.topology.reachable("client", minority, 5672), 60.0, 1.0)
    time.sleep(scale.seconds)
    d.topology.heal(minority)
    healed_at = time.time()
    rejoined_at = wait_for(lambda: len(d.cluster.running_nodes(via=node)) == 3, 120.0, 1.0)
    time.sleep(scale.seconds)
    record = finish(
        driver,
        "broker_minority_partition",
        cut_at=cut_at,
        minority_paused_after_s=round(paused_at - cut_at, 1) if paused_at else None,
        rejoined_after_heal_s=round(rejoined_at - healed_at, 1) if rejoined_at else None,
    )
    record["summary"] = (
        f"the cut node paused (pause_minority) {record['minority_paused_after_s']} s after the cut; "
        f"its clients (the client, worker3) failed over; longest pause between completions "
        f"{record['longest_gap_s']} s; rejoined {record['rejoined_after_heal_s']} s after the heal"
    )
    save("broker_minority_partition", record)
    check_ledger(record)
    assert paused_at is not None, "the minority node kept serving clients (pause_minority)"
    assert rejoined_at is not None, "the minority node did not rejoin after the heal"


def test_worker_host_cut_off(healthy: Deployment, scale: Scale) -> None:
    """3. A worker host cut off from everything for longer than two heartbeats, then healed."""
    d = healthy
    driver, host = loaded(d, "worker_host_cut", scale)
    victim = d.workers[host]
    cut_at = time.time()
    d.topology.cut(host)
    dropped_at = wait_for(lambda: victim.hostname not in driver.call("registry")["workers"], 30.0)
    # Longer than two heartbeats, and than the broker's two AMQP heartbeats: the broker
    # drops the silent connection and requeues what the cut worker held.
    time.sleep(max(3 * HEARTBEAT_S, 3 * BROKER_HEARTBEAT_S))
    healed_at = time.time()
    d.topology.heal(host)
    back_at = wait_for(lambda: victim.hostname in driver.call("registry")["workers"], 90.0, 0.5)
    burst = driver.call("burst", n=20, queue=victim.own_queue, wait=120)
    time.sleep(scale.seconds)
    stop_routing = cut_at + DROP_WITHIN_S
    late = driver.call("routed", since=stop_routing, until=healed_at)["counts"].get(
        victim.own_queue, 0
    )
    record = finish(
        driver,
        "worker_host_cut",
        host=host,
        cut_s=round(healed_at - cut_at, 1),
        dropped_from_registry_after_s=round(dropped_at - cut_at, 2) if dropped_at else None,
        routed_to_it_after_drop=late,
        rejoined_after_heal_s=round(back_at - healed_at, 1) if back_at else None,
        served_after_heal=burst,
        cut_at=cut_at,
        healed_at=healed_at,
    )
    # The requests routed to its queue while it was cut (before the router dropped it) ran
    # on other hosts: its own queue's TTL moved them to the class queue.
    routed_ids = {
        i
        for at, key, i in record["publishes"]
        if key == victim.own_queue and cut_at <= at < healed_at
    }
    done = {c[0]: c[3] for c in record["completions"]}
    elsewhere = sum(1 for i in routed_ids if i in done and done[i] != victim.hostname)
    record["routed_to_it_while_cut"] = len(routed_ids)
    record["run_by_other_hosts"] = elsewhere
    record["summary"] = (
        f"out of the registry {record['dropped_from_registry_after_s']} s after the cut (limit "
        f"{DROP_WITHIN_S} s), {late} requests routed to it after that; {elsewhere} requests "
        f"sent to its queue ran on other hosts; back {record['rejoined_after_heal_s']} s after "
        f"the heal and served {burst['served_by'].get(victim.hostname, 0)} of 20 sent to it"
    )
    save("worker_host_cut", record)
    check_ledger(record)
    assert dropped_at is not None and dropped_at - cut_at <= DROP_WITHIN_S, record
    assert late == 0, f"the router sent {late} requests to the cut worker after it dropped out"
    assert back_at is not None, "the healed worker did not come back into the registry"
    assert burst["served_by"].get(victim.hostname, 0) > 0, (
        f"the healed worker served nothing: {burst}"
    )
    assert elsewhere > 0, "no request routed to the cut worker was run by another host"


def test_client_host_cut_mid_publish(healthy: Deployment, scale: Scale) -> None:
    """4. The client host cut off while publishing: each call returned (and ran) or raised typed."""
    d = healthy
    retries, confirm_s = 2, 3.0
    driver = d.driver(
        "client_host_cut",
        INFER_PUBLISH_RETRIES=str(retries),
        INFER_PUBLISH_CONFIRM_TIMEOUT_S=str(confirm_s),
    )
    driver.call("start", rate=scale.rate, models=["mlp"])
    time.sleep(scale.seconds)
    cut_at = time.time()
    d.topology.cut("client")
    time.sleep(max(12.0, scale.seconds))
    d.topology.heal("client")
    time.sleep(scale.seconds)
    # Each try: a connect (4 s) to each of the 3 nodes or the confirm wait, then a pause
    # of at most 2 s: the retry window a raised call must fit in.
    window = (retries + 1) * (3 * 4.0 + confirm_s + 2.0)
    record = finish(driver, "client_host_cut", cut_at=cut_at, publish_retry_window_s=window)
    slowest = max((c["seconds"] for c in record["failed_calls"]), default=0.0)
    record["summary"] = (
        f"{len(record['failed_calls'])} calls raised PublishFailed, the slowest after {slowest} s "
        f"(window {window} s: {retries} retries, {confirm_s} s confirm timeout); "
        f"{record['unpublished_but_ran']} of them had reached the broker and ran; every call "
        f"that returned completed"
    )
    save("client_host_cut", record)
    check_ledger(record, window_s=window)


def test_worker_link_delay_and_loss(healthy: Deployment, scale: Scale) -> None:
    """5. One worker host's link delayed by 20 ms with 1% loss: everything completes (p50, p99).

    The kernel here has no netem: the loss is nftables', the delay the host's
    transparent proxy's (:mod:`tests.multihost.delay_proxy`), which all its
    connections go through from the start.
    """
    d = healthy
    driver, host = loaded(d, "worker_link_netem", scale, warm_s=scale.seconds * 2)
    try:
        netem_at = time.time()
        d.delay(host, 20)
        d.topology.lossy(host, 1)
        time.sleep(scale.seconds * 2)
        routed = driver.call("routed", since=netem_at + 2.0)["counts"]
        record = finish(driver, "worker_link_netem", host=host, netem_at=netem_at)
    finally:
        d.delay(host, 0)
        d.topology.heal(host)
    hostname = d.hostname(host)
    clean = [c[2] - c[1] for c in record["completions"] if c[1] < netem_at]
    slowed = [
        c[2] - c[1] for c in record["completions"] if c[1] >= netem_at + 2.0 and c[3] == hostname
    ]
    for phase, values in (("clean", clean), ("delayed", slowed)):
        record[phase] = {
            "n": len(values),
            "p50_ms": round(percentile(values, 0.5) * 1000, 1),
            "p99_ms": round(percentile(values, 0.99) * 1000, 1),
        }
    record["routed_to_it_while_delayed"] = routed.get(d.workers[host].own_queue, 0)
    c, s_ = record["clean"], record["delayed"]
    record["summary"] = (
        f"clean run p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms; requests served by the "
        f"delayed host p50 {s_['p50_ms']} ms, p99 {s_['p99_ms']} ms ({s_['n']}); all requests "
        f"p50 {record['p50_ms']} ms, p99 {record['p99_ms']} ms"
    )
    save("worker_link_netem", record)
    check_ledger(record)
    assert clean and slowed, record["delayed"]
    # A request crosses the delayed link at least twice (delivery, result): it must show.
    assert statistics.median(slowed) > statistics.median(clean) + 0.02, (
        record["clean"],
        record["delayed"],
    )


def test_redis_unreachable_from_worker_host(healthy: Deployment, scale: Scale) -> None:
    """6. Redis unreachable from one worker host for 10 s: its result writes retry; 0 lost."""
    d = healthy
    driver, host = loaded(d, "worker_redis_outage", scale)
    cut_at = time.time()
    d.topology.drop(host, ["redis"], "both")
    time.sleep(10.0)
    d.topology.heal(host)
    time.sleep(scale.seconds * 2)
    record = finish(driver, "worker_redis_outage", host=host, outage_s=10.0, cut_at=cut_at)
    record["summary"] = (
        f"its result writes waited and retried; longest pause between completions "
        f"{record['longest_gap_s']} s; p99 {record['p99_ms']} ms"
    )
    save("worker_redis_outage", record)
    check_ledger(record)


@pytest.mark.parametrize("unreachable", ["redis", "brokers"])
def test_asymmetric_partition(healthy: Deployment, scale: Scale, unreachable: str) -> None:
    """7. A worker host reaches the brokers but not Redis, or Redis but not the brokers."""
    d = healthy
    scenario = f"asymmetric_no_{unreachable}"
    driver, host = loaded(d, scenario, scale)
    victim = d.workers[host]
    peers = ["redis"] if unreachable == "redis" else ["broker1", "broker2", "broker3"]
    cut_at = time.time()
    d.topology.drop(host, peers, "both")
    in_registry: list[bool] = []
    for _ in range(int(20 / 0.5)):
        in_registry.append(victim.hostname in driver.call("registry")["workers"])
        time.sleep(0.5)
    healed_at = time.time()
    d.topology.heal(host)
    time.sleep(scale.seconds * 2)
    routed = driver.call("routed", since=cut_at + DROP_WITHIN_S, until=healed_at)["counts"]
    record = finish(
        driver,
        scenario,
        host=host,
        cut_s=round(healed_at - cut_at, 1),
        in_registry_last_10s=in_registry[-20:].count(True) / 20,
        routed_to_it_during=routed.get(victim.own_queue, 0),
    )
    share = round(100 * record["in_registry_last_10s"])
    record["summary"] = (
        f"in the registry {share}% of the fault's last 10 s; {record['routed_to_it_during']} "
        f"requests routed to it after {DROP_WITHIN_S} s; p99 {record['p99_ms']} ms"
    )
    save(scenario, record)
    check_ledger(record)

"""The test hosts themselves: own addresses, and each fault does what the scenarios rely on."""

from __future__ import annotations

import subprocess

import pytest

from tests.multihost.conftest import HOSTS, Deployment

pytestmark = [pytest.mark.multihost, pytest.mark.integration]


def test_each_host_has_its_own_address_and_namespace(healthy: Deployment) -> None:
    topology = healthy.topology
    assert sorted(topology.hosts) == sorted(HOSTS)
    assert len({h.ip for h in topology.hosts.values()}) == len(HOSTS)
    for host in topology.hosts.values():
        shown = subprocess.run(
            host.argv(["ip", "-4", "-o", "addr"]), capture_output=True, text=True
        )
        addresses = {line.split()[3].split("/")[0] for line in shown.stdout.splitlines()}
        assert addresses == {"127.0.0.1", host.ip}, (host.name, addresses)


def test_faults_cut_drop_one_way_and_heal(healthy: Deployment) -> None:
    t = healthy.topology
    assert t.reachable("client", "broker1", 5672) and t.reachable("client", "redis", 6379)
    t.cut("client")
    assert not t.reachable("client", "broker1", 5672)
    t.heal("client")
    assert t.reachable("client", "broker1", 5672)
    # One way: the client's packets to Redis are dropped, Redis's to the client are not.
    t.drop("client", ["redis"], "out")
    assert not t.reachable("client", "redis", 6379)
    assert t.reachable("client", "broker1", 5672)  # only that peer
    t.heal("client")
    # The other way, on the other side: Redis drops what comes from the client.
    t.drop("redis", ["client"], "in")
    assert not t.reachable("client", "redis", 6379)
    assert t.reachable("broker1", "redis", 6379)  # from elsewhere it still answers
    t.heal("redis")
    assert t.reachable("client", "redis", 6379)

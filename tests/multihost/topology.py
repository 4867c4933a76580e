"""Test hosts in network namespaces: one bridge, one namespace per host, faults on the links.

The topology lives in namespaces of its own, named ``<prefix>-<host>``; the
bridge sits in a switch namespace (``<prefix>-sw``), so nothing is added to
the machine's own network.  Each host gets one veth link to the bridge, an
address in ``10.231.<n>.0/24`` and its own loopback.  A process runs "on" a
host with ``ip netns exec <namespace>``; since the mount and PID namespaces
are the machine's, the test process can still signal it and read its files.

Faults act on a host's link:

- :meth:`Topology.cut` / :meth:`Topology.heal`: the bridge port goes down
  (no RST, no FIN: the peers only notice by their timeouts, like a pulled cable);
- :meth:`Topology.lossy`: nftables drops a random share of the packets on the
  host's interface; delay needs ``sch_netem``, which this machine's kernel
  lacks, so :mod:`tests.multihost.delay_proxy` delays the host's connections
  (:meth:`Topology.redirect` sends them through it);
- :meth:`Topology.drop`: nftables rules inside the host's namespace that drop
  traffic to or from given peers, one way or both (asymmetric partitions).

:meth:`Topology.destroy` kills every process left in the namespaces and
deletes them; it is safe to call twice and after a half-built topology.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "Topology", "netns_unavailable"]

SUBNET = "10.231.{net}.{host}"


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def netns_unavailable() -> str | None:
    """Why this machine cannot build the topology, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    probe = f"infer-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    name: str
    ip: str
    ns: str
    port: str  # its veth end on the bridge, in the switch namespace

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run on this host."""
        return ["ip", "netns", "exec", self.ns, *command]


@dataclass
class Topology:
    """Hosts on one bridge.  ``hosts`` maps a host name (``broker1``) to its :class:`Host`."""

    prefix: str
    names: Sequence[str]
    net: int = 0
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> Topology:
        _run(["ip", "netns", "add", self.switch])
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, name in enumerate(self.names, start=1):
            host = Host(
                name, SUBNET.format(net=self.net, host=10 + i), f"{self.prefix}-{name}", f"p{i}"
            )
            self.hosts[name] = host
            _run(["ip", "netns", "add", host.ns])
            # Created in the switch namespace, the host end moved into the host's.
            _run(
                [
                    "ip",
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    host.port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.ns,
                ]
            )
            _run(["ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up"])
            _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            _run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        return self

    def namespaces(self) -> list[str]:
        return [self.switch, *(h.ns for h in self.hosts.values())]

    def pids(self) -> dict[str, list[int]]:
        """The processes still running in each of this topology's namespaces."""
        found: dict[str, list[int]] = {}
        for ns in self.namespaces():
            out = _run(["ip", "netns", "pids", ns], check=False)
            pids = [int(p) for p in out.split()]
            if pids:
                found[ns] = pids
        return found

    def destroy(self) -> None:
        """Kill whatever runs in the namespaces, then delete them (the links go with them)."""
        for _ in range(50):
            left = self.pids()
            if not left:
                break
            for pids in left.values():
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for ns in self.namespaces():
            _run(["ip", "netns", "del", ns], check=False)

    def existing(self) -> list[str]:
        """This topology's namespaces that exist now (empty after :meth:`destroy`)."""
        listed = _run(["ip", "netns", "list"], check=False).split("\n")
        ours = set(self.namespaces())
        return [line.split()[0] for line in listed if line.strip() and line.split()[0] in ours]

    # ----- faults -------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Pull the host's cable: its bridge port goes down."""
        _run(["ip", "-n", self.switch, "link", "set", self.hosts[name].port, "down"])

    def heal(self, name: str) -> None:
        """Undo every fault on the host: cable in, no drop or loss rules."""
        host = self.hosts[name]
        _run(["ip", "-n", self.switch, "link", "set", host.port, "up"])
        # The delay proxy's redirect (table ip infer_delay) stays: it is part of the host.
        _run(
            ["ip", "netns", "exec", host.ns, "nft", "delete", "table", "inet", "infer_faults"],
            check=False,
        )

    def lossy(self, name: str, percent: int) -> None:
        """Drop a random ``percent`` of the packets entering and leaving the host's interface."""
        self._nft(
            name,
            [
                "add table inet infer_faults",
                "add chain inet infer_faults in { type filter hook input priority 0 ; }",
                "add chain inet infer_faults out { type filter hook output priority 0 ; }",
                f'add rule inet infer_faults in iifname "eth0" numgen random mod 100 < {percent} drop',
                f'add rule inet infer_faults out oifname "eth0" numgen random mod 100 < {percent} drop',
            ],
        )

    def redirect(
        self, name: str, peers: Sequence[str], ports: Sequence[int], to_port: int, mark: int
    ) -> None:
        """Send the host's new TCP connections to ``peers:ports`` to its local port ``to_port``.

        Sockets carrying firewall mark ``mark`` (the proxy's own) are not redirected.
        """
        ips = ", ".join(self.hosts[p].ip for p in peers)
        dports = ", ".join(str(p) for p in ports)
        self._nft(
            name,
            [
                "add table ip infer_delay",
                "add chain ip infer_delay out { type nat hook output priority -100 ; }",
                f"add rule ip infer_delay out meta mark != {mark} ip daddr {{ {ips} }} "
                f"tcp dport {{ {dports} }} redirect to :{to_port}",
            ],
        )

    def _nft(self, name: str, rules: list[str]) -> None:
        ns = self.hosts[name].ns
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input="\n".join(rules) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nft in {ns} failed: {done.stderr.strip()}")

    def drop(self, name: str, peers: Sequence[str], direction: str = "both") -> None:
        """Inside ``name``'s namespace, drop packets to (``out``), from (``in``) or both ways with ``peers``."""
        if direction not in ("in", "out", "both"):
            raise ValueError(f"direction must be in, out or both, not {direction!r}")
        rules = [
            "add table inet infer_faults",
            "add chain inet infer_faults in { type filter hook input priority 0 ; }",
            "add chain inet infer_faults out { type filter hook output priority 0 ; }",
        ]
        for peer in peers:
            ip = self.hosts[peer].ip
            if direction in ("in", "both"):
                rules.append(f"add rule inet infer_faults in ip saddr {ip} drop")
            if direction in ("out", "both"):
                rules.append(f"add rule inet infer_faults out ip daddr {ip} drop")
        self._nft(name, rules)

    def start_delay_proxy(self, name: str, port: int, delay_file: Path) -> subprocess.Popen[str]:
        """:mod:`tests.multihost.delay_proxy` on the host, listening on its loopback ``port``."""
        proc = subprocess.Popen(
            self.hosts[name].argv(
                [sys.executable, "-m", "tests.multihost.delay_proxy", str(port), str(delay_file)]
            ),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "listening":
            proc.kill()
            raise RuntimeError(f"the delay proxy on {name} did not start")
        proc.stdout.close()
        return proc

    def reachable(self, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
        """Can ``src`` open a TCP connection to ``dst:port``? (bash's /dev/tcp, on ``src``)."""
        ip = self.hosts[dst].ip
        done = subprocess.run(
            self.hosts[src].argv(["timeout", str(timeout), "bash", "-c", f"</dev/tcp/{ip}/{port}"]),
            capture_output=True,
        )
        return done.returncode == 0

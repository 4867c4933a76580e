"""Throwaway TLS servers for ``test_tls.py``: certificates, a Redis and a RabbitMQ node.

Everything lives under one temporary folder and every process is started by
the test and stopped at teardown: a private ``redis-server`` with only a TLS
port, and a second RabbitMQ node (the installed version, run as root through
its own ``sbin/rabbitmq-server`` script, not Debian's ``su`` wrapper) with its
own node name, ports, epmd, Mnesia, logs and config, and only a TLS listener.
The machine's RabbitMQ and Redis are never touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tasks.ops.launcher import free_port

__all__ = [
    "RABBITMQ_SBIN",
    "Certs",
    "Pair",
    "RabbitTLS",
    "RedisTLS",
    "make_certs",
    "redis_tls_support",
    "stray_processes",
]

# The marker every process started here (and every child, epmd included) inherits.
MARKER = "INFER_TLS_TEST_SERVER"

# ------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA every server and the good client certificate chain to
    other_ca: Path  # an unrelated CA: trusting it instead must fail verification
    server: Pair  # SAN DNS:localhost, IP:127.0.0.1 (Redis)
    localhost: Pair  # SAN DNS:localhost only (RabbitMQ: 127.0.0.1 must fail the hostname check)
    client: Pair  # a client certificate signed by ``ca``
    rogue_client: Pair  # a client certificate signed by ``other_ca``


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "celery-torch-inference tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_certs(folder: Path) -> Certs:
    """Two CAs, two server certificates and two client certificates (EC P-256) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)

    def pem(cert: x509.Certificate, name: str) -> Path:
        path = folder / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def leaf(
        name: str,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        usage: x509.ObjectIdentifier,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, issuer, usage=usage, dns=dns, ips=ips)
        _write_key(key, folder / f"{name}.key")
        return Pair(pem(cert, f"{name}.pem"), folder / f"{name}.key")

    cas = []
    for name in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"test {name}", key, None, ca=True)
        pem(cert, f"{name}.pem")
        cas.append((cert, key))
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    return Certs(
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server=leaf("server", cas[0], server, dns=("localhost",), ips=("127.0.0.1",)),
        localhost=leaf("localhost", cas[0], server, dns=("localhost",)),
        client=leaf("client", cas[0], client),
        rogue_client=leaf("rogue-client", cas[1], client),
    )


# ------------------------------------------------------------------------------- processes


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not listening on {port} after {timeout}s")


def _end(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after ``timeout``."""
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):  # any child that outlived its parent
        os.killpg(proc.pid, signal.SIGKILL)


def stray_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARKER=tag`` (children and daemons included)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARKER) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _kill_strays(tag: str) -> list[str]:
    """Kill what is left of ``tag``'s processes; say what had to be killed."""
    killed = []
    for proc in stray_processes(tag):
        with contextlib.suppress(psutil.Error):
            killed.append(f"{proc.pid} {proc.name()}")
            proc.kill()
    return killed


def redis_tls_support() -> str | None:
    """None when the installed redis-server knows the TLS directives, else why not.

    Redis reads its arguments in order and stops at the first it does not know:
    behind ``--tls-port`` a made-up directive fails a TLS build, and a build
    without TLS fails on ``tls-port`` itself.  Nothing is started either way.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed"
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--infer-tls-probe", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    text = (out.stdout + out.stderr).strip()
    if "infer-tls-probe" in text:
        return None
    return f"{binary} was built without TLS support (it refused --tls-port): {text[-300:]}"


class RedisTLS:
    """``redis-server`` with a TLS port only (``--port 0``), no persistence."""

    def __init__(self, certs: Certs, folder: Path) -> None:
        self.certs = certs
        self.folder = folder
        self.tag = f"redis-{uuid.uuid4().hex[:8]}"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "redis.log"

    def start(self) -> RedisTLS:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        binary = shutil.which("redis-server")
        assert binary is not None
        # fmt: off
        argv = [
            binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(self.certs.server.cert),
            "--tls-key-file", str(self.certs.server.key),
            "--tls-ca-cert-file", str(self.certs.ca),
            "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.folder), "--logfile", "",
        ]
        # fmt: on
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, MARKER: self.tag},
            )
        try:
            _wait_port(self.port, self.proc, 15, "redis-server")
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.log.read_text(errors='replace')[-2000:]}") from e
        return self

    def url(self, ca: Path, host: str = "127.0.0.1", db: int = 0) -> str:
        return (
            f"rediss://{host}:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca))}"
        )

    def stop(self) -> list[str]:
        """Stop it; the processes that had to be killed afterwards (none expected)."""
        _end(self.proc)
        return _kill_strays(self.tag)


RABBITMQ_SBIN = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))


class RabbitTLS:
    """A second RabbitMQ node, as root, with one TLS listener on 127.0.0.1 and no plain one.

    Peers must present a certificate signed by ``certs.ca`` (``verify_peer`` and
    ``fail_if_no_peer_cert``); the node's own certificate names ``localhost`` only.
    """

    def __init__(self, certs: Certs, folder: Path) -> None:
        self.certs = certs
        self.folder = folder
        self.tag = f"rabbit-{uuid.uuid4().hex[:8]}"
        self.node = f"tls-{self.tag.removeprefix('rabbit-')}@localhost"
        self.port = self.epmd_port = self.dist_port = self.ctl_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.sbin = Path(RABBITMQ_SBIN[-1])

    def _env(self) -> dict[str, str]:
        f = self.folder
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                MARKER: self.tag,
                "HOME": str(f / "home"),  # the Erlang cookie, shared by the node and rabbitmqctl
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                # Ours, not /etc/rabbitmq's (whose rabbitmq-env.conf names the machine's node).
                "RABBITMQ_CONF_ENV_FILE": str(f / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(f / "rabbitmq.conf"),
                "RABBITMQ_CONFIG_FILES": str(f / "conf.d"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(f / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(f / "mnesia"),
                "RABBITMQ_LOG_BASE": str(f / "log"),
                "RABBITMQ_PID_FILE": str(f / "rabbitmq.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def start(self, timeout: float = 60.0) -> RabbitTLS:
        f = self.folder
        for sub in ("home", "conf.d", "mnesia", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        self.port, self.epmd_port, self.dist_port, self.ctl_port = sorted(ports)
        (f / "rabbitmq-env.conf").write_text("")
        (f / "enabled_plugins").write_text("[].\n")
        c = self.certs
        (f / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp = none",
                    f"listeners.ssl.default = 127.0.0.1:{self.port}",
                    f"ssl_options.cacertfile = {c.ca}",
                    f"ssl_options.certfile = {c.localhost.cert}",
                    f"ssl_options.keyfile = {c.localhost.key}",
                    "ssl_options.verify = verify_peer",
                    "ssl_options.fail_if_no_peer_cert = true",
                    "log.console = false",
                    "log.file.level = info",
                    "",
                ]
            )
        )
        env = self._env()
        epmd = shutil.which("epmd") or "epmd"
        # Our own epmd in the foreground, so it is ours to stop (erl would daemonise one).
        self.epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with (f / "rabbitmq-server.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [str(self.sbin / "rabbitmq-server")],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_port(self.port, self.proc, timeout, f"RabbitMQ node {self.node}")
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.logs()}") from e
        return self

    def logs(self) -> str:
        parts = [self.folder / "rabbitmq-server.out", *sorted((self.folder / "log").glob("*.log"))]
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in parts if p.exists()
        )

    def log_count(self, text: str) -> int:
        """How many times the node's log says ``text`` so far."""
        log = self.folder / "log" / f"{self.node}.log"
        return log.read_text(errors="replace").count(text) if log.exists() else 0

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> list[str]:
        """``rabbitmqctl stop``, then the fallbacks; the processes that had to be killed."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        _end(self.proc)
        _end(self.epmd, timeout=5)
        return _kill_strays(self.tag)

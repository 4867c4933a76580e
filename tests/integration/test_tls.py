"""TLS for real: a Redis and a RabbitMQ node that speak only TLS, started by this module.

Certificates come from ``cryptography`` (a CA, server certificates, a client
certificate, and an unrelated CA for the negative cases).  The settings under
test are the deployment's own: ``CELERY_RESULT_BACKEND=rediss://...?ssl_cert_reqs=
required&ssl_ca_certs=...`` for Celery's result backend and the worker registry,
``CELERY_BROKER_URL=amqps://...`` with ``INFER_BROKER_TLS_CA/_CERT/_KEY`` for the
broker.  Good settings work end to end (a real ``celery worker`` over amqps);
a wrong CA, a missing or untrusted client certificate and a host name the
server certificate does not carry are each refused at connect, with nothing
published.
"""

from __future__ import annotations

import os
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
from celery.exceptions import BackendError
from kombu import Connection, Queue, pools
from kombu.exceptions import OperationalError
from kombu.utils.collections import eqhash

from models.errors import ConfigurationError, PublishFailed
from models.runner import reference_forward
from tasks.app import InferenceApp, broker_use_ssl
from tasks.client.publish import causes
from tasks.client.results import outputs
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess
from tasks.settings import Settings
from tasks.wire.backend import registry_store
from tasks.wire.codec import encode
from tests.integration.conftest import eventually
from tests.integration.test_registry_store import record
from tests.integration.tls_servers import (
    RABBITMQ_SBIN,
    Certs,
    Pair,
    RabbitTLS,
    RedisTLS,
    make_certs,
    redis_tls_support,
    stray_processes,
)
from tests.specs import spec_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-certs"))


@pytest.fixture(scope="module")
def redis_tls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisTLS]:
    why = redis_tls_support()
    if why:
        pytest.skip(why)
    server = RedisTLS(certs, tmp_path_factory.mktemp("redis-tls")).start()
    try:
        yield server
    finally:
        killed = server.stop()
    assert killed == [] and stray_processes(server.tag) == [], f"stray redis processes: {killed}"


@pytest.fixture(scope="module")
def rabbit_tls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitTLS]:
    if not RABBITMQ_SBIN:
        pytest.skip("RabbitMQ is not installed (no /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin)")
    node = RabbitTLS(certs, tmp_path_factory.mktemp("rabbit-tls")).start()
    try:
        yield node
    finally:
        killed = node.stop()
    assert killed == [] and stray_processes(node.tag) == [], f"stray RabbitMQ processes: {killed}"


# ------------------------------------------------------------------------------------- Redis


def redis_settings(url: str, home: Path) -> Settings:
    return Settings.from_env(
        {
            "CELERY_RESULT_BACKEND": url,
            "INFER_HOME": str(home),
            "INFER_REGISTRY_NAMESPACE": f"tls-{uuid.uuid4().hex[:6]}",
            # A refused connection fails the call at once instead of being retried.
            "INFER_BACKEND_RETRIES": "0",
            "INFER_BACKEND_RECONNECT_S": "0.1",
        }
    )


# Celery's Redis backend stores results with SETEX, which redis-py 8 marks deprecated.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_result_backend_and_registry_over_rediss(
    redis_tls: RedisTLS, certs: Certs, tmp_path: Path, host: str
) -> None:
    settings = redis_settings(redis_tls.url(certs.ca, host=host), tmp_path)
    app = InferenceApp(settings)
    try:
        backend = app.backend
        assert type(backend).__name__ == "ResilientRedisBackend"
        assert backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, {"answer": 42}, "SUCCESS")
        meta = backend.get_task_meta(task_id)
        assert meta["status"] == "SUCCESS" and meta["result"] == {"answer": 42}
        conn = backend.client.connection_pool.get_connection()
        try:  # the bytes went over TLS, not a plain socket
            assert isinstance(conn._sock, ssl.SSLSocket)
            assert conn._sock.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            backend.client.connection_pool.release(conn)

        # The worker registry, built exactly as tasks/client/routes.py builds it.
        store = registry_store(settings)
        try:
            store.publish(record("tls@h"), ttl_s=30)
            assert [w.name for w in store.load()] == ["tls@h"]
            store.remove("tls@h")
            assert store.load() == []
        finally:
            store.client.close()  # type: ignore[attr-defined]
    finally:
        app.close()
        app.backend.client.close()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("wrong-ca", "self-signed certificate in certificate chain"),
        ("name-not-in-certificate", "IP address mismatch"),
    ],
)
def test_rediss_verifies_the_server(
    redis_tls: RedisTLS, certs: Certs, tmp_path: Path, case: str, fragment: str
) -> None:
    server = redis_tls
    if case == "name-not-in-certificate":  # a server whose certificate names localhost only
        server = RedisTLS(replace(certs, server=certs.localhost), tmp_path / "redis").start()
    try:
        ca = certs.other_ca if case == "wrong-ca" else certs.ca
        settings = redis_settings(server.url(ca), tmp_path)  # rediss://127.0.0.1:...
        app = InferenceApp(settings)
        try:
            for call in (
                lambda: app.backend.store_result(str(uuid.uuid4()), 1, "SUCCESS"),
                lambda: app.backend.get_task_meta(str(uuid.uuid4())),
            ):
                with pytest.raises(BackendError) as refused:
                    call()
                chain = causes(refused.value)
                assert isinstance(chain[1], redis.exceptions.ConnectionError), chain
                assert isinstance(chain[2], ssl.SSLCertVerificationError), chain
                assert fragment in str(chain[2]), chain

            store = registry_store(settings)
            try:
                with pytest.raises(redis.exceptions.ConnectionError) as failed:
                    store.publish(record("tls@h"), ttl_s=30)
                assert isinstance(causes(failed.value)[1], ssl.SSLCertVerificationError)
                assert fragment in str(failed.value)
            finally:
                store.client.close()  # type: ignore[attr-defined]
        finally:
            app.close()
            app.backend.client.close()
    finally:
        if server is not redis_tls:
            assert server.stop() == [] and stray_processes(server.tag) == []


# ----------------------------------------------------------------------------------- RabbitMQ


def broker_env(
    node: RabbitTLS,
    certs: Certs,
    host: str = "localhost",
    ca: Path | None = None,
    client: Pair | None = None,
    send_certificate: bool = True,
) -> dict[str, str]:
    """The deployment's broker settings for ``node``: the good ones unless told otherwise."""
    client = client or certs.client
    env = {"CELERY_BROKER_URL": node.url(host), "INFER_BROKER_TLS_CA": str(ca or certs.ca)}
    if send_certificate:
        env["INFER_BROKER_TLS_CERT"] = str(client.cert)
        env["INFER_BROKER_TLS_KEY"] = str(client.key)
    return env


def client_app(
    env: dict[str, str], home: Path, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> InferenceApp:
    """A client app from ``env``'s settings, on the plain Redis of the suite."""
    full = {
        **env,
        "CELERY_RESULT_BACKEND": os.environ["CELERY_RESULT_BACKEND"],
        "INFER_HOME": str(home),
        "INFER_ROUTING": "false",
        **extra,
    }
    # Celery prefers the CELERY_BROKER_URL variable over any configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", full["CELERY_BROKER_URL"])
    return InferenceApp(Settings.from_env(full))


def close_client(app: InferenceApp) -> None:
    """Close ``app``'s pooled broker connections and drop its pools from kombu's registry.

    kombu keeps connection and producer pools process-wide, keyed by transport,
    host, port, user, password, vhost and transport options, but not by the TLS
    options: a later app with other TLS settings for the same broker would
    publish on this app's connections.
    """
    key = eqhash(app.connection_for_write())
    for group in (pools.producers, pools.connections):
        pool = dict.pop(group, key, None)
        if pool is not None:
            pool.force_close_all()
    app.close()


def test_worker_serves_over_amqps(
    rabbit_tls: RabbitTLS,
    certs: Certs,
    tmp_path: Path,
    weights_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rid = rabbit_tls.tag.removeprefix("rabbit-")
    env = broker_env(rabbit_tls, certs)
    worker_env = {
        **os.environ,
        **env,
        "INFER_REGISTRY_NAMESPACE": f"tls-{rid}",  # no other test's router sees this worker
    }
    queue = f"tls-{rid}"
    worker = WorkerProcess(
        f"tls-{rid}", "cpu", logdir=tmp_path, env=worker_env, queues=[queue], preload=("mlp",)
    )
    client = client_app(env, tmp_path, monkeypatch)
    try:
        worker.start().wait_ready()
        noop = client.send_task("tasks.diag.noop", queue=queue)
        assert noop.get(timeout=30)["worker"] == worker.hostname
        x = sample_inputs(spec_of("mlp"), 3, 1)
        got = client.send_task(
            "tasks.infer", args=("mlp", encode(x, binary=True)), queue=queue
        ).get(timeout=30)
        assert got["worker"] == worker.hostname and got["batch_size"] == 3
        assert np.allclose(outputs(got), reference_forward(spec_of("mlp"), x), atol=1e-5)
        with client.connection_for_write() as conn:
            conn.connect()
            assert (
                conn.transport.driver_type == "amqp" and conn.ssl["server_hostname"] == "localhost"
            )
            sock = conn.connection.transport.sock
            assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
            depth = conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        assert depth == 0
        # The node's view: every connection (the worker's and ours) is TLS with our client cert.
        listed = rabbit_tls.ctl("-s", "list_connections", "ssl", "peer_cert_subject")
        rows = [line.split("\t") for line in listed.stdout.splitlines() if line.strip()]
        assert rows and all(r[0] == "true" and "CN=client" in r[1] for r in rows), listed
    finally:
        close_client(client)
        worker.stop()
    assert worker.session_pids() == [], "stray worker processes"
    log = worker.log_tail(100_000)
    assert "SSLError" not in log and "CERTIFICATE" not in log, log


@pytest.mark.parametrize(
    ("case", "client_error", "server_alert"),
    [
        # The client refuses the server: deterministic, raised by the client's own check.
        ("wrong-ca", "self-signed certificate in certificate chain", None),
        ("host-not-in-certificate", "IP address mismatch", None),
        # The server refuses the client: the client sees the alert or, racing it, the close.
        ("no-client-certificate", None, "Certificate required"),
        ("untrusted-client-certificate", None, "Unknown CA"),
    ],
)
def test_amqps_refuses_at_connect(
    rabbit_tls: RabbitTLS,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    client_error: str | None,
    server_alert: str | None,
) -> None:
    bad = {
        "wrong-ca": broker_env(rabbit_tls, certs, ca=certs.other_ca),
        "host-not-in-certificate": broker_env(rabbit_tls, certs, host="127.0.0.1"),
        "no-client-certificate": broker_env(rabbit_tls, certs, send_certificate=False),
        "untrusted-client-certificate": broker_env(rabbit_tls, certs, client=certs.rogue_client),
    }[case]
    good = broker_env(rabbit_tls, certs)
    good_ssl = broker_use_ssl(Settings.from_env(good))
    probe = f"tls-probe-{uuid.uuid4().hex[:6]}"
    with Connection(good["CELERY_BROKER_URL"], ssl=good_ssl) as conn:
        Queue(probe, durable=False)(conn.default_channel).declare()
    alerts = rabbit_tls.log_count(f"SERVER ALERT: Fatal - {server_alert}") if server_alert else 0

    client = client_app(bad, tmp_path, monkeypatch, INFER_PUBLISH_RETRIES="0")
    try:
        with client.connection_for_write() as conn, pytest.raises(OperationalError) as connecting:
            conn.ensure_connection(max_retries=0)  # one attempt; kombu wraps the transport error
        refused = next(e for e in causes(connecting.value) if isinstance(e, OSError))
        if client_error:
            assert isinstance(refused, ssl.SSLCertVerificationError), repr(refused)
            assert client_error in str(refused) and client_error in str(connecting.value)
        else:
            assert isinstance(refused, ssl.SSLError | ConnectionError), repr(refused)
        start = time.monotonic()
        # The caller gets our typed error naming the settings to check, caused by the same one.
        # (A refusal by the server is an SSL alert, or a reset when the socket closes first.)
        expected = ConfigurationError if client_error else (ConfigurationError, PublishFailed)
        with pytest.raises(expected) as publish:
            client.send_task("tasks.diag.noop", queue=probe)
        assert time.monotonic() - start < 10
        chain = causes(publish.value)
        assert any(isinstance(e, ssl.SSLError | ConnectionError) for e in chain), chain
        if client_error:
            assert "INFER_BROKER_TLS_CA" in str(publish.value), publish.value
    finally:
        close_client(client)
    if server_alert:  # the node says why: once for the connect, once for the publish
        eventually(
            lambda: rabbit_tls.log_count(f"SERVER ALERT: Fatal - {server_alert}") >= alerts + 2,
            timeout=10,
            what=f"the node logging {server_alert!r}",
        )

    with Connection(good["CELERY_BROKER_URL"], ssl=good_ssl) as conn:
        channel = conn.default_channel
        assert channel.queue_declare(queue=probe, passive=True).message_count == 0
        channel.queue_delete(probe)

"""A broker URL list (a RabbitMQ cluster's nodes) and the typed error of a publish that fails."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from models.errors import ConfigurationError, PublishFailed
from tasks.app import InferenceApp, celery_config
from tasks.settings import Settings

NODES = "amqp://u:p@rmq1:5672/v;amqp://u:p@rmq2:5672/v;amqp://u:p@rmq3:5672/v"


def test_a_list_of_nodes_is_kombus_failover_string() -> None:
    from kombu import Connection

    s = Settings(broker_url=NODES)
    assert s.broker_urls == NODES.split(";")
    config = celery_config(s)
    assert config["broker_url"] == NODES  # Celery hands it to kombu, which fails over in order
    assert config["broker_transport_options"]["confirm_publish"] is True
    assert [u.split("@")[1] for u in Connection(config["broker_url"]).alt] == [
        "rmq1:5672/v",
        "rmq2:5672/v",
        "rmq3:5672/v",
    ]
    assert "p@" not in s.describe() and s.describe().count("amqp://") == 3


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://a//;redis://b:6379/0", "not all amqp://"),
        ("amqp://a//;rmq2:5672", "not all amqp://"),
        ("amqps://a:5671//;amqps://b:5671//", "load balancer"),
        ("amqp://a//;amqp://a//", "same broker twice"),
    ],
)
def test_a_bad_list_is_a_configuration_error(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        Settings(broker_url=url)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_a_publish_no_node_takes_is_publish_failed_naming_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two nodes, neither listening: after the retries (each one moves on to the next
    # node) the caller gets PublishFailed with the id, not kombu's OperationalError.
    monkeypatch.delenv("CELERY_BROKER_URL")  # Celery would take it over the app's own URL
    monkeypatch.delenv("CELERY_RESULT_BACKEND")
    urls = f"amqp://g:g@127.0.0.1:{_closed_port()}//;amqp://g:g@127.0.0.1:{_closed_port()}//"
    app = InferenceApp(
        Settings(
            broker_url=urls,
            home=tmp_path,  # the file result backend: nothing else to reach
            routing=False,
            publish_retries=1,
        )
    )
    started = time.monotonic()
    with pytest.raises(
        PublishFailed, match=r"not known to be on the broker .*after 1 publish retries"
    ) as raised:
        app.send_task("tasks.diag.noop", task_id="t-1")
    assert raised.value.task_ids == ("t-1",)
    assert "resend it with the same task_id" in str(raised.value)
    assert time.monotonic() - started < 30  # bounded: no endless wait for a broker


def test_a_nack_is_recognised_through_kombus_wrapping() -> None:
    # kombu raises OperationalError('') from py-amqp's MessageNacked: the app retries
    # those (a quorum queue nacks while it elects a leader), and says so when it gives up.
    from amqp.exceptions import MessageNacked
    from kombu.exceptions import OperationalError

    from tasks.client.publish import nacked, unconfirmed

    try:
        try:
            raise MessageNacked()
        except MessageNacked as e:
            raise OperationalError("") from e
    except OperationalError as wrapped:
        assert nacked(wrapped)
        error = unconfirmed("t-2", wrapped, retries=10, nacks=11)
    assert not nacked(OperationalError("connection refused"))
    assert error.task_ids == ("t-2",)
    assert "nacked it 11 times" in str(error)


def test_a_failed_tls_handshake_is_a_configuration_error_naming_the_settings() -> None:
    import ssl

    from kombu.exceptions import OperationalError

    from tasks.client.publish import tls_refused

    try:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed: IP address mismatch")
        except ssl.SSLError as e:
            raise OperationalError(str(e)) from e
    except OperationalError as wrapped:
        error = tls_refused("t-3", wrapped)
    assert isinstance(error, ConfigurationError)
    assert "IP address mismatch" in str(error) and "INFER_BROKER_TLS_CA" in str(error)
    assert tls_refused("t-4", OperationalError("connection refused")) is None

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ConfigurationError, UnknownModel
from tasks.app import celery_config
from tasks.settings import Settings


def test_defaults_are_embedded_and_safe(tmp_path: Path) -> None:
    s = Settings.from_env({"INFER_HOME": str(tmp_path)})
    assert s.embedded
    conf = celery_config(s)
    assert conf["broker_url"] == "filesystem://"
    assert conf["result_backend"] == f"file://{tmp_path / 'results'}"
    opts = conf["broker_transport_options"]
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path / "broker" / "queue")
    assert (tmp_path / "broker" / "queue").is_dir() and (tmp_path / "results").is_dir()
    assert "pickle" not in conf["accept_content"] and "pickle" not in conf["result_accept_content"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert s.weights_dir == tmp_path / "weights"
    assert "embedded broker" in s.describe()


def test_rabbitmq_and_redis_from_standard_variables(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "CELERY_BROKER_URL": "amqp://user:secret@127.0.0.1:5672//",
            "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/0",
            "INFER_HOME": str(tmp_path),
            "INFER_SERIALIZER": "json",
            "INFER_PRELOAD": "mlp, cnn",
            "INFER_TASK_TIME_LIMIT": "60",
            "INFER_TASK_SOFT_TIME_LIMIT": "50",
            "INFER_RESULT_EXPIRES": "120",
        }
    )
    conf = celery_config(s)
    assert not s.embedded
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_time_limit"] == 60 and conf["task_soft_time_limit"] == 50
    assert conf["result_expires"] == 120
    assert s.preload == ("mlp", "cnn")
    assert "secret" not in s.describe() and "user:***@" in s.describe()


def test_reliability_settings_reach_celery() -> None:
    conf = celery_config(
        Settings.from_env(
            {
                "CELERY_BROKER_URL": "amqp://h//",
                "INFER_PUBLISH_RETRIES": "3",
                "INFER_DEDUPLICATE": "no",
            }
        )
    )
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["task_default_delivery_mode"] == "persistent"
    assert conf["task_publish_retry_policy"]["max_retries"] == 3
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert conf["worker_deduplicate_successful_tasks"] is False
    assert conf["result_backend_always_retry"] is True
    assert conf["broker_heartbeat"] == 20


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"INFER_SERIALIZER": "pickle"}, "pickle is refused"),
        ({"INFER_TASK_TIME_LIMIT": "2000"}, "consumer_timeout"),
        ({"INFER_TASK_TIME_LIMIT": "100", "INFER_TASK_SOFT_TIME_LIMIT": "100"}, "must be below"),
        ({"INFER_MAX_PAYLOAD_BYTES": "lots"}, "not an integer"),
        ({"INFER_CACHE_BUDGET_MB": "0"}, "at least 1"),
        ({"INFER_WORKER_INIT_TIMEOUT": "-1"}, "positive"),
        ({"INFER_HEARTBEAT_S": "soon"}, "not a number"),
        ({"INFER_BATCHING": "maybe"}, "not a boolean"),
        ({"INFER_DTYPES": "fp8"}, "INFER_DTYPES"),
        ({"INFER_QUEUE_TYPE": "stream"}, "use quorum"),
        ({"INFER_DELIVERY_LIMIT": "0"}, "at least 1"),
    ],
)
def test_bad_settings_raise_configuration_error(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env(env)


def test_unknown_preload_model_names_the_choices() -> None:
    with pytest.raises(UnknownModel, match="cnn, mlp, transformer"):
        Settings.from_env({"INFER_PRELOAD": "mlp,resnet"})


def test_broker_tls_options(tmp_path: Path) -> None:
    import ssl

    from tasks.app import InferenceApp

    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for f in (ca, cert, key):
        f.write_text("-----BEGIN-----\n")
    s = Settings.from_env(
        {
            "CELERY_BROKER_URL": "amqps://infer:pw@rabbit:5671/inference",
            "INFER_BROKER_TLS_CA": str(ca),
            "INFER_BROKER_TLS_CERT": str(cert),
            "INFER_BROKER_TLS_KEY": str(key),
        }
    )
    want = {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "rabbit",  # py-amqp checks the certificate's names only with this
        "ca_certs": str(ca),
        "certfile": str(cert),
        "keyfile": str(key),
    }
    assert celery_config(s)["broker_use_ssl"] == want
    assert InferenceApp(s).connection_for_write().ssl == want  # built, never connected
    plain = Settings.from_env({"CELERY_BROKER_URL": "amqp://h//"})
    assert celery_config(plain)["broker_use_ssl"] is False


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CELERY_BROKER_URL": "amqp://h//", "INFER_BROKER_TLS_CA": "CA"}, "not amqps"),
        ({"CELERY_BROKER_URL": "amqps://h//", "INFER_BROKER_TLS_CERT": "CERT"}, "go together"),
        (
            {"CELERY_BROKER_URL": "amqps://h//", "INFER_BROKER_TLS_CA": "/no/such.pem"},
            "no such file",
        ),
        ({"CELERY_RESULT_BACKEND": "rediss://:pw@redis:6380/0"}, "ssl_cert_reqs"),
    ],
)
def test_bad_tls_settings(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    for key in ("INFER_BROKER_TLS_CA", "INFER_BROKER_TLS_CERT"):
        if env.get(key) in ("CA", "CERT"):
            (tmp_path / env[key]).write_text("x")
            env = {**env, key: str(tmp_path / env[key])}
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env(env)


def test_backend_reconnect_window_covers_the_setting() -> None:
    from tasks.wire.backend import reconnect_retry

    for seconds in (0.5, 3.0, 10.0, 30.0):
        retry = reconnect_retry(seconds)
        waits = [retry._backoff.compute(n) for n in range(1, retry.get_retries() + 1)]
        assert seconds <= sum(waits) < seconds + 0.6  # at most one cap over
    assert Settings.from_env({"INFER_BACKEND_RECONNECT_S": "3"}).backend_reconnect_s == 3.0
    with pytest.raises(ConfigurationError, match="INFER_BACKEND_RECONNECT_S"):
        Settings.from_env({"INFER_BACKEND_RECONNECT_S": "0"})

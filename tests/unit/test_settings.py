from __future__ import annotations

from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from models.errors import ConfigurationError, UnknownModel
from tasks.app import celery_config
from tasks.settings import Settings, declared


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
    assert "secret" not in s.describe() and "user:**@" in s.describe()  # kombu's mask


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
        ({"INFER_CLAIM_CHECK_BYTES": "-1"}, "at least 0"),
        ({"INFER_CLAIM_CHECK_TTL_S": "0"}, "at least 1"),
        ({"INFER_BLOB_URL": "http://u:secret@blobs/"}, "not a Redis URL"),
    ],
)
def test_bad_settings_raise_configuration_error(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env(env)


def test_unknown_preload_model_names_the_choices() -> None:
    from tasks.wire.catalog import check_preload

    settings = Settings.from_env({"INFER_PRELOAD": "mlp,resnet"})  # checked at worker start
    with pytest.raises(UnknownModel, match=r"cnn, .*mlp, resnet50, transformer"):
        check_preload(settings)


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


# ------------------------------------------------------------------ declared once


def test_backend_password_is_masked_too() -> None:
    s = Settings.from_env(
        {"CELERY_BROKER_URL": "amqp://h//", "CELERY_RESULT_BACKEND": "redis://:pw@redis:6379/0"}
    )
    assert "pw" not in s.describe() and "redis://:**@redis:6379/0" in s.describe()


_NUMBERS = [(spec.env, kind, spec.at_least) for _, spec, kind in declared() if kind in (int, float)]


@pytest.mark.parametrize(("env", "kind", "at_least"), _NUMBERS, ids=[e for e, _, _ in _NUMBERS])
def test_every_bound_is_checked_and_names_the_variable(env: str, kind: type, at_least: int) -> None:
    if kind is int:
        below, message = str(at_least - 1), f"{env}={at_least - 1} must be at least {at_least}"
    else:
        below, message = "0", f"{env}=0.0 must be positive"
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({env: below})
    assert str(raised.value) == message
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({env: "x"})
    what = "an integer" if kind is int else "a number"
    assert str(raised.value) == f"{env}='x' is not {what}"


def test_the_batch_deadline_share_is_at_most_the_whole_budget() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"INFER_BATCH_DEADLINE_SHARE": "1.5"})
    assert "INFER_BATCH_DEADLINE_SHARE=1.5 must be at most 1" in str(raised.value)
    assert Settings.from_env({"INFER_BATCH_DEADLINE_SHARE": "1"}).batch_deadline_share == 1.0


def test_bounds_hold_for_keyword_construction_and_replace() -> None:
    with pytest.raises(ConfigurationError, match="INFER_MAX_BATCH_SIZE=0 must be at least 1"):
        Settings(max_batch_size=0)
    s = Settings(memory_mb=0, metrics_port=0, broker_heartbeat=0, publish_retries=0)
    with pytest.raises(ConfigurationError, match="INFER_HEARTBEAT_S=0 must be positive"):
        replace(s, heartbeat_s=0)
    assert replace(s, registry_namespace="blue").registry_namespace == "blue"


@pytest.mark.parametrize(
    ("word", "value"),
    [(w, True) for w in ("1", "true", "yes", "on", "TRUE", "On")]
    + [(w, False) for w in ("0", "false", "no", "off", "False", "NO")],
)
def test_boolean_words(word: str, value: bool) -> None:
    assert Settings.from_env({"INFER_BATCHING": word}).batching is value
    assert Settings.from_env({"INFER_DEDUPLICATE": word}).deduplicate is value


@pytest.mark.parametrize("word", ["maybe", "y", "t", "enabled", "2"])
def test_unknown_boolean_word_says_what_to_write(word: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"INFER_ROUTING": word})
    assert str(raised.value) == (
        f"INFER_ROUTING={word!r} is not a boolean: write true or false (or 1/0, yes/no, on/off)"
    )


def test_empty_values_mean_the_default(tmp_path: Path) -> None:
    empty = {spec.env: "" for _, spec, _ in declared()}
    assert Settings.from_env({**empty, "INFER_HOME": str(tmp_path)}) == Settings(home=tmp_path)


def test_every_setting_is_read_from_its_variable(tmp_path: Path) -> None:
    """A non-default value for each variable lands in its field, parsed to the declared type."""
    for name in ("ca.pem", "cert.pem", "key.pem", "signing"):
        (tmp_path / name).write_text("x")
    env = {
        "CELERY_BROKER_URL": "amqps://u:p@rabbit:5671/v",
        "CELERY_RESULT_BACKEND": "redis://r:6379/1",
        "INFER_HOME": str(tmp_path / "home"),
        "INFER_WEIGHTS_DIR": "relative/weights",
        "INFER_SERIALIZER": "json",
        "INFER_DEVICE": "cpu",
        "INFER_PRELOAD": " mlp ,, cnn ",
        "INFER_DTYPES": "fp32,bf16",
        "INFER_REGISTRY_NAMESPACE": "blue",
        "INFER_METRICS_ADDR": "0.0.0.0",
        "INFER_EXPORTER_ADDR": "0.0.0.0",
        "INFER_QUEUE_TYPE": "classic",
        "INFER_MODEL_REPOSITORY": "/srv/models,/srv/more-models",
        "INFER_BLOB_URL": "redis://blobs:6379/2",
        "INFER_BROKER_TLS_CA": str(tmp_path / "ca.pem"),
        "INFER_BROKER_TLS_CERT": str(tmp_path / "cert.pem"),
        "INFER_BROKER_TLS_KEY": str(tmp_path / "key.pem"),
    }
    expected: dict[str, object] = {
        "broker_url": env["CELERY_BROKER_URL"],
        "result_backend": env["CELERY_RESULT_BACKEND"],
        "home": tmp_path / "home",
        "weights_dir": Path("relative/weights").resolve(),
        "serializer": "json",
        "device": "cpu",
        "preload": ("mlp", "cnn"),
        "model_repository": ("/srv/models", "/srv/more-models"),
        "dtypes": ("fp32", "bf16"),
        "registry_namespace": "blue",
        "metrics_addr": "0.0.0.0",
        "exporter_addr": "0.0.0.0",
        "queue_type": "classic",
        "blob_url": "redis://blobs:6379/2",
        "broker_tls_ca": tmp_path / "ca.pem",
        "broker_tls_cert": tmp_path / "cert.pem",
        "broker_tls_key": tmp_path / "key.pem",
        "signing_dir": None,  # checked in test_signing.py: it needs a real key store
    }
    for f, spec, kind in declared():  # every number and boolean: a value that is not its default
        if kind is bool:
            expected[f.name] = not f.default
            env[spec.env] = "no" if f.default else "yes"
        elif f.name == "batch_deadline_share":  # a share: at most 1
            other = expected[f.name] = getattr(Settings, f.name) * 2
            env[spec.env] = str(other)
        elif kind in (int, float):
            other = expected[f.name] = getattr(Settings, f.name) * 2 + 1
            env[spec.env] = str(other)
    assert {f.name for f, _, _ in declared()} == set(expected)
    s = Settings.from_env(env)
    for f, spec, _ in declared():
        value = getattr(s, f.name)
        assert value == expected[f.name] and type(value) is type(expected[f.name]), spec.env


def test_settings_are_frozen_with_class_attribute_defaults() -> None:
    s = Settings()
    with pytest.raises(FrozenInstanceError):
        s.max_batch_size = 64  # type: ignore[misc]
    assert Settings.backend_reconnect_s == 5.0 and Settings.max_payload_bytes == 8 * 1024 * 1024
    assert s.home == Path("var").resolve() and s.weights_dir == s.home / "weights"


def test_direct_construction_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFER_MAX_BATCH_SIZE", "7")
    assert Settings().max_batch_size == 32
    assert Settings.from_env().max_batch_size == 7

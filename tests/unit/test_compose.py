"""compose.yaml cannot run here (no Docker engine), so check it statically."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.settings import Settings
from tasks.worker import worker_argv

ROOT = Path(__file__).resolve().parents[2]
WORKERS = {
    "worker-gpu0": ("gpu0", "cuda:0", "0"),
    "worker-gpu1": ("gpu1", "cuda:0", "1"),
    "worker-cpu": ("cpu0", "cpu", None),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_present(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"rabbitmq", "redis", "flower", *WORKERS}


def test_images_pinned(compose: dict[str, Any]) -> None:
    for name in ("rabbitmq", "redis"):
        image = compose["services"][name]["image"]
        assert re.fullmatch(r"[a-z]+:\d+\.\d+\.\d+(-[a-z]+)?", image), image
    assert "management" in compose["services"]["rabbitmq"]["image"]


def test_every_service_has_a_healthcheck_and_waits_for_healthy(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
    for name in (*WORKERS, "flower"):
        assert set(compose["services"][name]["depends_on"]) == {"rabbitmq", "redis"}


def test_worker_commands_match_the_local_launcher(compose: dict[str, Any]) -> None:
    for service, (name, device, gpu) in WORKERS.items():
        svc = compose["services"][service]
        assert svc["command"] == worker_argv(name, device), service
        assert svc["environment"]["INFER_DEVICE"] == device
        assert f"-d {name}@$$HOSTNAME" in svc["healthcheck"]["test"][1]
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if gpu is None:
            assert devices is None
        else:
            assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]


def test_environment_is_what_settings_read_and_never_guest(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]["environment"]
    assert rabbit["RABBITMQ_DEFAULT_VHOST"] == "inference"
    assert "guest" not in rabbit["RABBITMQ_DEFAULT_USER"]
    for service in (*WORKERS, "flower"):
        env = compose["services"][service]["environment"]
        assert env["CELERY_BROKER_URL"].startswith("amqp://") and env["CELERY_BROKER_URL"].endswith(
            "@rabbitmq:5672/inference"
        )
        assert "guest" not in env["CELERY_BROKER_URL"]
        assert env["CELERY_RESULT_BACKEND"].startswith("redis://:${REDIS_PASSWORD")
        # Resolved with placeholder secrets, the environment is valid for Settings.
        resolved = {k: re.sub(r"\$\{[^}]+\}", "x", str(v)) for k, v in env.items()}
        settings = Settings.from_env(resolved)
        assert not settings.embedded
        assert settings.task_time_limit < settings.rabbitmq_consumer_timeout
    conf = compose["configs"]["rabbitmq_conf"]["content"]
    timeout_ms = int(re.search(r"consumer_timeout = (\d+)", conf).group(1))  # type: ignore[union-attr]
    assert timeout_ms == 1000 * int(
        compose["services"]["worker-cpu"]["environment"]["INFER_RABBITMQ_CONSUMER_TIMEOUT"]
    )


def test_secrets_come_from_env_file_with_an_example(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yaml").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)[:?}-]", text))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert referenced <= set(example), referenced - set(example)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    redis_cmd = compose["services"]["redis"]["command"]
    assert "--requirepass" in redis_cmd and "noeviction" in redis_cmd
    assert "FLOWER_BASIC_AUTH" in compose["services"]["flower"]["environment"]


def test_dockerfile_builds_weights_with_the_pinned_constraints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and "python -m models build" in dockerfile
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()

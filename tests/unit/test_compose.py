"""compose.yaml cannot run here (no Docker engine), so check it statically."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.settings import Settings
from tasks.worker.command import worker_argv

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
    assert set(compose["services"]) == {"rabbitmq", "redis", "flower", "prometheus", *WORKERS}


def test_images_pinned(compose: dict[str, Any]) -> None:
    for name in ("rabbitmq", "redis", "prometheus"):
        image = compose["services"][name]["image"]
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+(-[a-z]+)?", image), image
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
    # `$${...}` is a shell variable in a config's script, escaped from compose.
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)[:?}-]", text))
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


# RabbitMQ users: an admin for operators, a least-privilege app user for the workers and
# Flower, no guest.  tests/integration/test_rabbitmq_user.py runs the provisioning for real.
RABBIT_SECRETS = (
    "RABBITMQ_ADMIN_USER",
    "RABBITMQ_ADMIN_PASSWORD",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
)


def _script(compose: dict[str, Any], name: str) -> str:
    """A config's shell script as the container sees it (compose's `$$` escape undone)."""
    content: str = compose["configs"][name]["content"]
    return content.replace("$$", "$")


def _var(value: str) -> str:
    """The one required compose variable ``value`` consists of: ``${VAR:?message}``."""
    match = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", value)
    assert match, value
    return match.group(1)


def test_config_scripts_escape_every_dollar_from_compose(compose: dict[str, Any]) -> None:
    for name in ("rabbitmq_provision", "rabbitmq_entrypoint"):
        content = compose["configs"][name]["content"]
        assert "$" not in content.replace("$$", ""), f"{name}: compose would interpolate a `$`"
        assert content.startswith("#!/bin/sh\n")


def test_rabbitmq_secrets_are_required_and_have_no_default(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yaml").read_text()
    for var in RABBIT_SECRETS:
        uses = re.findall(rf"(?<!\$)\$\{{{var}([^A-Z_][^}}]*)\}}", text)
        assert uses and all(use.startswith(":?") for use in uses), (var, uses)
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["RABBITMQ_ADMIN_PASSWORD"] == example["RABBITMQ_PASSWORD"] == ""
    assert example["RABBITMQ_ADMIN_USER"] != example["RABBITMQ_USER"]
    assert "guest" not in (ROOT / ".env.example").read_text()


def test_app_user_is_not_the_admin_user_and_workers_use_it(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]["environment"]
    assert _var(rabbit["RABBITMQ_DEFAULT_USER"]) == "RABBITMQ_ADMIN_USER"
    assert _var(rabbit["RABBITMQ_DEFAULT_PASS"]) == "RABBITMQ_ADMIN_PASSWORD"
    assert _var(rabbit["APP_RABBITMQ_USER"]) == "RABBITMQ_USER"
    assert _var(rabbit["APP_RABBITMQ_PASSWORD"]) == "RABBITMQ_PASSWORD"
    assert "APP_RABBITMQ_VHOST" not in rabbit  # the script's default: inference
    for service in (*WORKERS, "flower"):
        url = compose["services"][service]["environment"]["CELERY_BROKER_URL"]
        match = re.fullmatch(r"amqp://(\$\{[^}]+\}):(\$\{[^}]+\})@rabbitmq:5672/(\w+)", url)
        assert match, url
        assert _var(match.group(1)) == "RABBITMQ_USER"
        assert _var(match.group(2)) == "RABBITMQ_PASSWORD"
        assert match.group(3) == rabbit["RABBITMQ_DEFAULT_VHOST"] == "inference"
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            assert "guest" not in f"{key}={value}".lower(), (name, key)


def test_provisioning_sets_no_tags_and_permissions_on_vhost_inference_only(
    compose: dict[str, Any],
) -> None:
    script = _script(compose, "rabbitmq_provision")
    assert 'vhost="${APP_RABBITMQ_VHOST:-inference}"' in script
    calls = [line.strip() for line in script.splitlines() if "rabbitmqctl" in line]
    # The app user is created with no tags; set_user_tags sets exactly those given.
    assert 'ensure_user "$app" "$app_password"' in script.splitlines()
    assert 'ensure_user "$admin" "$admin_password" administrator' in script.splitlines()
    assert 'rabbitmqctl -q set_user_tags "$name" "$@"' in calls
    # Permissions only on the vhost, limited for the app user; everything elsewhere cleared.
    grants = [c for c in calls if "set_permissions" in c]
    assert grants == [
        """rabbitmqctl -q set_permissions -p "$vhost" "$admin" '.*' '.*' '.*'""",
        'rabbitmqctl -q set_permissions -p "$vhost" "$app" "$configure" "$write" "$read_re"',
    ]
    assert 'rabbitmqctl -q clear_permissions -p "$other" "$app"' in calls
    assert "rabbitmqctl -q delete_user guest" in calls
    # Passwords travel on stdin, never as an argument.
    assert not [c for c in calls if "password" in c and not c.startswith("printf")]


def test_app_permission_regexes_cover_exactly_the_deployments_names(
    compose: dict[str, Any],
) -> None:
    script = _script(compose, "rabbitmq_provision").splitlines()
    first = next(i for i, line in enumerate(script) if line.startswith("ours="))
    last = next(i for i, line in enumerate(script) if line.startswith("write="))
    out = subprocess.run(
        [
            "sh",
            "-c",
            "\n".join(
                [*script[first : last + 1], 'printf "%s\\n" "$configure" "$write" "$read_re"']
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    configure, write, read = out.stdout.splitlines()
    assert configure == read and configure.startswith("^(") and configure.endswith(")$")
    assert write == "^(amq\\.default|" + configure[2:]
    commands = [compose["services"][svc]["command"] for svc in WORKERS]
    queues = {q for cmd in commands for q in cmd[cmd.index("-Q") + 1].split(",")}
    ours = [
        *queues,
        "cpu", "gpu", "cpu.dead", "gpu.dead", "gpu.direct.gpu1",
        "celeryev", "celeryev.0f6b3c1e-2a4d-4c8e-9b7a-5d1e2f3a4b5c",
        "celery.pidbox", "reply.celery.pidbox", "gpu0@3f2a1b4c5d6e.celery.pidbox",
        "cpu0@worker.example.org.celery.pidbox",
        "1b4e28ba-2fa1-11d2-883f-0016d3cca427.reply.celery.pidbox",
        "celery_delayed_0", "celery_delayed_27", "celery_delayed_delivery",
    ]  # fmt: skip
    for name in ours:
        assert re.fullmatch(configure, name) and re.fullmatch(write, name), name
    not_ours = ["evil", "celery", "cpu2", "xcpu", "cpu.dead.x", "cpu.direct", "amq.fanout",
                "amq.topic", "celery_delayed_x", "pidbox", "celeryevil", ""]  # fmt: skip
    for name in not_ours:
        assert not re.fullmatch(configure, name) and not re.fullmatch(write, name), name
    assert re.fullmatch(write, "amq.default") and not re.fullmatch(configure, "amq.default")


def test_rabbitmq_runs_the_provisioning_and_is_healthy_only_after_it(
    compose: dict[str, Any],
) -> None:
    rabbit = compose["services"]["rabbitmq"]
    mounts = {c["source"]: c["target"] for c in rabbit["configs"]}
    entrypoint = _script(compose, "rabbitmq_entrypoint")
    assert rabbit["entrypoint"] == ["sh", mounts["rabbitmq_entrypoint"]]
    assert f"sh {mounts['rabbitmq_provision']}" in entrypoint
    assert "docker-entrypoint.sh rabbitmq-server &" in entrypoint
    assert "trap " in entrypoint and "TERM INT" in entrypoint
    marker = re.search(r"^ready=(\S+)$", entrypoint, re.M).group(1)  # type: ignore[union-attr]
    assert 'rm -f "$ready"' in entrypoint and 'touch "$ready"' in entrypoint
    health = rabbit["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL" and health[1].startswith(f"test -f {marker} && ")
    assert rabbit["init"] is True


FAKE_SERVER = """#!/bin/sh
# Stands in for the image's docker-entrypoint.sh: runs until TERM, then exits with $SERVER_RC.
trap 'echo term >> "$FAKE_LOG"; exit "$SERVER_RC"' TERM
echo "start $*" >> "$FAKE_LOG"
if [ -n "${SERVER_DIES:-}" ]; then sleep 0.3; exit "$SERVER_DIES"; fi
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize(
    ("case", "expected_rc"),
    [("healthy", 7), ("provisioning fails", 1), ("server dies at start", 5)],
)
def test_entrypoint_provisions_then_forwards_stop_and_exit_status(
    compose: dict[str, Any], tmp_path: Path, case: str, expected_rc: int
) -> None:
    """The wrapper itself, run here with a fake server, rabbitmqctl and provisioning script."""
    rabbit = compose["services"]["rabbitmq"]
    mounts = {c["source"]: c["target"] for c in rabbit["configs"]}
    entrypoint = _script(compose, "rabbitmq_entrypoint")
    marker = re.search(r"^ready=(\S+)$", entrypoint, re.M).group(1)  # type: ignore[union-attr]
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (home / ".erlang.cookie").write_text("cookie")
    scripts = {
        bin_dir / "docker-entrypoint.sh": FAKE_SERVER,
        # await_startup succeeds only once the (fake) server runs, as the real one does.
        bin_dir / "rabbitmqctl": '#!/bin/sh\n[ -z "${SERVER_DIES:-}" ] && [ -s "$FAKE_LOG" ]\n',
        tmp_path / "provision.sh": f"exit {1 if case == 'provisioning fails' else 0}\n",
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    wrapper = tmp_path / "entrypoint.sh"
    wrapper.write_text(
        entrypoint.replace(mounts["rabbitmq_provision"], str(tmp_path / "provision.sh")).replace(
            marker, str(tmp_path / "ready")
        )
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "FAKE_LOG": str(tmp_path / "server.log"),
        "SERVER_RC": "7",
        **({"SERVER_DIES": "5"} if case == "server dies at start" else {}),
    }
    proc = subprocess.Popen(["sh", str(wrapper)], env=env, start_new_session=True)
    try:
        if case == "healthy":
            deadline = time.monotonic() + 10
            while not (tmp_path / "ready").exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # docker stop, through init
        assert proc.wait(timeout=15) == expected_rc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "server.log").read_text().split("\n")
    assert log[0] == "start rabbitmq-server"
    assert ("term" in log) == (case != "server dies at start")
    assert (tmp_path / "ready").exists() == (case == "healthy")


def test_dockerfile_builds_weights_with_the_pinned_constraints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile and "python -m models build" in dockerfile
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def test_flower_runs_the_launcher_that_refuses_no_password(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"][:3] == ["python", "-m", "tasks.ops.flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    example = (ROOT / ".env.example").read_text()
    assert "\nFLOWER_BASIC_AUTH=\n" in example  # no default password to deploy by mistake


def test_prometheus_is_optional_and_scrapes_flower_and_every_worker(
    compose: dict[str, Any],
) -> None:
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["metrics"]  # `docker compose up` alone does not start it
    assert prom["ports"] == ["127.0.0.1:9090:9090"]
    config = yaml.safe_load(compose["configs"]["prometheus_config"]["content"])
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    port = compose["services"]["flower"]["command"][-1]
    assert jobs["flower"] == [f"flower:{port}"]
    for service in WORKERS:
        env = Settings.from_env(
            {
                k: re.sub(r"\$\{[^}]+\}", "x", str(v))
                for k, v in compose["services"][service]["environment"].items()
            }
        )
        assert env.metrics_addr == "0.0.0.0"  # reachable from Prometheus inside the network
        assert f"{service}:{env.metrics_port}" in jobs["inference-workers"]
        assert "9808" not in str(compose["services"][service].get("ports", []))  # not on the host
    assert len(jobs["inference-workers"]) == len(WORKERS)

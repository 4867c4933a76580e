"""compose.yaml cannot run here (no Docker engine), so check it statically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tasks.settings import Settings, declared
from tasks.worker.command import worker_argv

ROOT = Path(__file__).resolve().parents[2]
WORKERS = {
    "worker-gpu0": ("gpu0", "cuda:0", "0"),
    "worker-gpu1": ("gpu1", "cuda:0", "1"),
    "worker-cpu": ("cpu0", "cpu", None),
}

# Profile clustered: three RabbitMQ nodes, and the single-node services each clustered one mirrors.
CLUSTER_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
CLUSTERED = {
    "worker-gpu0-clustered": "worker-gpu0",
    "worker-gpu1-clustered": "worker-gpu1",
    "worker-cpu-clustered": "worker-cpu",
    "flower-clustered": "flower",
}
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq" / "cluster.conf"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_present(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "rabbitmq", "redis", "flower", "prometheus", "grafana", *WORKERS, *CLUSTER_NODES,
        *CLUSTERED, "queue-exporter"
    }  # fmt: skip


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


# Profile metrics: Grafana, provisioned from deploy/grafana/ (tests/unit/test_dashboard.py checks
# the dashboard itself; tests/integration/test_prometheus.py runs every query of it).
GRAFANA_DIR = ROOT / "deploy" / "grafana"


def _binds(svc: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """A service's bind mounts as {container path: (host path, mode)}."""
    out = {}
    for volume in svc.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("./"):
            out[target] = (ROOT / source, mode[0] if mode else "rw")
    return out


def test_grafana_is_optional_pinned_local_and_waits_for_prometheus(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["metrics"]  # `docker compose up` alone does not start it
    match = re.fullmatch(r"grafana/grafana:(\d+)\.\d+\.\d+", grafana["image"])
    assert match and match.group(1) == "11", grafana["image"]  # the dashboard's schemaVersion
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # never on every interface
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "3000/api/health" in " ".join(grafana["healthcheck"]["test"])
    volumes = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert volumes["grafana-data"] == "/var/lib/grafana" and "grafana-data" in compose["volumes"]


def test_grafana_admin_password_comes_from_env_and_viewers_are_anonymous(
    compose: dict[str, Any],
) -> None:
    env = compose["services"]["grafana"]["environment"]
    assert (
        _var(env["GF_SECURITY_ADMIN_PASSWORD"]) == "GRAFANA_ADMIN_PASSWORD"
    )  # required, no default
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["GRAFANA_ADMIN_PASSWORD"] == ""  # no default password to deploy by mistake
    # Anonymous visitors may look, never edit; nobody signs up.
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # No calls home from inside the deployment.
    assert env["GF_ANALYTICS_REPORTING_ENABLED"] == env["GF_ANALYTICS_CHECK_FOR_UPDATES"] == "false"


def test_grafana_mounts_the_repositorys_provisioning_read_only(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    binds = _binds(grafana)
    for target, (source, mode) in binds.items():
        assert source.is_dir(), (target, source)
        assert source.resolve().is_relative_to(GRAFANA_DIR), source
        assert mode == "ro", target
    provisioning = "/etc/grafana/provisioning"
    assert binds[f"{provisioning}/datasources"][0] == GRAFANA_DIR / "provisioning" / "datasources"
    assert binds[f"{provisioning}/dashboards"][0] == GRAFANA_DIR / "provisioning" / "dashboards"
    # The dashboard provider reads the folder where the dashboards are mounted.
    (provider_file,) = (GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False  # the JSON in the repository is the dashboard
    host_dir, _ = binds[provider["options"]["path"]]
    assert host_dir == GRAFANA_DIR / "dashboards"
    assert (host_dir / "inference.json").is_file()
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == provider["options"]["path"]
    assert (host_dir / home.name).is_file()


def test_grafana_datasource_is_the_compose_prometheus_with_the_dashboards_uid(
    compose: dict[str, Any],
) -> None:
    (ds_file,) = (GRAFANA_DIR / "provisioning" / "datasources").glob("*.yaml")
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["isDefault"] is True
    container_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert ds["url"] == f"http://prometheus:{container_port}"  # the service, inside the network
    # $__rate_interval is sized from the scrape interval: they must agree.
    config = yaml.safe_load(compose["configs"]["prometheus_config"]["content"])
    assert ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    # Every datasource the dashboard names is this one, by uid.
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "inference.json").read_text())
    named = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            source = node.get("datasource")
            if isinstance(source, dict) and source.get("type") != "grafana":
                named.add((source.get("type"), source.get("uid")))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard)
    assert named == {("prometheus", ds["uid"])}


def test_queue_exporter_runs_with_the_fleet_and_prometheus_scrapes_it(
    compose: dict[str, Any],
) -> None:
    """tasks.ops.exporter in the default stack: the app's image and settings, every class queue."""
    services = compose["services"]
    exporter = services["queue-exporter"]
    assert "profiles" not in exporter  # `docker compose up` starts it with the workers
    assert exporter["image"] == services["worker-cpu"]["image"]
    assert exporter["depends_on"] == services["worker-cpu"]["depends_on"]
    command = exporter["command"]
    assert command[:3] == ["python", "-m", "tasks.ops.exporter"]
    named = {command[i + 1] for i, arg in enumerate(command) if arg == "--queue"}
    classes = {  # each worker's class queue: reported even while no worker of the class runs
        q
        for svc in WORKERS
        for q in services[svc]["command"][services[svc]["command"].index("-Q") + 1].split(",")
        if ".direct." not in q
    }
    assert named == classes == {"cpu", "gpu"}
    env = exporter["environment"]
    declared_env = {spec.env for _, spec, _ in declared()}
    assert set(env) <= declared_env, set(env) - declared_env
    worker_env = services["worker-cpu"]["environment"]
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "INFER_SERIALIZER"):
        assert env[key] == worker_env[key], key  # the same broker, registry and namespace
    settings = Settings.from_env(_resolved(env))
    assert not settings.embedded
    assert (
        settings.registry_namespace == Settings.from_env(_resolved(worker_env)).registry_namespace
    )
    assert settings.exporter_addr == "0.0.0.0"  # reachable from Prometheus inside the network
    assert "ports" not in exporter  # and not from the host
    assert exporter["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "tasks.ops.exporter",
        "--check",
    ]
    config = yaml.safe_load(compose["configs"]["prometheus_config"]["content"])
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert jobs["queue-exporter"] == [f"queue-exporter:{settings.exporter_port}"]


# Profile clustered: three RabbitMQ nodes (deploy/rabbitmq/), and the workers and Flower on them.


def _resolved(env: dict[str, Any]) -> dict[str, str]:
    """A service's environment with placeholder secrets, as Settings would read it."""
    return {k: re.sub(r"\$\{[^}]+\}", "x", str(v)) for k, v in env.items()}


def _cluster_conf() -> list[tuple[str, str]]:
    """deploy/rabbitmq/cluster.conf as (key, value) pairs, in order (sysctl format)."""
    pairs = []
    for line in CLUSTER_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            pairs.append((key.strip(), value.strip()))
    return pairs


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    return {c["source"]: c["target"] for c in svc.get("configs", [])}


def _profile(compose: dict[str, Any], profile: str) -> set[str]:
    return {n for n, s in compose["services"].items() if profile in s.get("profiles", [])}


def test_default_stack_is_unchanged_by_the_clustered_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default = {name for name, svc in services.items() if "profiles" not in svc}
    assert default == {"rabbitmq", "redis", "flower", "queue-exporter", *WORKERS}
    assert _profile(compose, "clustered") == {*CLUSTER_NODES, *CLUSTERED}
    for name in _profile(compose, "clustered"):
        assert services[name]["profiles"] == ["clustered"], name
    for name in default:  # nothing `docker compose up` starts needs or mounts the profile's parts
        assert set(services[name].get("depends_on", {})) <= default, name
        assert "secrets" not in services[name], name
        assert not {"rabbitmq_cluster_conf", "rabbitmq_cookie_entrypoint"} & set(
            _mounts(services[name])
        ), name


def test_cluster_has_three_nodes_with_their_own_hostname_and_volume(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    single = services["rabbitmq"]
    hostnames, volumes, host_ports = set(), set(), set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["image"] == single["image"], name  # the same RabbitMQ as the single node
        assert node["hostname"] == name  # the Docker DNS name of the service, and stable
        assert node["environment"]["RABBITMQ_NODENAME"] == f"rabbit@{name}"
        assert node["init"] is True
        (volume,) = node["volumes"]
        source, target = volume.split(":")
        assert target == "/var/lib/rabbitmq" and source in compose["volumes"], name
        hostnames.add(node["hostname"])
        volumes.add(source)
        for port in node["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)  # never on every interface
            host_ports.add(port.split(":")[1])
    assert len(hostnames) == len(volumes) == 3
    assert "rabbitmq-data" not in volumes  # the single node's data stays its own
    assert {p.split(":")[1] for p in services["rabbitmq-1"]["ports"]} == {"5672", "15672"}
    assert len(host_ports) == 4  # 5672 to 5674 for AMQP, 15672 for the management UI


def test_cluster_config_lists_exactly_the_three_nodes_and_pauses_a_minority(
    compose: dict[str, Any],
) -> None:
    conf = _cluster_conf()
    keys = [key for key, _ in conf]
    assert len(keys) == len(set(keys)), "a key is set twice"
    settings = dict(conf)
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf if k.startswith("cluster_formation.classic_config.nodes.")}
    node_names = {compose["services"][n]["environment"]["RABBITMQ_NODENAME"] for n in CLUSTER_NODES}
    assert listed == node_names == {f"rabbit@{n}" for n in CLUSTER_NODES}
    assert len([k for k in keys if k.startswith("cluster_formation.classic_config.nodes.")]) == 3
    assert settings["cluster_partition_handling"] == "pause_minority"
    # Mounted on every node, beside the single node's consumer_timeout, in conf.d's order.
    assert compose["configs"]["rabbitmq_cluster_conf"] == {"file": "./deploy/rabbitmq/cluster.conf"}
    single = _mounts(compose["services"]["rabbitmq"])
    for name in CLUSTER_NODES:
        mounts = _mounts(compose["services"][name])
        assert mounts["rabbitmq_conf"] == single["rabbitmq_conf"], name
        target = mounts["rabbitmq_cluster_conf"]
        assert target.startswith("/etc/rabbitmq/conf.d/") and target.endswith(".conf"), name
        assert Path(target).name > Path(mounts["rabbitmq_conf"]).name, name
    for name, config in compose["configs"].items():
        if "file" in config:
            assert (ROOT / config["file"]).is_file(), name


def test_nodes_share_an_erlang_cookie_from_a_secret_file_not_the_environment(
    compose: dict[str, Any],
) -> None:
    secret = compose["secrets"]["rabbitmq_erlang_cookie"]
    assert secret == {"file": "./deploy/rabbitmq/erlang.cookie"}
    # A secret: never committed (git ignores it), never in the environment.
    assert "erlang.cookie" in (ROOT / "deploy" / "rabbitmq" / ".gitignore").read_text().split()
    subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", "deploy/rabbitmq/erlang.cookie"], check=True
    )
    assert "ERLANG_COOKIE" not in (ROOT / "compose.yaml").read_text()
    assert "setcookie" not in (ROOT / "compose.yaml").read_text()
    services = compose["services"]
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["secrets"] == ["rabbitmq_erlang_cookie"], name
        mounts = _mounts(node)
        # sh cookie-entrypoint.sh SECRET COMMAND...: the secret where compose mounts it.
        assert node["entrypoint"][:3] == [
            "sh",
            mounts["rabbitmq_cookie_entrypoint"],
            "/run/secrets/rabbitmq_erlang_cookie",
        ], name
    single = services["rabbitmq"]
    # rabbitmq-1 provisions the (cluster-wide) users as the single node does; the others
    # start the server as the image would.
    assert services["rabbitmq-1"]["entrypoint"][3:] == single["entrypoint"]
    assert {
        k: v for k, v in _mounts(services["rabbitmq-1"]).items() if k in _mounts(single)
    } == _mounts(single)
    for name in CLUSTER_NODES[1:]:
        assert services[name]["entrypoint"][3:] == ["docker-entrypoint.sh", "rabbitmq-server"]
        assert "rabbitmq_provision" not in _mounts(services[name])
    assert compose["configs"]["rabbitmq_cookie_entrypoint"] == {
        "file": "./deploy/rabbitmq/cookie-entrypoint.sh"
    }


def _run_cookie_entrypoint(tmp_path: Path, cookie: str | None) -> tuple[int, str, Path]:
    home = tmp_path / "home"
    home.mkdir()
    secret = tmp_path / "secret"
    if cookie is not None:
        secret.write_text(cookie)
    out = subprocess.run(
        [
            "sh",
            str(ROOT / "deploy" / "rabbitmq" / "cookie-entrypoint.sh"),
            str(secret),
            "sh",
            "-c",
            'echo "$@" > "$HOME/ran"',
            "sh",
            "rabbitmq-server",
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.returncode, out.stderr, home


def test_cookie_entrypoint_installs_the_cookie_owner_only_then_runs_the_command(
    tmp_path: Path,
) -> None:
    cookie = "0f" * 32
    rc, err, home = _run_cookie_entrypoint(tmp_path, cookie + "\n")
    assert rc == 0, err
    installed = home / ".erlang.cookie"
    assert installed.read_text() == cookie
    assert installed.stat().st_mode & 0o777 == 0o400  # Erlang refuses a cookie others can read
    assert (home / "ran").read_text() == "rabbitmq-server\n"  # the command, with its arguments
    assert not list(home.glob("*.new"))


@pytest.mark.parametrize(
    ("case", "cookie", "says"),
    [
        ("missing", None, "openssl rand -hex 32 > deploy/rabbitmq/erlang.cookie"),
        ("short", "tooshort\n", "at least 20"),
        ("two words", "abcdefghij klmnopqrstuvwxyz", "one word"),
    ],
)
def test_cookie_entrypoint_refuses_a_missing_or_weak_cookie(
    tmp_path: Path, case: str, cookie: str | None, says: str
) -> None:
    rc, err, home = _run_cookie_entrypoint(tmp_path, cookie)
    assert rc == 1, case
    assert says in err, err
    assert not (home / "ran").exists() and not (home / ".erlang.cookie").exists()


FAKE_DIAGNOSTICS = """#!/bin/sh
# Stands in for rabbitmq-diagnostics: the port check exits $PORT_RC, cluster_status prints $STATUS.
case "$*" in
  *check_port_connectivity*) exit "$PORT_RC" ;;
  *"cluster_status --formatter json"*) printf '%s\\n' "$STATUS" ;;
  *) echo "unexpected: $*" >&2; exit 64 ;;
esac
"""


def _status(*members: str, down: tuple[str, ...] = ()) -> str:
    """What `rabbitmq-diagnostics cluster_status --formatter json` says, in part."""
    nodes = [f"rabbit@{m}" for m in members]
    running = [node for node in nodes if node.split("@")[1] not in down]
    return json.dumps(
        {
            "cluster_name": "inference",
            "disk_nodes": nodes,
            "running_nodes": running,
            "listeners": {node: [] for node in running},
            "partitions": {},
        }
    )


@pytest.mark.parametrize(
    ("case", "port_rc", "status", "healthy"),
    [
        ("one cluster of three", 0, _status(*CLUSTER_NODES), True),
        ("a peer down is still a member", 0, _status(*CLUSTER_NODES, down=("rabbitmq-3",)), True),
        ("formed a cluster of its own", 0, _status("rabbitmq-2"), False),
        ("one peer missing", 0, _status("rabbitmq-1", "rabbitmq-2"), False),
        ("AMQP port closed", 1, _status(*CLUSTER_NODES), False),
    ],
)
def test_cluster_healthcheck_needs_the_port_and_every_listed_node_as_a_member(
    compose: dict[str, Any], tmp_path: Path, case: str, port_rc: int, status: str, healthy: bool
) -> None:
    script = (ROOT / "deploy" / "rabbitmq" / "cluster-health.sh").read_text()
    # With no argument it reads cluster.conf where compose mounts it.
    default_conf = re.search(r'^conf="\$\{1:-(\S+)\}"$', script, re.M).group(1)  # type: ignore[union-attr]
    for name in CLUSTER_NODES:
        assert _mounts(compose["services"][name])["rabbitmq_cluster_conf"] == default_conf
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "rabbitmq-diagnostics"
    fake.write_text(FAKE_DIAGNOSTICS)
    fake.chmod(0o755)
    out = subprocess.run(
        ["sh", str(ROOT / "deploy" / "rabbitmq" / "cluster-health.sh"), str(CLUSTER_CONF)],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "PORT_RC": str(port_rc), "STATUS": status},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (out.returncode == 0) == healthy, (case, out.stderr)


def test_every_node_has_a_healthcheck_and_rabbitmq_1_waits_for_provisioning(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    single = services["rabbitmq"]["healthcheck"]["test"]
    marker = single[1].split(" && ")[0]  # test -f /tmp/inference-provisioned
    for name in CLUSTER_NODES:
        mounts = _mounts(services[name])
        health = services[name]["healthcheck"]
        script = f"sh {mounts['rabbitmq_cluster_health']}"
        if name == "rabbitmq-1":
            assert health["test"] == ["CMD-SHELL", f"{marker} && {script}"]
        else:
            assert health["test"] == ["CMD", *script.split()]
        assert int(health["timeout"].rstrip("s")) >= 20  # two CLI calls, each an Erlang VM
    for path in ("cookie-entrypoint.sh", "cluster-health.sh"):
        text = (ROOT / "deploy" / "rabbitmq" / path).read_text()
        assert text.startswith("#!/bin/sh\n"), path
        assert "$$" not in text, path  # mounted from a file: compose interpolates nothing there
        subprocess.run(["sh", "-n", str(ROOT / "deploy" / "rabbitmq" / path)], check=True)


def test_clustered_services_use_a_url_list_naming_every_node(compose: dict[str, Any]) -> None:
    from kombu import Connection
    from kombu.utils.url import parse_url

    services = compose["services"]
    talkers = _profile(compose, "clustered") - set(CLUSTER_NODES)
    assert talkers == set(CLUSTERED)
    vhost = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_VHOST"]
    for name in talkers:
        raw = services[name]["environment"]["CELERY_BROKER_URL"]
        resolved = _resolved(services[name]["environment"])["CELERY_BROKER_URL"]
        assert not re.search(r"\s", resolved), name  # YAML's line continuations left no blank
        # The credentials: the app user's required variables, in every URL.
        for url in raw.split(";"):
            match = re.fullmatch(r"amqp://(\$\{[^}]+\}):(\$\{[^}]+\})@([\w-]+):5672/(\w+)", url)
            assert match, url
            assert _var(match.group(1)) == "RABBITMQ_USER"
            assert _var(match.group(2)) == "RABBITMQ_PASSWORD"
        conn = Connection(resolved)
        assert len(conn.alt) == 3, name  # kombu's failover list: one URL per node
        parsed = [parse_url(url) for url in conn.alt]
        assert [p["hostname"] for p in parsed] == [services[n]["hostname"] for n in CLUSTER_NODES]
        for p in parsed:
            assert p["transport"] == "amqp" and p["port"] == 5672, name
            assert p["virtual_host"] == vhost == "inference", name
            assert p["userid"] == p["password"] == "x" and "guest" not in raw, name
        assert conn.hostname == "rabbitmq-1" and conn.virtual_host == vhost
        # and each node's name in cluster.conf is rabbit@ that host
        assert {f"rabbit@{p['hostname']}" for p in parsed} == {
            v for k, v in _cluster_conf() if k.startswith("cluster_formation.classic_config.")
        }


def test_clustered_services_wait_for_every_node_and_redis(compose: dict[str, Any]) -> None:
    healthy = {"condition": "service_healthy"}
    for name in CLUSTERED:
        assert compose["services"][name]["depends_on"] == {
            **{node: healthy for node in CLUSTER_NODES},
            "redis": healthy,
        }, name


def test_clustered_services_are_their_single_node_counterparts_on_the_cluster(
    compose: dict[str, Any],
) -> None:
    """Same command, device, healthcheck and settings (quorum queues and all); only the broker."""
    services = compose["services"]
    differ = {"profiles", "depends_on", "environment"}
    for name, single_name in CLUSTERED.items():
        svc, single = services[name], services[single_name]
        assert set(svc) - differ == set(single) - differ, name
        for key in set(svc) - differ:
            assert svc[key] == single[key], (name, key)
        env, single_env = svc["environment"], single["environment"]
        assert set(env) == set(single_env), name
        assert {k: v for k, v in env.items() if k != "CELERY_BROKER_URL"} == {
            k: v for k, v in single_env.items() if k != "CELERY_BROKER_URL"
        }, name
        settings = Settings.from_env(_resolved(env))
        single_settings = Settings.from_env(_resolved(single_env))
        assert not settings.embedded and settings.broker_url != single_settings.broker_url
        assert dataclasses.replace(settings, broker_url=single_settings.broker_url) == (
            single_settings
        ), name
        assert settings.queue_type == "quorum" and settings.delivery_limit >= 1, name
        assert settings.task_time_limit < settings.rabbitmq_consumer_timeout, name


def test_every_variable_an_app_service_sets_is_a_setting(compose: dict[str, Any]) -> None:
    """Workers and Flower, single-node and clustered: each variable is read by Settings."""
    declared_env = {spec.env for _, spec, _ in declared()}
    for name in (*WORKERS, "flower", *CLUSTERED):
        env = set(compose["services"][name]["environment"])
        extra = {"FLOWER_BASIC_AUTH"} if name.startswith("flower") else set()  # tasks.ops.flower
        assert env - extra <= declared_env, (name, env - extra - declared_env)
    # The nodes set only what RabbitMQ, the image or the provisioning script reads.
    rabbit_env = set(compose["services"]["rabbitmq"]["environment"])
    for name in CLUSTER_NODES:
        assert set(compose["services"][name]["environment"]) == rabbit_env | {"RABBITMQ_NODENAME"}

"""deploy/kubernetes/ cannot be applied here (no cluster), so check it statically.

Every manifest is parsed and held to what the deployment really is: the image
and commands compose runs, the settings tasks/settings.py declares, the metric
names the queue exporter serves (tasks.ops.exporter.SERVED_METRICS) and the
queues the workers consume.  Also tasks/ops/health.py, the workers' readiness
probe, with fake records and a fake clock.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from routing.capabilities import WorkerCapabilities
from routing.queues import direct_queue, fallback_of
from routing.registry import FileStore
from tasks.ops import health
from tasks.ops.exporter import SERVED_METRICS
from tasks.settings import Settings, declared
from tasks.worker.command import worker_argv

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
WORKLOADS = ("Deployment", "StatefulSet")
# Each worker: (kind, device, class queue, compose's worker service it mirrors).
WORKERS = {
    "worker-gpu": ("Deployment", "cuda:0", "gpu", "worker-gpu0"),
    "worker-cpu": ("StatefulSet", "cpu", "cpu", "worker-cpu"),
}
DEFAULTS = Settings()
SETTING_NAMES = {spec.env for _, spec, _ in declared()}


def manifests() -> dict[str, list[dict[str, Any]]]:
    """file name -> its YAML documents, every .yaml file of deploy/kubernetes/."""
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        for p in sorted(K8S.glob("*.yaml"))
    }


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict[str, Any]]]:
    return manifests()


@pytest.fixture(scope="module")
def objects(files: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, every object but the kustomization."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name, docs in files.items():
        if name == "kustomization.yaml":
            continue
        for doc in docs:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def config(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    """The deployment's settings ConfigMap (every app container's envFrom)."""
    data: dict[str, str] = objects["ConfigMap", "inference-config"]["data"]
    return data


def of_kind(objects: dict[tuple[str, str], dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for (kind, _), o in objects.items() if kind in kinds]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port (a number or a named container port) as a number."""
    if isinstance(port, int):
        return port
    (number,) = (p["containerPort"] for p in container["ports"] if p["name"] == port)
    return int(number)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``8Gi``) as a number."""
    units = {
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in ("", *units), value
    return float(match.group(1)) * units.get(match.group(2), 1)


# --- the kustomization and the objects ---------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_files(
    files: dict[str, list[dict[str, Any]]],
) -> None:
    (kustomization,) = files["kustomization.yaml"]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a file listed twice"
    assert all((K8S / r).is_file() for r in resources), [
        r for r in resources if not (K8S / r).is_file()
    ]
    assert set(resources) == set(files) - {"kustomization.yaml"}
    assert resources[0] == "namespace.yaml"  # the namespace before what lives in it
    assert resources[-1] == "autoscaling.yaml"  # the ScaledObjects after their targets


def test_every_object_has_a_known_kind_and_api_version_in_the_namespace(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (namespace,) = of_kind(objects, "Namespace")
    ns = namespace["metadata"]["name"]
    assert ns == "inference"
    for (kind, name), obj in objects.items():
        assert kind in API_VERSIONS, kind
        assert obj["apiVersion"] == API_VERSIONS[kind], (kind, name)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == ns, (kind, name)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_kustomize_builds_every_object(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d}
    assert built == set(objects)


def test_workloads_select_their_own_pods_and_name_existing_services(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for workload in of_kind(objects, *WORKLOADS):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":
            service = objects["Service", workload["spec"]["serviceName"]]
            assert service["spec"]["clusterIP"] == "None"  # a governing Service is headless
    for service in of_kind(objects, "Service"):
        targets = [
            w
            for w in of_kind(objects, *WORKLOADS)
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            named = {p["name"] for w in targets for c in containers(w) for p in c.get("ports", [])}
            assert port["targetPort"] in named, (service["metadata"]["name"], port)


# --- images, resources, pods -------------------------------------------------------------------


def test_every_container_runs_composes_image_or_a_pinned_upstream_one(
    objects: dict[tuple[str, str], dict[str, Any]], compose: dict[str, Any]
) -> None:
    app_image = compose["x-app"]["image"]
    assert re.fullmatch(r"celery-torch-inference:\d+\.\d+\.\d+", app_image)
    upstream = {compose["services"][s]["image"] for s in ("rabbitmq", "redis")}
    seen = set()
    for workload in of_kind(objects, *WORKLOADS):
        for c in containers(workload):
            image = c["image"]
            assert image == app_image or image in upstream, (workload["metadata"]["name"], image)
            assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+(-[a-z]+)?", image), image
            assert c.get("imagePullPolicy") == "IfNotPresent"
            seen.add(image)
    assert seen == {app_image, *upstream}


def test_every_container_requests_and_limits_cpu_and_memory(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for workload in of_kind(objects, *WORKLOADS):
        for c in containers(workload):
            res = c["resources"]
            for key in ("cpu", "memory"):
                request, limit = res["requests"][key], res["limits"][key]
                assert 0 < quantity(request) <= quantity(limit), (c["name"], key, request, limit)


def test_every_pod_leaves_service_links_and_the_api_token_out(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    # A Service named flower would set FLOWER_PORT=tcp://... in every pod, which Flower reads
    # as its own --port option.
    for workload in of_kind(objects, *WORKLOADS):
        spec = workload["spec"]["template"]["spec"]
        assert spec["enableServiceLinks"] is False, workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, workload["metadata"]["name"]


def test_scraped_pods_name_a_port_they_serve(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scraped = []
    for workload in of_kind(objects, *WORKLOADS):
        notes = workload["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            ports = {p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
            assert int(notes["prometheus.io/port"]) in ports
            assert notes["prometheus.io/path"] == "/metrics"
            scraped.append(workload["metadata"]["name"])
    assert set(scraped) == {*WORKERS, "flower", "queue-exporter"}


# --- settings and secrets ----------------------------------------------------------------------


def app_containers(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for each container that runs the project's image."""
    for workload in of_kind(objects, *WORKLOADS):
        for c in containers(workload):
            if c["image"].startswith("celery-torch-inference:"):
                yield workload, c


def resolved_env(container: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    """The container's environment with placeholder secrets, $(VAR) expanded as Kubernetes does."""
    env = {}
    if any(ref.get("configMapRef") for ref in container.get("envFrom", [])):
        env.update(config)
    for name, var in env_of(container).items():
        if "value" in var:
            env[name] = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], var["value"])
        else:
            env[name] = "x"  # a secret or the pod's name
    return env


def test_every_infer_and_celery_variable_is_a_declared_setting(
    objects: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]
) -> None:
    names = set(config)
    for workload in of_kind(objects, *WORKLOADS):
        for c in containers(workload):
            names |= set(env_of(c))
    ours = {n for n in names if n.startswith(("INFER_", "CELERY_"))}
    assert ours - SETTING_NAMES == set()
    assert set(config) <= SETTING_NAMES  # the ConfigMap holds settings only


def test_every_app_container_reads_valid_settings_on_rabbitmq_and_redis(
    objects: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]
) -> None:
    for workload, c in app_containers(objects):
        settings = Settings.from_env(resolved_env(c, config))
        assert not settings.embedded
        assert settings.broker == "amqp://x:x@rabbitmq:5672/inference", workload["metadata"]["name"]
        assert settings.backend == "redis://:x@redis:6379/0"
        assert settings.task_time_limit < settings.rabbitmq_consumer_timeout
        for name in ("RABBITMQ_USER", "RABBITMQ_PASSWORD", "REDIS_PASSWORD"):
            ref = env_of(c)[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "inference-secrets"


def test_config_is_composes_environment_plus_the_pod_addresses(
    config: dict[str, str], compose: dict[str, Any]
) -> None:
    app_env = {k: str(v) for k, v in compose["x-app-env"].items()}
    shared = {k: v for k, v in app_env.items() if not k.startswith("CELERY_")}  # URLs: secrets
    assert shared.items() <= config.items()
    assert config["INFER_METRICS_ADDR"] == config["INFER_EXPORTER_ADDR"] == "0.0.0.0"
    assert int(config["INFER_EXPORTER_PORT"]) == DEFAULTS.exporter_port


def test_the_secret_is_an_example_holding_every_key_the_manifests_read(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = objects["Secret", "inference-secrets"]
    text = (K8S / "secret.example.yaml").read_text()
    assert text.startswith("# EXAMPLE, NOT FOR USE AS IS")
    values = secret["stringData"]
    assert all(
        "change-me" in v
        for k, v in values.items()
        if k not in ("rabbitmq-admin-user", "rabbitmq-user")
    ), values
    referenced = set()
    for workload in of_kind(objects, *WORKLOADS):
        spec = workload["spec"]["template"]["spec"]
        for c in containers(workload):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in objects
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                referenced |= {
                    (volume["secret"]["secretName"], i["key"]) for i in volume["secret"]["items"]
                }
            if "configMap" in volume:
                cm = objects["ConfigMap", volume["configMap"]["name"]]
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(cm["data"])
    for auth in of_kind(objects, "TriggerAuthentication"):
        referenced |= {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert referenced == {("inference-secrets", k) for k in values}


# --- the workers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_runs_composes_command_named_after_its_pod(
    objects: dict[tuple[str, str], dict[str, Any]], compose: dict[str, Any], name: str
) -> None:
    kind, device, klass, service = WORKERS[name]
    workload = objects[kind, name]
    (c,) = containers(workload)
    # celery itself is the command (exec form, PID 1): SIGTERM reaches it, no shell between.
    assert c["command"] == worker_argv("$(POD_NAME)", device)
    assert (
        c["command"][c["command"].index("-Q") + 1]
        == f"{direct_queue(klass, '$(POD_NAME)')},{klass}"
    )
    composed = compose["services"][service]["command"]
    named = composed[composed.index("-n") + 1].split("@")[0]  # gpu0, cpu0
    assert c["command"] == [a.replace(named, "$(POD_NAME)") for a in composed]
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert list(env).index("POD_NAME") == 0  # defined before anything expands it
    assert env["INFER_DEVICE"]["value"] == device
    assert (
        env["INFER_PRELOAD"]["value"]
        == compose["services"][service]["environment"]["INFER_PRELOAD"]
    )


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_probes_mean_something(
    objects: dict[tuple[str, str], dict[str, Any]], config: dict[str, str], name: str
) -> None:
    kind, _, _, _ = WORKERS[name]
    (c,) = containers(objects[kind, name])
    metrics_port = int(config["INFER_METRICS_PORT"])
    assert metrics_port == DEFAULTS.metrics_port
    # Liveness: the pool child that owns the device serves /metrics.
    live = c["livenessProbe"]
    assert live["httpGet"]["path"] == "/metrics"
    assert port_number(c, live["httpGet"]["port"]) == metrics_port
    # ... and a replaced child that preloads again is not restarted meanwhile.
    assert live["periodSeconds"] * live["failureThreshold"] > DEFAULTS.worker_init_timeout
    # Startup: generous for model loading, on the same endpoint.
    start = c["startupProbe"]
    assert start["httpGet"] == live["httpGet"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    # Readiness: tasks.ops.health for this worker's own node name.
    ready = c["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["sh", "-c"]
    argv = shlex.split(ready[2])
    assert argv == ["exec", "python", "-m", "tasks.ops.health", "ready", "--node", "$POD_NAME@%h"]
    node = c["command"][c["command"].index("-n") + 1]
    assert argv[-1] == node.replace("$(POD_NAME)", "$POD_NAME")
    assert c["readinessProbe"]["timeoutSeconds"] >= 5  # a Python start and one Redis read


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_grace_period_lets_a_batch_finish(
    objects: dict[tuple[str, str], dict[str, Any]], config: dict[str, str], name: str
) -> None:
    kind, _, _, _ = WORKERS[name]
    spec = objects[kind, name]["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    for limit in (DEFAULTS.task_time_limit, int(config["INFER_TASK_TIME_LIMIT"])):
        assert grace >= limit + 30, (grace, limit)  # the longest batch, then store, ack, leave
    assert "shareProcessNamespace" not in spec  # celery stays PID 1
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_gpu_worker_takes_exactly_one_gpu_and_the_cpu_worker_none(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (gpu,) = containers(objects["Deployment", "worker-gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["requests"].get("nvidia.com/gpu", 1) == 1
    assert env_of(gpu)["INFER_DEVICE"]["value"] == "cuda:0"  # its one GPU, as index 0
    strategy = objects["Deployment", "worker-gpu"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0  # a rollout never waits for a spare GPU
    for workload in of_kind(objects, *WORKLOADS):
        if workload["metadata"]["name"] != "worker-gpu":
            for c in containers(workload):
                assert "nvidia.com/gpu" not in json.dumps(c["resources"])


def test_cpu_worker_is_a_stateful_set_so_its_node_names_are_stable(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    sts = objects["StatefulSet", "worker-cpu"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert ("Deployment", "worker-cpu") not in objects


# --- Flower, the exporter, Redis ---------------------------------------------------------------


def test_flower_runs_composes_command_with_its_password_from_the_secret(
    objects: dict[tuple[str, str], dict[str, Any]], compose: dict[str, Any]
) -> None:
    (c,) = containers(objects["Deployment", "flower"])
    assert c["command"] == compose["services"]["flower"]["command"]
    ref = env_of(c)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "inference-secrets", "key": "flower-basic-auth"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_exporter_reports_both_class_queues_on_its_port(
    objects: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]
) -> None:
    (c,) = containers(objects["Deployment", "queue-exporter"])
    assert c["command"][:3] == ["python", "-m", "tasks.ops.exporter"]
    queues = [c["command"][i + 1] for i, a in enumerate(c["command"]) if a == "--queue"]
    assert sorted(queues) == sorted(klass for _, _, klass, _ in WORKERS.values())
    port = int(config["INFER_EXPORTER_PORT"])
    assert port_number(c, c["livenessProbe"]["httpGet"]["port"]) == port
    assert c["readinessProbe"]["exec"]["command"] == [
        "python",
        "-m",
        "tasks.ops.exporter",
        "--check",
    ]
    assert objects["Deployment", "queue-exporter"]["spec"]["replicas"] == 1


def test_redis_runs_composes_command(
    objects: dict[tuple[str, str], dict[str, Any]], compose: dict[str, Any]
) -> None:
    (c,) = containers(objects["StatefulSet", "redis"])
    expected = [
        "$(REDIS_PASSWORD)" if a.startswith("${REDIS_PASSWORD") else a
        for a in compose["services"]["redis"]["command"]
    ]
    assert c["command"] == expected
    assert next(iter(env_of(c))) == "REDIS_PASSWORD"


# --- RabbitMQ ----------------------------------------------------------------------------------


def conf_pairs(text: str) -> list[tuple[str, str]]:
    """A rabbitmq.conf text as (key, value) pairs, in order."""
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


@pytest.fixture(scope="module")
def rabbit(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = objects["ConfigMap", "rabbitmq-config"]["data"]
    return data


def test_rabbitmq_is_three_nodes_named_as_the_cluster_config_lists_them(
    objects: dict[tuple[str, str], dict[str, Any]], rabbit: dict[str, str]
) -> None:
    sts = objects["StatefulSet", "rabbitmq"]
    ns, headless = sts["metadata"]["namespace"], sts["spec"]["serviceName"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # a cluster forms all at once
    assert objects["Service", headless]["spec"]["publishNotReadyAddresses"] is True
    (c,) = containers(sts)
    env = env_of(c)
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(POD_NAME).{headless}.{ns}"
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    listed = [v for k, v in conf_pairs(rabbit["30-cluster.conf"]) if ".nodes." in k]
    assert listed == [f"rabbit@{pod}.{headless}.{ns}" for pod in pods]


def test_rabbitmq_cluster_config_makes_composes_choices(rabbit: dict[str, str]) -> None:
    ours = [(k, v) for k, v in conf_pairs(rabbit["30-cluster.conf"]) if ".nodes." not in k]
    compose_conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
    assert ours == [(k, v) for k, v in conf_pairs(compose_conf) if ".nodes." not in k]
    assert ("cluster_partition_handling", "pause_minority") in ours
    assert ("cluster_formation.peer_discovery_backend", "classic_config") in ours


def test_rabbitmq_consumer_timeout_is_composes_and_above_the_task_time_limit(
    rabbit: dict[str, str], compose: dict[str, Any], config: dict[str, str]
) -> None:
    assert rabbit["20-inference.conf"] == compose["configs"]["rabbitmq_conf"]["content"]
    timeout_ms = int(dict(conf_pairs(rabbit["20-inference.conf"]))["consumer_timeout"])
    assert timeout_ms == 1000 * int(config["INFER_RABBITMQ_CONSUMER_TIMEOUT"])
    assert timeout_ms > 1000 * int(config["INFER_TASK_TIME_LIMIT"])
    assert timeout_ms > 1000 * DEFAULTS.task_time_limit


def test_rabbitmq_scripts_are_the_ones_compose_runs(
    rabbit: dict[str, str], compose: dict[str, Any], tmp_path: Path
) -> None:
    copies = {
        "cookie-entrypoint.sh": (ROOT / "deploy/rabbitmq/cookie-entrypoint.sh").read_text(),
        "cluster-health.sh": (ROOT / "deploy/rabbitmq/cluster-health.sh").read_text(),
        "rabbitmq-entrypoint.sh": compose["configs"]["rabbitmq_entrypoint"]["content"].replace(
            "$$", "$"
        ),
        "rabbitmq-provision.sh": compose["configs"]["rabbitmq_provision"]["content"].replace(
            "$$", "$"
        ),
    }
    for key, text in copies.items():
        assert rabbit[key] == text, f"{key} is no longer the text it copies"
    for key in (*copies, "node-entrypoint.sh", "readiness.sh"):
        assert rabbit[key].startswith("#!/bin/sh\n"), key
        (tmp_path / key).write_text(rabbit[key])
        subprocess.run(["sh", "-n", str(tmp_path / key)], check=True)


def test_rabbitmq_mounts_what_its_scripts_expect(
    objects: dict[tuple[str, str], dict[str, Any]], rabbit: dict[str, str]
) -> None:
    sts = objects["StatefulSet", "rabbitmq"]
    (c,) = containers(sts)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    lib = "/usr/local/lib/inference"
    scripts = {i["path"]: i["key"] for i in volumes[mounts[lib]["name"]]["configMap"]["items"]}
    assert c["command"] == ["sh", f"{lib}/node-entrypoint.sh"]
    # Every script path the scripts name is mounted, with the script of that name.
    for key in ("node-entrypoint.sh", "readiness.sh", "rabbitmq-entrypoint.sh"):
        for path in re.findall(rf"(?:\$lib|{lib})/([\w.-]+\.sh)", rabbit[key]):
            assert scripts.get(path) == path, (key, path)
    cookie = re.search(r"^cookie=(\S+)$", rabbit["node-entrypoint.sh"], re.M).group(1)  # type: ignore[union-attr]
    assert mounts[cookie]["subPath"] == "erlang-cookie"
    for conf in ("20-inference.conf", "30-cluster.conf", "40-kubernetes.conf"):
        assert mounts[f"/etc/rabbitmq/conf.d/{conf}"]["subPath"] == conf
    definitions = dict(conf_pairs(rabbit["40-kubernetes.conf"]))["definitions.local.path"]
    assert mounts[definitions]["subPath"] == "definitions.json"
    assert mounts["/var/lib/rabbitmq"]["name"] == "data"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert c["readinessProbe"]["exec"]["command"] == ["sh", f"{lib}/readiness.sh"]
    memory = quantity(c["resources"]["limits"]["memory"])
    override = int(
        dict(conf_pairs(rabbit["40-kubernetes.conf"]))["total_memory_available_override_value"]
    )
    assert 0.5 * memory <= override <= memory


def test_rabbitmq_policy_expires_direct_queues_only(rabbit: dict[str, str]) -> None:
    (policy,) = json.loads(rabbit["definitions.json"])["policies"]
    assert policy["vhost"] == "inference" and policy["apply-to"] == "queues"
    pattern = re.compile(policy["pattern"])
    for klass in ("cpu", "gpu"):
        assert pattern.search(direct_queue(klass, "worker-gpu-7d9f-x2k7q"))
        assert not pattern.search(klass) and not pattern.search(f"{klass}.dead")
    # Long after the direct queue's messages have fallen back to the class queue.
    assert policy["definition"]["expires"] >= 100 * DEFAULTS.direct_queue_ttl_ms


FAKE_DIAGNOSTICS = """#!/bin/sh
case "$*" in
  *check_port_connectivity*) exit 0 ;;
  *"cluster_status --formatter json"*) printf '%s\\n' "$STATUS" ;;
  *) echo "unexpected: $*" >&2; exit 64 ;;
esac
"""


@pytest.mark.parametrize(
    ("hostname", "provisioned", "members", "ready"),
    [
        ("rabbitmq-1", False, 3, True),
        ("rabbitmq-1", False, 2, False),  # a peer missing from its cluster
        ("rabbitmq-0", False, 3, False),  # has not provisioned the users yet
        ("rabbitmq-0", True, 3, True),
    ],
)
def test_rabbitmq_readiness_needs_the_whole_cluster_and_rabbitmq_0_provisioned(
    rabbit: dict[str, str],
    tmp_path: Path,
    hostname: str,
    provisioned: bool,
    members: int,
    ready: bool,
) -> None:
    # readiness.sh and cluster-health.sh as mounted, with their absolute paths moved to tmp_path.
    lib, conf, marker = tmp_path / "lib", tmp_path / "conf", tmp_path / "provisioned"
    for d in (lib, conf, tmp_path / "bin"):
        d.mkdir()
    moves = {
        "/usr/local/lib/inference": str(lib),
        "/etc/rabbitmq/conf.d": str(conf),
        "/tmp/inference-provisioned": str(marker),
    }
    for key in ("readiness.sh", "cluster-health.sh"):
        text = rabbit[key]
        for old, new in moves.items():
            text = text.replace(old, new)
        (lib / key).write_text(text)
    (conf / "30-cluster.conf").write_text(rabbit["30-cluster.conf"])
    if provisioned:
        marker.touch()
    fake = tmp_path / "bin" / "rabbitmq-diagnostics"
    fake.write_text(FAKE_DIAGNOSTICS)
    fake.chmod(0o755)
    nodes = [v for k, v in conf_pairs(rabbit["30-cluster.conf"]) if ".nodes." in k][:members]
    out = subprocess.run(
        ["sh", str(lib / "readiness.sh")],
        env={
            "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
            "HOSTNAME": hostname,
            "STATUS": json.dumps({"disk_nodes": nodes, "running_nodes": nodes}),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (out.returncode == 0) == ready, out.stderr


# --- KEDA --------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def promql_selectors(query: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of each vector selector in ``query``; asserts it parses.

    Enough PromQL for a scaler's query (aggregations, functions, selectors with
    equality matchers): balanced parentheses, every matcher well formed, every
    bare name a function, a keyword or a metric.
    """
    depth = 0
    for ch in query:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0, f"unbalanced parentheses: {query}"
    assert depth == 0, f"unbalanced parentheses: {query}"
    out = []
    for name, body in SELECTOR.findall(query):
        labels: dict[str, str] = {}
        for part in body.split(","):
            match = MATCHER.fullmatch(part)
            assert match and match.group(2) == "=", f"not an equality matcher: {part!r} in {query}"
            labels[match.group(1)] = match.group(3)
        out.append((name, labels))
    rest = SELECTOR.sub(" ", query)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # range and subquery durations
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", rest):
        word, after = match.group(0), rest[match.end() :].lstrip()
        if after.startswith("(") or word in PROMQL_WORDS:
            continue
        out.append((word, {}))
    assert out, f"no vector selector in {query}"
    return out


def test_the_promql_reader_parses_what_it_should() -> None:
    assert promql_selectors('max(a_b{queue="gpu",kind="class"})') == [
        ("a_b", {"queue": "gpu", "kind": "class"})
    ]
    assert promql_selectors("sum by (queue) (rate(x_total[1m]))") == [("x_total", {})]
    for bad in ('max(a{queue="gpu"}', "a{queue=gpu}", 'a{queue=~"g.*"}'):
        with pytest.raises(AssertionError):
            promql_selectors(bad)


@pytest.fixture(scope="module")
def scaled(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, "ScaledObject")}


def test_one_scaled_object_per_device_class_targets_an_existing_worker(
    objects: dict[tuple[str, str], dict[str, Any]], scaled: dict[str, dict[str, Any]]
) -> None:
    targets = {}
    for name, so in scaled.items():
        ref = so["spec"]["scaleTargetRef"]
        assert ref["apiVersion"] == "apps/v1" and ref["kind"] in WORKLOADS
        assert (ref["kind"], ref["name"]) in objects, f"{name} targets nothing"
        targets[ref["name"]] = ref["kind"]
    assert targets == {name: kind for name, (kind, _, _, _) in WORKERS.items()}


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_scaled_object_bounds_and_a_scale_down_that_waits_for_warm_shutdowns(
    objects: dict[tuple[str, str], dict[str, Any]], scaled: dict[str, dict[str, Any]], name: str
) -> None:
    (so,) = (s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == name)
    spec = so["spec"]
    # Never zero: with no live worker a client's router publishes nothing to scale up from.
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    kind = WORKERS[name][0]
    grace = objects[kind, name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": grace}]
    assert all(
        p["periodSeconds"] <= 1800 for p in [*down["policies"], *behavior["scaleUp"]["policies"]]
    )


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_prometheus_trigger_scales_on_the_drain_time_the_exporter_serves(
    objects: dict[tuple[str, str], dict[str, Any]], scaled: dict[str, dict[str, Any]], name: str
) -> None:
    kind, _, klass, _ = WORKERS[name]
    (so,) = (s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == name)
    (trigger,) = (t for t in so["spec"]["triggers"] if t["type"] == "prometheus")
    # Drain time already divides by the fleet's capacity: Value, not AverageValue.
    assert trigger["metricType"] == "Value"
    meta = trigger["metadata"]
    assert float(meta["threshold"]) > 0
    assert re.fullmatch(r"https?://[a-z0-9.-]+\.svc\.cluster\.local(:\d+)?", meta["serverAddress"])
    selectors = promql_selectors(meta["query"])
    assert {metric for metric, _ in selectors} <= set(SERVED_METRICS)
    assert ("infer_queue_expected_drain_seconds", {"queue": klass, "kind": "class"}) in selectors
    (c,) = containers(objects[kind, name])
    consumed = c["command"][c["command"].index("-Q") + 1].split(",")
    for _, labels in selectors:
        assert labels.get("kind") in ("class", None)
        assert labels.get("queue") in (*consumed, None)
        assert fallback_of(labels.get("queue", "")) is None  # a class queue


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_rabbitmq_trigger_reads_the_class_queue_with_the_app_user(
    objects: dict[tuple[str, str], dict[str, Any]], scaled: dict[str, dict[str, Any]], name: str
) -> None:
    kind, _, klass, _ = WORKERS[name]
    (so,) = (s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == name)
    (trigger,) = (t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq")
    meta = trigger["metadata"]
    assert meta["queueName"] == klass and fallback_of(klass) is None
    (c,) = containers(objects[kind, name])
    assert klass in c["command"][c["command"].index("-Q") + 1].split(",")
    assert meta["mode"] == "QueueLength" and meta["protocol"] == "amqp"
    assert int(meta["value"]) > 0
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    auth = objects["TriggerAuthentication", trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    host = objects["Secret", ref["name"]]["stringData"][ref["key"]]
    broker = Settings.from_env({"CELERY_BROKER_URL": "amqp://x:x@rabbitmq:5672/inference"}).broker
    assert host.startswith("amqp://inference:")
    assert host.endswith("@rabbitmq.inference.svc.cluster.local:5672/inference")
    assert broker.rsplit("/", 1)[1] == host.rsplit("/", 1)[1]  # the app's vhost


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed"
)
def test_promtool_parses_every_scaler_query(
    scaled: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    rules = [
        {"record": f"keda:{t['name'].replace('-', '_')}", "expr": t["metadata"]["query"]}
        for so in scaled.values()
        for t in so["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    assert len(rules) == len(WORKERS)
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": rules}]}))
    out = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_docs_say_it_is_validated_statically_and_explain_the_numbers(
    scaled: dict[str, dict[str, Any]],
) -> None:
    text = " ".join((ROOT / "docs" / "kubernetes.md").read_text().split())
    assert "not applied to a cluster here; validated statically by" in text.lower()
    assert "tests/unit/test_kubernetes.py" in text
    assert "kubectl apply -k deploy/kubernetes" in text
    for so in scaled.values():
        for t in so["spec"]["triggers"]:
            number = t["metadata"].get("threshold") or t["metadata"]["value"]
            assert re.search(rf"\b{re.escape(number)}\b", text), number


# --- tasks/ops/health.py: the readiness probe ---------------------------------------------------

HEARTBEAT_S = 2.0


def record(
    name: str = "worker-cpu-0@worker-cpu-0", heartbeat: float = 1000.0, accepting: bool = True
) -> WorkerCapabilities:
    return WorkerCapabilities(
        name=name,
        queue=direct_queue("cpu", name.split("@")[0]),
        device_kind="cpu",
        device_name="cpu",
        device_index=None,
        total_memory_mb=1000,
        free_memory_mb=900,
        compute_capability=None,
        dtypes=("fp32",),
        heartbeat=heartbeat,
        device_class_queue="cpu",
        accepting=accepting,
    )


class FakeStore:
    """A RegistryStore holding records in a dict (or failing every read)."""

    def __init__(self, *records: WorkerCapabilities, down: bool = False) -> None:
        self.records = {r.name: r for r in records}
        self.down = down

    def publish(self, caps: WorkerCapabilities, ttl_s: float) -> None:
        self.records[caps.name] = caps

    def remove(self, name: str) -> None:
        self.records.pop(name, None)

    def load(self) -> list[WorkerCapabilities]:
        if self.down:
            raise ConnectionError("Redis is away")
        return list(self.records.values())


@pytest.mark.parametrize(
    ("age", "accepting", "says"),
    [
        (0.0, True, None),
        (3.9, True, None),  # younger than two heartbeats
        (-0.5, True, None),  # beat "in the future": a clock step, still fresh
        (4.0, True, "last heartbeat 4.0 s ago"),
        (60.0, True, "not beating"),
        (0.5, False, "not accepting"),
        (10.0, False, "last heartbeat"),  # the stale beat is the first reason
    ],
)
def test_health_decides_from_age_and_accepting(
    age: float, accepting: bool, says: str | None
) -> None:
    now = 1000.0 + age
    why = health.not_ready(record(accepting=accepting), "w@h", now, HEARTBEAT_S)
    assert (why is None) == (says is None), why
    if says is not None:
        assert why is not None and says in why and "w@h" in why


def test_health_says_a_worker_missing_from_the_registry_is_not_ready() -> None:
    why = health.not_ready(None, "w@h", 1000.0, HEARTBEAT_S)
    assert why is not None and "not in the registry" in why


def test_health_reads_its_own_record_from_the_store_once_with_the_clock_given() -> None:
    mine, other = record(heartbeat=100.0), record("worker-cpu-1@worker-cpu-1", heartbeat=100.0)
    store = FakeStore(mine, other)
    ok, line = health.ready(mine.name, store, HEARTBEAT_S, now=lambda: 101.0)
    assert ok and line.startswith(f"{mine.name} ready") and mine.queue in line
    ok, line = health.ready(mine.name, store, HEARTBEAT_S, now=lambda: 105.0)
    assert not ok and "last heartbeat 5.0 s ago" in line
    store.remove(mine.name)
    assert health.ready(mine.name, store, HEARTBEAT_S, now=lambda: 101.0)[0] is False
    ok, line = health.ready(mine.name, FakeStore(down=True), HEARTBEAT_S, now=lambda: 101.0)
    assert not ok and "cannot read the registry" in line and "Redis is away" in line


def test_health_finds_a_record_in_the_embedded_file_registry(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.publish(record("a@h"), ttl_s=4)
    store.publish(record("b@h"), ttl_s=4)
    found = health.find_record(store, "b@h")
    assert found is not None and found.name == "b@h"
    assert health.find_record(store, "c@h") is None


def test_health_expands_the_node_name_as_celery_worker_does() -> None:
    from celery.utils.nodenames import default_nodename, host_format

    host = socket.gethostname()
    assert health.node_name("worker-cpu-0@%h") == f"worker-cpu-0@{host}"
    assert health.node_name("cpu0@%h") == host_format(default_nodename("cpu0@%h"))
    assert health.node_name("gpu0@fixed") == "gpu0@fixed"


def test_health_command_line_exits_0_only_when_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The embedded registry (files under INFER_HOME): no server.
    for var in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("INFER_HOME", str(tmp_path))
    monkeypatch.setenv("INFER_HEARTBEAT_S", "2")
    store = FileStore(tmp_path / "registry" / "default")
    node = f"worker-cpu-0@{socket.gethostname()}"
    assert health.main(["ready", "--node", "worker-cpu-0@%h"]) == 1
    assert "not in the registry" in capsys.readouterr().err
    store.publish(record(node, heartbeat=time.time()), ttl_s=4)
    assert health.main(["ready", "--node", "worker-cpu-0@%h"]) == 0
    assert f"{node} ready" in capsys.readouterr().out
    store.publish(record(node, heartbeat=time.time(), accepting=False), ttl_s=4)
    assert health.main(["ready", "--node", "worker-cpu-0@%h"]) == 1
    assert "not accepting" in capsys.readouterr().err
    monkeypatch.setenv("INFER_HEARTBEAT_S", "nonsense")
    assert health.main(["ready", "--node", "worker-cpu-0@%h"]) == 1
    assert "INFER_HEARTBEAT_S" in capsys.readouterr().err

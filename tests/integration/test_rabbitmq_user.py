"""compose.yaml's RabbitMQ provisioning, run for real against the local broker.

The exact ``configs.rabbitmq_provision`` script (compose's ``$$`` undone) provisions a
throwaway vhost, app user and admin user here, through a ``rabbitmqctl`` shim that
records every call and never deletes the ``guest`` user the rest of the suite runs
as.  Then a real worker, a client, the remote-control CLI and an event receiver
work as the least-privilege app user, and anything outside its names is refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import amqp.exceptions
import pytest
import yaml
from kombu import Connection, Exchange, Queue
from kombu.transport.pyamqp import Channel

from tasks.ops.launcher import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RABBITMQCTL = shutil.which("rabbitmqctl")

# Logs each call; refuses to delete guest (the suite's own user), everything else is real.
SHIM = """\
#!/bin/sh
printf '%s\\n' "$*" >> "$SHIM_LOG"
for arg in "$@"; do
  case "$arg" in
    delete_user) deleting=1 ;;
    guest) guest=1 ;;
  esac
done
if [ -n "${deleting:-}" ] && [ -n "${guest:-}" ]; then
  exit 0
fi
exec "$SHIM_REAL" "$@"
"""


def provision_script() -> str:
    """The provisioning script as the rabbitmq container runs it."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    content: str = compose["configs"]["rabbitmq_provision"]["content"]
    return content.replace("$$", "$")  # compose's interpolation escape


def ctl(*args: str) -> str:
    assert RABBITMQCTL is not None
    out = subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def rows(*args: str) -> list[list[str]]:
    return [line.split("\t") for line in ctl("-s", *args).splitlines() if line]


@dataclass
class Provisioned:
    vhost: str
    user: str
    password: str
    admin: str
    admin_password: str
    calls: list[str]

    def url(self, vhost: str | None = None) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:5672/{vhost or self.vhost}"


def run_script(
    tmp: Path, env: dict[str, str], real: str | None = RABBITMQCTL
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the provisioning script with ``env``; its result and its rabbitmqctl calls."""
    shim_dir = tmp / "bin"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "rabbitmqctl"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    script = tmp / "rabbitmq-provision.sh"
    script.write_text(provision_script())
    log = tmp / "rabbitmqctl.log"
    log.write_text("")
    full_env = {
        "PATH": f"{shim_dir}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "SHIM_LOG": str(log),
        "SHIM_REAL": real or "/bin/false",
        **env,
    }
    out = subprocess.run(
        ["sh", str(script)], env=full_env, capture_output=True, text=True, timeout=300
    )
    return out, log.read_text().splitlines()


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    if RABBITMQCTL is None:
        pytest.skip("rabbitmqctl is not installed here")
    host = urlparse(os.environ["CELERY_BROKER_URL"]).hostname
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip(f"the broker is on {host}: rabbitmqctl here would provision another node")
    probe = subprocess.run([RABBITMQCTL, "-q", "list_vhosts"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot manage the local node: {probe.stderr.decode()[-300:]}")

    rid = uuid.uuid4().hex[:8]
    p = Provisioned(
        vhost=f"inference-test-{rid}",
        user=f"infer-{rid}",
        password="",
        admin=f"infer-admin-{rid}",
        admin_password=secrets.token_hex(16),
        calls=[],
    )
    tmp = tmp_path_factory.mktemp("provision")
    try:
        # As a data volume of the previous compose.yaml left it: the app user was the image's
        # default user, an administrator with every permission on another vhost.
        ctl("-q", "add_user", p.user, secrets.token_hex(16))
        ctl("-q", "set_user_tags", p.user, "administrator")
        ctl("-q", "set_permissions", "-p", "/", p.user, ".*", ".*", ".*")
        # Twice, with a new app password the second time: idempotent, and a rerun rotates it.
        for attempt in range(2):
            p.password = secrets.token_hex(16)
            env = {
                "APP_RABBITMQ_VHOST": p.vhost,
                "APP_RABBITMQ_USER": p.user,
                "APP_RABBITMQ_PASSWORD": p.password,
                "RABBITMQ_DEFAULT_USER": p.admin,
                "RABBITMQ_DEFAULT_PASS": p.admin_password,
            }
            out, p.calls = run_script(tmp, env)
            assert out.returncode == 0, (attempt, out.stderr, p.calls)
            assert f"provision: vhost {p.vhost}" in out.stdout
        yield p
    finally:
        for args in (
            ("delete_vhost", p.vhost),
            ("delete_user", p.user),
            ("delete_user", p.admin),
        ):
            subprocess.run([RABBITMQCTL, "-q", *args], capture_output=True, timeout=120)


@pytest.mark.parametrize(
    "change",
    [
        {"APP_RABBITMQ_USER": "admin-x"},  # the admin user itself
        {"APP_RABBITMQ_USER": "guest"},
        {"RABBITMQ_DEFAULT_USER": "guest"},
        {"APP_RABBITMQ_PASSWORD": "change-me"},  # too short
        {"RABBITMQ_DEFAULT_PASS": "short"},
        {"APP_RABBITMQ_PASSWORD": ""},
        {"APP_RABBITMQ_USER": ""},
    ],
)
def test_script_refuses_unsafe_input_before_touching_the_broker(
    tmp_path: Path, change: dict[str, str]
) -> None:
    env = {
        "APP_RABBITMQ_USER": "app-x",
        "APP_RABBITMQ_PASSWORD": "p" * 16,
        "RABBITMQ_DEFAULT_USER": "admin-x",
        "RABBITMQ_DEFAULT_PASS": "q" * 16,
        **change,
    }
    out, calls = run_script(tmp_path, env, real=None)  # any rabbitmqctl call would fail
    assert out.returncode != 0 and calls == [], (out, calls)
    assert "provision:" in out.stderr or "is not set" in out.stderr


def test_app_user_has_no_tags_and_one_vhost(provisioned: Provisioned) -> None:
    p = provisioned
    users = {row[0]: row[1] for row in rows("list_users")}
    assert users[p.user] == "[]"  # it was an administrator with access to "/" before
    assert users[p.admin] == "[administrator]"
    assert "guest" in users  # the shim kept it (see below)
    perms = rows("list_user_permissions", p.user)
    assert [row[0] for row in perms] == [p.vhost]
    _, configure, write, read = perms[0]
    assert configure == read and write.startswith("^(amq\\.default|")
    assert rows("list_user_permissions", p.admin) == [[p.vhost, ".*", ".*", ".*"]]
    # The script removes guest (the shim kept it for the rest of the suite) and passes
    # passwords on stdin only: they never appear on a rabbitmqctl command line.
    assert "-q delete_user guest" in p.calls
    assert not [c for c in p.calls if p.password in c or p.admin_password in c]
    with Connection(p.url()) as conn:
        conn.connect()  # the rotated password is the one that works
    with (
        Connection(p.url().replace(p.password, "x" * 32)) as conn,
        pytest.raises(amqp.exceptions.AccessRefused),
    ):
        conn.connect()


def test_app_user_cannot_open_another_vhost(provisioned: Provisioned) -> None:
    with (
        Connection(provisioned.url("/")) as conn,
        pytest.raises(amqp.exceptions.NotAllowed) as refused,  # 530 NOT_ALLOWED
    ):
        conn.connect()
    assert "access to vhost '/' refused" in str(refused.value)


@pytest.mark.parametrize(
    "declare",
    [
        lambda ch: Queue("evil", durable=False)(ch).declare(),
        lambda ch: Queue("celery")(ch).declare(),  # Celery's default queue: not this deployment's
        lambda ch: Queue("cpu2")(ch).declare(),
        lambda ch: Exchange("evil", "fanout")(ch).declare(),
        lambda ch: Queue("celeryev.x", Exchange("amq.fanout", "fanout", passive=True))(
            ch
        ).declare(),  # binding to a broker exchange outside its names: no read on it
    ],
    ids=["queue-evil", "queue-celery", "queue-cpu2", "exchange-evil", "bind-amq.fanout"],
)
def test_app_user_cannot_declare_names_outside_the_deployment(
    provisioned: Provisioned, declare: Callable[[Channel], object]
) -> None:
    with (
        Connection(provisioned.url()) as conn,
        pytest.raises(amqp.exceptions.AccessRefused) as refused,
    ):
        declare(conn.channel())
    assert "ACCESS_REFUSED" in str(refused.value) or "access to" in str(refused.value)


CLIENT = textwrap.dedent("""
    import json, sys, threading, time
    from models.errors import NoCapableWorker
    from tests.specs import spec_of
    from tasks import app, infer
    from tasks.ops.demo import sample_inputs

    own_queue = sys.argv[1]
    x = sample_inputs(spec_of("mlp"), 1, 1)[0]
    out = {}
    deadline = time.monotonic() + 60
    while True:  # routed by the capability router, once the worker's heartbeat is in
        try:
            routed = infer.apply_async(("mlp", x))
            break
        except NoCapableWorker:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    out["routed"] = routed.get(timeout=60)["worker"]
    out["shared"] = infer.apply_async(("mlp", x), queue="cpu").get(timeout=60)["worker"]
    out["own"] = infer.apply_async(("mlp", x), queue=own_queue).get(timeout=60)["worker"]
    start = time.monotonic()  # native delayed delivery: celery_delayed_* on RabbitMQ
    delayed = infer.apply_async(("mlp", x), queue="cpu", countdown=2)
    out["delayed"] = delayed.get(timeout=60)["worker"]
    out["delayed_s"] = time.monotonic() - start
    out["ping"] = app.control.ping(timeout=5)

    seen = []
    with app.connection_for_read() as conn:
        def on_event(event):
            seen.append(event["type"])
            if {"task-received", "task-started", "task-succeeded"} <= set(seen):
                receiver.should_stop = True
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        capture = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "timeout": 30, "wakeup": True},
            daemon=True,
        )
        capture.start()
        # The receiver binds its queue in its thread: send until it has seen a task end.
        deadline = time.monotonic() + 45
        while capture.is_alive() and time.monotonic() < deadline:
            infer.apply_async(("mlp", x), queue="cpu").get(timeout=60)
            capture.join(3)
    out["events"] = sorted(set(seen))
    print(json.dumps(out))
""")


def test_worker_client_control_and_events_as_the_app_user(
    provisioned: Provisioned, tmp_path: Path, weights_dir: Path
) -> None:
    p = provisioned
    rid = p.user.removeprefix("infer-")
    env = dict(
        os.environ,
        CELERY_BROKER_URL=p.url(),
        INFER_REGISTRY_NAMESPACE=f"rmq-{rid}",
        INFER_TASK_EVENTS="true",  # as in compose.yaml
    )
    worker = WorkerProcess(f"rmq-{rid}", "cpu", logdir=tmp_path, env=env, preload=("mlp",))
    assert worker.consumed_queues == [f"cpu.direct.rmq-{rid}", "cpu"]  # compose's real names
    try:
        worker.start().wait_ready()
        client = tmp_path / "client.py"
        client.write_text(CLIENT)
        out = subprocess.run(
            [sys.executable, str(client), worker.own_queue],
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"{out.stderr[-3000:]}\nworker log:\n{worker.log_tail()}"
        got = json.loads(out.stdout.splitlines()[-1])
        for key in ("routed", "shared", "own", "delayed"):
            assert got[key] == worker.hostname, key
        assert got["delayed_s"] >= 1.9
        assert got["ping"] == [{worker.hostname: {"ok": "pong"}}]
        assert {"task-received", "task-started", "task-succeeded"} <= set(got["events"])

        celery = [sys.executable, "-m", "celery", "-A", "tasks"]
        for command in (
            ["inspect", "ping"],
            ["inspect", "capabilities"],
            ["control", "enable_events"],  # what Flower sends at start
        ):
            cli = subprocess.run(
                [*celery, *command, "-d", worker.hostname, "--json", "-t", "5"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, (command, cli.stderr)
            assert worker.hostname in cli.stdout, (command, cli.stdout)
    finally:
        worker.stop()
    assert worker.session_pids() == []
    log = worker.log_tail(100_000).lower()
    assert "access_refused" not in log and "not_allowed" not in log, log

    # What the deployment really declared in its vhost (the topology at worker start, native
    # delayed delivery, events, remote control), all of it within the app user's names.
    queues = {row[0] for row in rows("list_queues", "-p", p.vhost, "name")}
    exchanges = {row[0] for row in rows("list_exchanges", "-p", p.vhost, "name")}
    assert {"cpu", "cpu.dead", worker.own_queue, "celery_delayed_0", "celery_delayed_27"} <= queues
    assert {
        "cpu",
        worker.own_queue,
        "celeryev",
        "celery.pidbox",
        "reply.celery.pidbox",
    } <= exchanges
    assert "celery_delayed_delivery" in exchanges
    configure = rows("list_user_permissions", p.user)[0][1]
    theirs = {name for name in queues | exchanges if not name.startswith("amq.")}
    assert {name for name in theirs if not re.fullmatch(configure, name)} == set()

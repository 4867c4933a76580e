"""Served outputs match in-process forward passes, on RabbitMQ + Redis with real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from models.runner import reference_forward
from tasks import app, infer
from tasks.client.results import outputs
from tasks.ops.demo import sample_inputs
from tasks.ops.launcher import WorkerProcess
from tests.specs import spec_of, zoo_names

pytestmark = pytest.mark.integration
Pair = tuple[WorkerProcess, WorkerProcess, str]


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
@pytest.mark.parametrize("name", zoo_names())
def test_every_model_matches_in_process(
    pair: Pair, weights_dir: Path, name: str, serializer: str
) -> None:
    a, b, shared = pair
    cases = [
        (sample_inputs(spec_of(name), 1, 1)[0], a.own_queue),
        (sample_inputs(spec_of(name), 5, 2), b.own_queue),
        (sample_inputs(spec_of(name), 3, 3), shared),
    ]
    pending = [(x, infer.apply_async((name, x), queue=q, serializer=serializer)) for x, q in cases]
    for (x, queue), (_, res) in zip(cases, pending, strict=True):
        got = res.get(timeout=60)
        expected = reference_forward(spec_of(name), x)
        assert got["model"] == name and got["batch_size"] == expected.shape[0]
        assert got["device"] == "cpu" and got["dtype"] == "fp32"
        if queue != shared:
            assert got["worker"] == (a if queue == a.own_queue else b).hostname
        assert np.allclose(outputs(got), expected, atol=1e-5), name
        timing = got["timing"]
        assert timing["total_ms"] >= timing["service_ms"] >= timing["compute_ms"] > 0
        assert timing["queue_wait_ms"] >= 0


def test_client_script_outside_the_repo(pair: Pair, weights_dir: Path, tmp_path: Path) -> None:
    """Only `from tasks import app` and stock Celery calls, run from another directory."""
    a, _, shared = pair
    x = sample_inputs(spec_of("cnn"), 2, 7)
    tokens = sample_inputs(spec_of("transformer"), 1, 8)
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(f"""
        import base64, json, sys
        import numpy as np
        from tasks import app

        def array(env):  # results are {{dtype, shape, data}}; data is bytes under msgpack
            data = env["data"] if isinstance(env["data"], bytes) else base64.b64decode(env["data"])
            return np.frombuffer(data, dtype=env["dtype"]).reshape(env["shape"]).tolist()

        images = json.loads(sys.argv[1])
        tokens = json.loads(sys.argv[2])
        r1 = app.send_task("tasks.infer", args=("cnn", images), queue={shared!r})
        infer = app.tasks["tasks.infer"]  # the registered task object, via the app only
        r2 = infer.apply_async(("transformer", np.array(tokens)), queue={a.own_queue!r})
        print(json.dumps({{"cnn": array(r1.get(timeout=60)["outputs"]),
                          "transformer": array(r2.get(timeout=60)["outputs"])}}))
    """)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(x.tolist()), json.dumps(tokens.tolist())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.allclose(np.array(got["cnn"]), reference_forward(spec_of("cnn"), x), atol=1e-5)
    assert np.allclose(
        np.array(got["transformer"]),
        reference_forward(spec_of("transformer"), tokens),
        atol=1e-5,
    )


def test_app_uses_the_configured_broker() -> None:
    assert app.conf.broker_url.startswith("amqp://")
    assert app.conf.result_backend.startswith("redis://")
    assert app.conf.broker_transport_options == {"confirm_publish": True}


def test_torch_lives_only_in_the_pool_child(pair: Pair) -> None:
    """The prefork parent never loads torch (so never CUDA); the child that serves does."""
    import psutil

    a, _, _ = pair
    infer.apply_async(("mlp", np.zeros(64, np.float32)), queue=a.own_queue).get(timeout=60)

    def has_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    children = psutil.Process(a.pid).children()
    assert len(children) == 1
    assert not has_torch(a.pid)
    assert has_torch(children[0].pid)


def test_predict_helper_returns_the_output_array(pair: Pair, weights_dir: Path) -> None:
    from tasks.client.results import predict

    a, _, _ = pair
    x = sample_inputs(spec_of("mlp"), 3, 11)
    got = predict("mlp", x, queue=a.own_queue, timeout=60)
    assert got.shape == (3, 10)
    assert np.allclose(got, reference_forward(spec_of("mlp"), x), atol=1e-5)

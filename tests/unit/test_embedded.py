"""The embedded broker's message files are never seen half-written (kombu issue #1551)."""

from __future__ import annotations

import os
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection

from tasks.app import InferenceApp
from tasks.settings import Settings
from tasks.wire.embedded import Transport


def channel(folder: Path) -> Any:
    conn = Connection(
        "filesystem://",
        transport=Transport,
        transport_options={"data_folder_in": str(folder), "data_folder_out": str(folder)},
    )
    return conn.default_channel


def test_a_consumer_polling_mid_write_finds_nothing_then_the_whole_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chan = channel(tmp_path)
    seen_mid_write: list[Any] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        # The body is on disk under its temporary name: a consumer polls right now.
        try:
            seen_mid_write.append(chan._get("q"))
        except Empty:
            seen_mid_write.append(None)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    chan._put("q", {"body": "x" * 1000})
    monkeypatch.setattr(os, "replace", real_replace)
    assert seen_mid_write == [None]  # stock kombu would have handed out the file here
    assert chan._get("q") == {"body": "x" * 1000}
    assert os.listdir(tmp_path) == []  # taken, nothing left behind


def test_the_embedded_app_uses_it(tmp_path: Path) -> None:
    app = InferenceApp(Settings.from_env({"INFER_HOME": str(tmp_path)}))
    with app.connection_for_write() as conn:
        assert conn.transport_cls == "tasks.wire.embedded:Transport"
        assert isinstance(conn.transport, Transport)
    broker = InferenceApp(
        Settings.from_env(
            {"INFER_HOME": str(tmp_path), "CELERY_BROKER_URL": "amqp://u:p@127.0.0.1:5672//"}
        )
    )
    assert broker.conf.broker_transport is None  # RabbitMQ is untouched

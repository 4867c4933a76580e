"""One typed settings object, read once from the environment and passed around.

Each setting is declared once, as a field of :class:`Settings`: its annotation is
the type, and :func:`setting` holds the variable, default, bounds and help text.
:meth:`Settings.from_env` parses the environment from these declarations,
``__post_init__`` checks their bounds (integers at least 1 unless declared
otherwise, numbers above 0), and ``python -m tasks.ops.settings_doc >
docs/settings.md`` writes the reference page from them.

Standard Celery variables keep their names (``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND``); everything of our own uses the ``INFER_`` prefix.
With no broker configured the deployment runs on an embedded broker: kombu's
filesystem transport plus Celery's file result backend under ``INFER_HOME``.

A dataclass with field metadata, not pydantic-settings, by measurement (median
of 11 fresh interpreters, two runs): ``import tasks`` takes 249-274 ms, and
importing pydantic-settings 2.16.3 (pydantic 2.14.4) after it adds 59-73 ms
(+24-27%) to every client, CLI and worker start, for parsing that fits in
``_READERS``.  Its
defaults also differ from ours: ``BaseSettings(...)`` reads ``os.environ`` on
every construction, matches names case-insensitively, wants JSON for tuples,
takes ``y``/``t`` as booleans, and its models support neither
``dataclasses.replace`` nor class-attribute defaults, which callers use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from kombu.utils.url import maybe_sanitize_url

from models.errors import ConfigurationError
from routing.queues import QUEUE_TYPES

__all__ = ["DTYPES", "SERIALIZERS", "Settings", "Spec", "declared"]

SERIALIZERS = ("msgpack", "json")  # pickle is never accepted, on purpose
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Spec:
    """How one field of :class:`Settings` is read from the environment and documented."""

    env: str
    help: str
    at_least: int = 1  # integers only; numbers (float) are always above 0
    choices: tuple[str, ...] = ()  # shown in the docs; checked in __post_init__
    shown: str | None = None  # the default as the docs show it, where it is computed


def setting(
    env: str, default: Any, help: str, *, factory: Callable[[], Any] | None = None, **spec: Any
) -> Any:
    """A :class:`Settings` field that carries its :class:`Spec`."""
    meta = {"setting": Spec(env, help, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _to_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _comma_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# A field's type (``Path | None`` counts as ``Path``) -> how to read it, and what it then is not.
_READERS: dict[type, tuple[Callable[[str], Any], str]] = {
    str: (str, "a string"),
    int: (int, "an integer"),
    float: (float, "a number"),
    bool: (_to_bool, "a boolean: write true or false (or 1/0, yes/no, on/off)"),
    Path: (lambda raw: Path(raw).resolve(), "a path"),
    tuple: (_comma_list, "a comma-separated list"),
}


@functools.cache
def declared() -> tuple[tuple[Field[Any], Spec, type], ...]:
    """(field, spec, type) for every setting, in declaration order; ``Path | None`` -> ``Path``."""
    hints = get_type_hints(Settings)
    out = []
    for f in fields(Settings):
        kind = hints[f.name]
        if isinstance(kind, UnionType):
            (kind,) = (a for a in get_args(kind) if a is not type(None))
        out.append((f, f.metadata["setting"], get_origin(kind) or kind))
    return tuple(out)


def _var() -> Path:
    return Path("var").resolve()


@dataclass(frozen=True)
class Settings:
    """Every knob of the deployment, typed, with its default: see docs/settings.md."""

    broker_url: str | None = setting(
        "CELERY_BROKER_URL",
        None,
        "RabbitMQ: amqp://user:pw@host:5672/vhost; a cluster: its nodes' URLs joined with ;",
        shown="embedded",
    )
    result_backend: str | None = setting(
        "CELERY_RESULT_BACKEND", None, "Redis: redis://:password@host:6379/0", shown="embedded"
    )
    home: Path = setting(
        "INFER_HOME", None, "local state: embedded broker, results", factory=_var, shown="./var"
    )
    weights_dir: Path | None = setting(
        "INFER_WEIGHTS_DIR", None, "safetensors weights folder", shown="$INFER_HOME/weights"
    )
    serializer: str = setting(
        "INFER_SERIALIZER", "msgpack", "message format (pickle is refused)", choices=SERIALIZERS
    )
    max_payload_bytes: int = setting(
        "INFER_MAX_PAYLOAD_BYTES", 8 * 1024 * 1024, "largest accepted input tensor, bytes (8 MiB)"
    )
    claim_check_bytes: int = setting(
        "INFER_CLAIM_CHECK_BYTES",
        1024 * 1024,
        "inputs over this many raw bytes go by reference in Redis (claim check; 1 MiB); 0: off",
        at_least=0,
    )
    claim_check_ttl_s: int = setting(
        "INFER_CLAIM_CHECK_TTL_S",
        3600,
        "how long a claim-checked input may wait in Redis for a worker, s",
    )
    blob_url: str | None = setting(
        "INFER_BLOB_URL",
        None,
        "Redis for claim-checked inputs: redis://host:6379/1",
        shown="the result backend",
    )
    model_repository: tuple[str, ...] = setting(
        "INFER_MODEL_REPOSITORY",
        (),
        "model repository folders, comma-separated (searched before installed packages)",
        shown="none",
    )
    device: str = setting("INFER_DEVICE", "auto", "cpu, cuda:N or auto (cuda:0 if there is one)")
    preload: tuple[str, ...] = setting(
        "INFER_PRELOAD", (), "models loaded at worker start (name or name@version)"
    )
    cache_budget_mb: int = setting(
        "INFER_CACHE_BUDGET_MB", 1024, "per-worker model cache budget (LRU), MiB"
    )
    # One intra-op thread by default: idle OpenMP threads spin after each
    # forward pass and steal the core the worker needs to take the next
    # message (measured: infer p50 6.5 ms -> 4.2 ms on 2 cores).  Raise it for
    # a lone CPU worker running large batches.
    torch_threads: int = setting("INFER_TORCH_THREADS", 1, "torch intra-op threads per worker")
    prefetch_multiplier: int = setting(
        "INFER_PREFETCH_MULTIPLIER", 1, "messages reserved per pool slot"
    )
    task_time_limit: int = setting(
        "INFER_TASK_TIME_LIMIT", 300, "hard limit per task, s; below the consumer timeout"
    )
    task_soft_time_limit: int = setting(
        "INFER_TASK_SOFT_TIME_LIMIT", 280, "soft limit per task, s; below INFER_TASK_TIME_LIMIT"
    )
    rabbitmq_consumer_timeout: int = setting(
        "INFER_RABBITMQ_CONSUMER_TIMEOUT", 1800, "the broker's consumer_timeout, seconds"
    )
    result_expires: int = setting("INFER_RESULT_EXPIRES", 3600, "results kept in the backend, s")
    worker_init_timeout: float = setting(
        "INFER_WORKER_INIT_TIMEOUT", 120.0, "time allowed for a pool child to preload, s"
    )
    embedded_poll_interval: float = setting(
        "INFER_EMBEDDED_POLL_INTERVAL", 0.02, "embedded broker polling period, seconds"
    )
    # Off until someone watches: Flower switches events on in every worker at
    # start (its enable_events option), and `celery -A tasks control
    # enable_events` does too.  Events cost ~15% of a no-op round trip.
    task_events: bool = setting(
        "INFER_TASK_EVENTS", False, "workers send task events from the start"
    )
    sent_events: bool = setting("INFER_SENT_EVENTS", False, "clients send task-sent events")
    track_started: bool = setting("INFER_TRACK_STARTED", False, "record a STARTED state per task")
    result_extended: bool = setting(
        "INFER_RESULT_EXTENDED", False, "store task name, args and worker with each result"
    )
    routing: bool = setting(
        "INFER_ROUTING", True, "capability router for tasks.infer and tasks.diag.noop"
    )
    heartbeat_s: float = setting(
        "INFER_HEARTBEAT_S", 2.0, "capability heartbeat period, s (records expire after 2)"
    )
    direct_queue_ttl_ms: int = setting(
        "INFER_DIRECT_QUEUE_TTL_MS", 4000, "ms in a direct queue before the class queue"
    )
    max_in_flight: int = setting("INFER_MAX_IN_FLIGHT", 4, "load at which a sticky worker spills")
    sticky_ttl_s: float = setting("INFER_STICKY_TTL_S", 300.0, "sticky key lifetime, seconds")
    sticky_size: int = setting("INFER_STICKY_SIZE", 4096, "sticky keys kept per client")
    memory_mb: int = setting(
        "INFER_MEMORY_MB", 0, "advertised device memory, MiB (0: measure)", at_least=0
    )
    dtypes: tuple[str, ...] = setting(
        "INFER_DTYPES", (), "advertised precisions", choices=DTYPES, shown="the device's"
    )
    registry_namespace: str = setting(
        "INFER_REGISTRY_NAMESPACE", "default", "workers and clients that see each other (a fleet)"
    )
    metrics_port: int = setting(
        "INFER_METRICS_PORT", 9808, "a worker's Prometheus /metrics port (0: off)", at_least=0
    )
    metrics_addr: str = setting(
        "INFER_METRICS_ADDR", "127.0.0.1", "address the metrics server listens on"
    )
    batching: bool = setting(
        "INFER_BATCHING", False, "dynamic batching in this worker (one pool job per batch)"
    )
    batch_reserve: int = setting(
        "INFER_BATCH_RESERVE",
        2,
        "batches a batching worker reserves per pool process (its prefetch, in max batches)",
    )
    max_batch_size: int = setting(
        "INFER_MAX_BATCH_SIZE", 32, "default largest dynamic batch (the model registry's wins)"
    )
    max_wait_ms: float = setting(
        "INFER_MAX_WAIT_MS", 5.0, "default longest wait for a batch to fill, ms"
    )
    batch_sizing: bool = setting(
        "INFER_BATCH_SIZING",
        True,
        "cap each model's batches where its forward passes are cheapest per sample",
    )
    batch_deadline_share: float = setting(
        "INFER_BATCH_DEADLINE_SHARE",
        0.25,
        "cap a batch so its measured service time stays within this share of its requests' "
        "deadline budget, at most 1 (1: only the whole budget)",
    )
    queue_type: str = setting(
        "INFER_QUEUE_TYPE", "quorum", "task queues (classic: RabbitMQ < 3.10)", choices=QUEUE_TYPES
    )
    delivery_limit: int = setting(
        "INFER_DELIVERY_LIMIT", 5, "redeliveries before a message is dead-lettered"
    )
    broker_heartbeat: int = setting(
        "INFER_BROKER_HEARTBEAT", 20, "AMQP heartbeat, seconds (0: off)", at_least=0
    )
    publish_retries: int = setting(
        "INFER_PUBLISH_RETRIES", 10, "publish retries while the broker is away", at_least=0
    )
    publish_confirm_timeout_s: float = setting(
        "INFER_PUBLISH_CONFIRM_TIMEOUT_S",
        5.0,
        "longest wait for the broker's confirm of one publish before it is retried, s",
    )
    max_queue_length: int = setting(
        "INFER_MAX_QUEUE_LENGTH",
        100_000,
        "class queue bound (x-max-length): a publish past it raises Overloaded (0: none)",
        at_least=0,
    )
    admission: bool = setting(
        "INFER_ADMISSION",
        True,
        "refuse a request with a deadline (Overloaded) when its expected wait exceeds it",
    )
    admission_margin: float = setting(
        "INFER_ADMISSION_MARGIN",
        0.5,
        "safety margin of admission control: refused when wait x (1 + margin) > time left",
    )
    service_rate_window_s: float = setting(
        "INFER_SERVICE_RATE_WINDOW_S",
        10.0,
        "sliding window of a worker's measured service rate (advertised in its heartbeat), s",
    )
    exporter_port: int = setting(
        "INFER_EXPORTER_PORT", 9809, "the queue exporter's Prometheus /metrics port", at_least=0
    )
    exporter_addr: str = setting(
        "INFER_EXPORTER_ADDR", "127.0.0.1", "address the queue exporter listens on"
    )
    exporter_interval_s: float = setting(
        "INFER_EXPORTER_INTERVAL_S", 2.0, "how often the queue exporter reads the queues, s"
    )
    backend_retries: int = setting(
        "INFER_BACKEND_RETRIES", 30, "result-backend retries before a task fails", at_least=0
    )
    backend_reconnect_s: float = setting(
        "INFER_BACKEND_RECONNECT_S", 5.0, "how long a result-backend Redis command reconnects, s"
    )
    deduplicate: bool = setting(
        "INFER_DEDUPLICATE", True, "skip a task whose SUCCESS is already stored"
    )
    fault_injection: bool = setting(
        "INFER_FAULT_INJECTION", False, "enable tasks.diag.crash (the fault suite's poison task)"
    )
    broker_tls_ca: Path | None = setting(
        "INFER_BROKER_TLS_CA", None, "CA bundle for the broker (amqps:// only)", shown="system CAs"
    )
    broker_tls_cert: Path | None = setting(
        "INFER_BROKER_TLS_CERT", None, "client certificate for amqps:// (with the key)"
    )
    broker_tls_key: Path | None = setting(
        "INFER_BROKER_TLS_KEY", None, "client key for amqps:// (with the certificate)"
    )
    signing_dir: Path | None = setting(
        "INFER_SIGNING_DIR", None, "sign messages: key, cert, trusted/ folder", shown="off"
    )

    def __post_init__(self) -> None:
        for f, spec, kind in declared():
            value = getattr(self, f.name)
            if kind is int and value < spec.at_least:
                raise ConfigurationError(f"{spec.env}={value} must be at least {spec.at_least}")
            if kind is float and value <= 0:
                raise ConfigurationError(f"{spec.env}={value} must be positive")
        if self.batch_deadline_share > 1:
            raise ConfigurationError(
                f"INFER_BATCH_DEADLINE_SHARE={self.batch_deadline_share} must be at most 1: it is "
                "the share of a request's deadline budget its batch's service time may take"
            )
        if self.serializer not in SERIALIZERS:
            raise ConfigurationError(
                f"INFER_SERIALIZER={self.serializer!r}: use one of {', '.join(SERIALIZERS)}; "
                "pickle is refused because it executes code from the wire"
            )
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ConfigurationError(
                f"INFER_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit}s) must be below "
                f"INFER_TASK_TIME_LIMIT ({self.task_time_limit}s)"
            )
        if self.task_time_limit >= self.rabbitmq_consumer_timeout:
            raise ConfigurationError(
                f"INFER_TASK_TIME_LIMIT ({self.task_time_limit}s) must be below RabbitMQ's "
                f"consumer_timeout ({self.rabbitmq_consumer_timeout}s), or the broker closes the "
                "channel of a worker still running a task: lower the limit or raise consumer_timeout"
            )
        if self.blob_url and not self.blob_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                f"INFER_BLOB_URL={maybe_sanitize_url(self.blob_url)} is not a Redis URL: use "
                "redis://host:6379/0, rediss://... or unix:///path/to/redis.sock"
            )
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"INFER_QUEUE_TYPE={self.queue_type!r}: use quorum (delivery limit, replicated) "
                "or classic (RabbitMQ < 3.10, no delivery limit)"
            )
        self._check_broker_urls()
        self._check_tls()
        self._check_signing()
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ConfigurationError(f"INFER_DTYPES has {dtype!r}: use fp32, fp16 and/or bf16")
        if self.weights_dir is None:
            object.__setattr__(self, "weights_dir", self.home / "weights")

    def _check_broker_urls(self) -> None:
        urls = self.broker_urls
        if len(urls) < 2:
            return
        schemes = {url.split("://", 1)[0] for url in urls}
        if any("://" not in url for url in urls) or not schemes <= {"amqp", "pyamqp", "amqps"}:
            raise ConfigurationError(
                f"CELERY_BROKER_URL lists {len(urls)} brokers, not all amqp:// URLs: a list is "
                "for the nodes of one RabbitMQ cluster, amqp://user:pw@node1:5672/vhost;"
                "amqp://user:pw@node2:5672/vhost;..."
            )
        if "amqps" in schemes:
            # kombu's pyamqp transport writes the first node's name into the shared ssl
            # options on connect, so after a failover the next node's certificate is checked
            # against the first node's name and the connection fails.
            raise ConfigurationError(
                "CELERY_BROKER_URL lists several amqps:// nodes: kombu checks every node's "
                "certificate against the first node's name, so failover would fail; give one "
                "amqps:// URL of a TCP load balancer in front of the cluster, or amqp:// inside "
                "a private network"
            )
        if len(set(urls)) != len(urls):
            raise ConfigurationError(
                "CELERY_BROKER_URL lists the same broker twice: list each node once"
            )

    def _check_tls(self) -> None:
        for key, path in (
            ("INFER_BROKER_TLS_CA", self.broker_tls_ca),
            ("INFER_BROKER_TLS_CERT", self.broker_tls_cert),
            ("INFER_BROKER_TLS_KEY", self.broker_tls_key),
        ):
            if path is not None and not path.is_file():
                raise ConfigurationError(f"{key}={path}: no such file")
        if (self.broker_tls_cert is None) != (self.broker_tls_key is None):
            raise ConfigurationError(
                "INFER_BROKER_TLS_CERT and INFER_BROKER_TLS_KEY go together: set both or neither"
            )
        tls_given = self.broker_tls_ca or self.broker_tls_cert
        if tls_given and not (self.broker_url or "").startswith("amqps://"):
            raise ConfigurationError(
                "INFER_BROKER_TLS_* is set but CELERY_BROKER_URL is not amqps://: "
                "use amqps://user:password@host:5671/vhost"
            )
        backend = self.result_backend or ""
        if backend.startswith("rediss://") and "ssl_cert_reqs=" not in backend:
            raise ConfigurationError(
                "CELERY_RESULT_BACKEND uses rediss:// without ssl_cert_reqs: append "
                "?ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.pem (Celery and the "
                "worker registry both read TLS options from the URL)"
            )

    def _check_signing(self) -> None:
        if self.signing_dir is None:
            return
        from tasks.wire.signing import missing_files  # no crypto import: file checks only

        missing = missing_files(self.signing_dir)
        if missing:
            raise ConfigurationError(
                f"INFER_SIGNING_DIR={self.signing_dir} lacks {', '.join(missing)}: create a key, "
                f"certificate and trusted/ store with `python -m tasks.wire.signing init "
                f"{self.signing_dir}`, then copy every other host's signer.pem into trusted/"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``); unset or empty: the default."""
        env = os.environ if env is None else env
        given: dict[str, Any] = {}
        for f, spec, kind in declared():
            raw = env.get(spec.env)
            if raw:
                read, what = _READERS[kind]
                try:
                    given[f.name] = read(raw)
                except ValueError as e:
                    raise ConfigurationError(f"{spec.env}={raw!r} is not {what}") from e
        return cls(**given)

    @property
    def embedded(self) -> bool:
        """True when no broker is configured and the filesystem transport is used."""
        return self.broker_url is None

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_urls(self) -> list[str]:
        """Each broker of ``CELERY_BROKER_URL``: one, or a cluster's nodes (kombu's ``;`` list)."""
        return [url.strip() for url in self.broker.split(";") if url.strip()]

    @property
    def backend(self) -> str:
        return self.result_backend or f"file://{self.home / 'results'}"

    @property
    def binary_tensors(self) -> bool:
        """msgpack carries raw bytes; json needs base64."""
        return self.serializer == "msgpack"

    def describe(self) -> str:
        """One line saying which broker and backend are in use, for start-up banners."""
        if self.embedded:
            where = f"embedded broker (kombu filesystem transport) under {self.home / 'broker'}"
        else:
            where = "broker " + ";".join(maybe_sanitize_url(url) for url in self.broker_urls)
        return (
            f"{where}; results in {maybe_sanitize_url(self.backend)}; serializer {self.serializer}"
        )

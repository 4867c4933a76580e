"""One typed settings object, read once from the environment and passed around.

Standard Celery variables keep their names (``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND``); everything of our own uses the ``INFER_`` prefix.
With no broker configured the deployment runs on an embedded broker: kombu's
filesystem transport plus Celery's file result backend under ``INFER_HOME``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from models.errors import ConfigurationError
from models.registry import get_spec
from routing.queues import QUEUE_TYPES

__all__ = ["SERIALIZERS", "Settings"]

SERIALIZERS = ("msgpack", "json")  # pickle is never accepted, on purpose
T = TypeVar("T")


def _parse(
    env: Mapping[str, str], key: str, default: T, convert: Callable[[str], T], what: str
) -> T:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as e:
        raise ConfigurationError(f"{key}={raw!r} is not {what}") from e


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    value = _parse(env, key, default, int, "an integer")
    if value < minimum:
        raise ConfigurationError(f"{key}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    value = _parse(env, key, default, float, "a number")
    if value <= 0:
        raise ConfigurationError(f"{key}={value} must be positive")
    return value


def _to_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _path(env: Mapping[str, str], key: str) -> Path | None:
    raw = env.get(key)
    return Path(raw).resolve() if raw else None


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    return _parse(env, key, default, _to_bool, "a boolean: use true or false")


@dataclass(frozen=True)
class Settings:
    """Every knob of the deployment, typed, with its default.

    ================================  =========================================  ==============
    environment variable              meaning                                    default
    ================================  =========================================  ==============
    CELERY_BROKER_URL                 amqp://... (RabbitMQ); unset = embedded    embedded
    CELERY_RESULT_BACKEND             redis://...; unset = embedded file store   embedded
    INFER_HOME                        local state: embedded broker, results      ./var
    INFER_WEIGHTS_DIR                 safetensors weights folder                 $INFER_HOME/weights
    INFER_SERIALIZER                  msgpack or json (never pickle)             msgpack
    INFER_MAX_PAYLOAD_BYTES           largest accepted input tensor              8388608
    INFER_DEVICE                      cpu, cuda:N or auto                        auto
    INFER_PRELOAD                     comma-separated models loaded at start     (none)
    INFER_CACHE_BUDGET_MB             model cache budget per worker              1024
    INFER_TORCH_THREADS               torch intra-op threads per worker process  1
    INFER_PREFETCH_MULTIPLIER         messages reserved per pool slot            1
    INFER_TASK_TIME_LIMIT             hard limit per task, seconds               300
    INFER_TASK_SOFT_TIME_LIMIT        soft limit per task, seconds               280
    INFER_RABBITMQ_CONSUMER_TIMEOUT   the broker's consumer_timeout, seconds     1800
    INFER_RESULT_EXPIRES              results kept in the backend, seconds       3600
    INFER_WORKER_INIT_TIMEOUT         time allowed for a pool child to preload   120
    INFER_EMBEDDED_POLL_INTERVAL      embedded broker polling period, seconds    0.02
    INFER_TASK_EVENTS                 workers send task events from the start    false
    INFER_SENT_EVENTS                 clients send task-sent events              false
    INFER_TRACK_STARTED               record a STARTED state per task            false
    INFER_RESULT_EXTENDED             store task name/args/worker with results   false
    INFER_ROUTING                     capability router for tasks.infer          true
    INFER_HEARTBEAT_S                 capability heartbeat period, seconds       2.0
    INFER_DIRECT_QUEUE_TTL_MS         wait in a direct queue before fallback     4000
    INFER_MAX_IN_FLIGHT               load at which a sticky worker is skipped   4
    INFER_STICKY_TTL_S                sticky key lifetime, seconds               300
    INFER_STICKY_SIZE                 sticky keys kept per client                4096
    INFER_MEMORY_MB                   advertised device memory (0: measure)      0
    INFER_DTYPES                      advertised precisions (empty: device's)    (device)
    INFER_REGISTRY_NAMESPACE          workers and clients that see each other    default
    INFER_METRICS_PORT                worker's Prometheus /metrics port (0: off) 9808
    INFER_METRICS_ADDR                address the metrics server listens on      127.0.0.1
    INFER_BATCHING                    dynamic batching in this worker            false
    INFER_MAX_BATCH_SIZE              default largest dynamic batch              32
    INFER_MAX_WAIT_MS                 default longest wait for a batch to fill   5.0
    INFER_QUEUE_TYPE                  quorum or classic task queues (RabbitMQ)   quorum
    INFER_DELIVERY_LIMIT              deliveries before a message dead-letters   5
    INFER_BROKER_HEARTBEAT            AMQP heartbeat, seconds (0: off)           20
    INFER_PUBLISH_RETRIES             publish retries while the broker is away   10
    INFER_BACKEND_RETRIES             result-backend retries before failing      30
    INFER_BACKEND_RECONNECT_S         each Redis command reconnects this long    5
    INFER_DEDUPLICATE                 skip tasks whose SUCCESS is already stored  true
    INFER_FAULT_INJECTION             enable tasks.diag.crash (fault tests only) false
    INFER_BROKER_TLS_CA               CA bundle for amqps:// (empty: system CAs)  (none)
    INFER_BROKER_TLS_CERT / _KEY      client certificate and key for amqps://    (none)
    INFER_SIGNING_DIR                 sign messages: key, cert, trusted/ folder  (off)
    ================================  =========================================  ==============
    """

    broker_url: str | None = None
    result_backend: str | None = None
    home: Path = field(default_factory=lambda: Path("var").resolve())
    weights_dir: Path | None = None
    serializer: str = "msgpack"
    max_payload_bytes: int = 8 * 1024 * 1024
    device: str = "auto"
    preload: tuple[str, ...] = ()
    cache_budget_mb: int = 1024
    # One intra-op thread by default: idle OpenMP threads spin after each
    # forward pass and steal the core the worker needs to take the next
    # message (measured: infer p50 6.5 ms -> 4.2 ms on 2 cores).  Raise it for
    # a lone CPU worker running large batches.
    torch_threads: int = 1
    prefetch_multiplier: int = 1
    task_time_limit: int = 300
    task_soft_time_limit: int = 280
    rabbitmq_consumer_timeout: int = 1800
    result_expires: int = 3600
    worker_init_timeout: float = 120.0
    embedded_poll_interval: float = 0.02
    # Off until someone watches: Flower switches events on in every worker at
    # start (its enable_events option), and `celery -A tasks control
    # enable_events` does too.  Events cost ~15% of a no-op round trip.
    task_events: bool = False
    sent_events: bool = False
    track_started: bool = False
    result_extended: bool = False
    routing: bool = True
    heartbeat_s: float = 2.0
    direct_queue_ttl_ms: int = 4000
    max_in_flight: int = 4
    sticky_ttl_s: float = 300.0
    sticky_size: int = 4096
    memory_mb: int = 0
    dtypes: tuple[str, ...] = ()
    registry_namespace: str = "default"
    metrics_port: int = 9808
    metrics_addr: str = "127.0.0.1"
    batching: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_type: str = "quorum"
    delivery_limit: int = 5
    broker_heartbeat: int = 20
    publish_retries: int = 10
    backend_retries: int = 30
    backend_reconnect_s: float = 5.0
    deduplicate: bool = True
    fault_injection: bool = False
    broker_tls_ca: Path | None = None
    broker_tls_cert: Path | None = None
    broker_tls_key: Path | None = None
    signing_dir: Path | None = None

    def __post_init__(self) -> None:
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
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"INFER_QUEUE_TYPE={self.queue_type!r}: use quorum (delivery limit, replicated) "
                "or classic (RabbitMQ < 3.10, no delivery limit)"
            )
        self._check_tls()
        self._check_signing()
        for name in self.preload:
            get_spec(name)  # UnknownModel names the valid choices
        for dtype in self.dtypes:
            if dtype not in ("fp32", "fp16", "bf16"):
                raise ConfigurationError(f"INFER_DTYPES has {dtype!r}: use fp32, fp16 and/or bf16")
        if self.weights_dir is None:
            object.__setattr__(self, "weights_dir", self.home / "weights")

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
        """Build settings from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        home = Path(env.get("INFER_HOME") or "var").resolve()
        weights = env.get("INFER_WEIGHTS_DIR")
        return cls(
            broker_url=env.get("CELERY_BROKER_URL") or None,
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            home=home,
            weights_dir=Path(weights).resolve() if weights else None,
            serializer=env.get("INFER_SERIALIZER", "msgpack"),
            max_payload_bytes=_int(env, "INFER_MAX_PAYLOAD_BYTES", cls.max_payload_bytes),
            device=env.get("INFER_DEVICE", "auto"),
            preload=tuple(n.strip() for n in env.get("INFER_PRELOAD", "").split(",") if n.strip()),
            cache_budget_mb=_int(env, "INFER_CACHE_BUDGET_MB", cls.cache_budget_mb),
            torch_threads=_int(env, "INFER_TORCH_THREADS", cls.torch_threads),
            prefetch_multiplier=_int(env, "INFER_PREFETCH_MULTIPLIER", cls.prefetch_multiplier),
            task_time_limit=_int(env, "INFER_TASK_TIME_LIMIT", cls.task_time_limit),
            task_soft_time_limit=_int(env, "INFER_TASK_SOFT_TIME_LIMIT", cls.task_soft_time_limit),
            rabbitmq_consumer_timeout=_int(
                env, "INFER_RABBITMQ_CONSUMER_TIMEOUT", cls.rabbitmq_consumer_timeout
            ),
            result_expires=_int(env, "INFER_RESULT_EXPIRES", cls.result_expires),
            worker_init_timeout=_float(env, "INFER_WORKER_INIT_TIMEOUT", cls.worker_init_timeout),
            embedded_poll_interval=_float(
                env, "INFER_EMBEDDED_POLL_INTERVAL", cls.embedded_poll_interval
            ),
            task_events=_bool(env, "INFER_TASK_EVENTS", cls.task_events),
            sent_events=_bool(env, "INFER_SENT_EVENTS", cls.sent_events),
            track_started=_bool(env, "INFER_TRACK_STARTED", cls.track_started),
            result_extended=_bool(env, "INFER_RESULT_EXTENDED", cls.result_extended),
            routing=_bool(env, "INFER_ROUTING", cls.routing),
            heartbeat_s=_float(env, "INFER_HEARTBEAT_S", cls.heartbeat_s),
            direct_queue_ttl_ms=_int(env, "INFER_DIRECT_QUEUE_TTL_MS", cls.direct_queue_ttl_ms),
            max_in_flight=_int(env, "INFER_MAX_IN_FLIGHT", cls.max_in_flight),
            sticky_ttl_s=_float(env, "INFER_STICKY_TTL_S", cls.sticky_ttl_s),
            sticky_size=_int(env, "INFER_STICKY_SIZE", cls.sticky_size),
            memory_mb=_int(env, "INFER_MEMORY_MB", cls.memory_mb, minimum=0),
            dtypes=tuple(d.strip() for d in env.get("INFER_DTYPES", "").split(",") if d.strip()),
            registry_namespace=env.get("INFER_REGISTRY_NAMESPACE") or cls.registry_namespace,
            metrics_port=_int(env, "INFER_METRICS_PORT", cls.metrics_port, minimum=0),
            metrics_addr=env.get("INFER_METRICS_ADDR") or cls.metrics_addr,
            batching=_bool(env, "INFER_BATCHING", cls.batching),
            max_batch_size=_int(env, "INFER_MAX_BATCH_SIZE", cls.max_batch_size),
            max_wait_ms=_float(env, "INFER_MAX_WAIT_MS", cls.max_wait_ms),
            queue_type=env.get("INFER_QUEUE_TYPE") or cls.queue_type,
            delivery_limit=_int(env, "INFER_DELIVERY_LIMIT", cls.delivery_limit),
            broker_heartbeat=_int(env, "INFER_BROKER_HEARTBEAT", cls.broker_heartbeat, minimum=0),
            publish_retries=_int(env, "INFER_PUBLISH_RETRIES", cls.publish_retries, minimum=0),
            backend_retries=_int(env, "INFER_BACKEND_RETRIES", cls.backend_retries, minimum=0),
            backend_reconnect_s=_float(env, "INFER_BACKEND_RECONNECT_S", cls.backend_reconnect_s),
            deduplicate=_bool(env, "INFER_DEDUPLICATE", cls.deduplicate),
            fault_injection=_bool(env, "INFER_FAULT_INJECTION", cls.fault_injection),
            broker_tls_ca=_path(env, "INFER_BROKER_TLS_CA"),
            broker_tls_cert=_path(env, "INFER_BROKER_TLS_CERT"),
            broker_tls_key=_path(env, "INFER_BROKER_TLS_KEY"),
            signing_dir=_path(env, "INFER_SIGNING_DIR"),
        )

    @property
    def embedded(self) -> bool:
        """True when no broker is configured and the filesystem transport is used."""
        return self.broker_url is None

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

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
            where = f"broker {_redact(self.broker)}"
        return f"{where}; results in {_redact(self.backend)}; serializer {self.serializer}"


def _redact(url: str) -> str:
    """Hide the password in ``scheme://user:password@host`` URLs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"

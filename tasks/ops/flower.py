"""``python -m tasks.ops.flower``: Flower for this deployment, never without a password.

Flower itself starts with no authentication when ``FLOWER_BASIC_AUTH`` is
unset.  This launcher refuses to: it checks ``FLOWER_BASIC_AUTH`` (one or
more ``user:password`` pairs, comma-separated) and then runs the stock
``celery -A tasks flower``, which reads the credentials from that variable
itself, so the password never shows on a command line.  It listens on
127.0.0.1 unless told otherwise (compose passes ``--address 0.0.0.0`` inside
its network and publishes the port on the host's loopback only).

Flower's ``/metrics`` (Prometheus) and ``/healthcheck`` stay open, as Flower
serves them, for scrapers and health checks; the dashboard and ``/api`` need
the password.

Flower runs in this process (celery's own command line, called here, not
exec'd) so that :func:`tasks.ops.flower_api.install` can put its task API
handlers in Flower's URL table first: a refused call answers 4xx with its
typed error, a result shows as JSON with tensors summarised.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from models.errors import ConfigurationError

__all__ = ["check_basic_auth", "flower_argv", "main"]

# Placeholders that ship in .env.example: refused, so the example is never deployed as is.
PLACEHOLDERS = frozenset({"change-me", "changeme", "password", "admin", "flower"})
MIN_PASSWORD = 8


def check_basic_auth(env: Mapping[str, str]) -> list[str]:
    """The users of ``FLOWER_BASIC_AUTH``; :class:`ConfigurationError` if unset or weak."""
    raw = env.get("FLOWER_BASIC_AUTH", "").strip()
    if not raw:
        raise ConfigurationError(
            "FLOWER_BASIC_AUTH is not set: Flower would start without a password. "
            "Set FLOWER_BASIC_AUTH=user:password (several pairs: comma-separated)"
        )
    users = []
    for pair in raw.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ConfigurationError(
                f"FLOWER_BASIC_AUTH entry {user or pair!r} is not user:password"
            )
        if password.lower() in PLACEHOLDERS or len(password) < MIN_PASSWORD:
            raise ConfigurationError(
                f"FLOWER_BASIC_AUTH password of {user!r} is a placeholder or shorter than "
                f"{MIN_PASSWORD} characters: choose a real secret"
            )
        users.append(user)
    return users


def flower_argv(address: str = "127.0.0.1", port: int = 5555) -> list[str]:
    """The ``celery flower`` command line this launcher runs (compose uses the same)."""
    return ["celery", "-A", "tasks", "flower", f"--address={address}", f"--port={port}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ops.flower", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=5555, help="port (5555)")
    args = parser.parse_args(argv)
    try:
        users = check_basic_auth(os.environ)
        from tasks.ops import flower_api  # Flower and tornado: imported only to run Flower

        flower_api.install()
    except ConfigurationError as e:
        print(f"flower: {e}", file=sys.stderr)
        return 2
    cmd = flower_argv(args.address, args.port)
    print(
        f"Flower on http://{args.address}:{args.port}/ for {', '.join(users)}: {' '.join(cmd)}",
        flush=True,
    )
    # celery's command line in this process (this interpreter, so a virtualenv need not be
    # on PATH), with the handlers installed above; it exits with Flower's status.
    from celery.bin.celery import celery

    celery.main(args=cmd[1:], prog_name="celery", auto_envvar_prefix="CELERY")
    return 1  # pragma: no cover - click's main exits


if __name__ == "__main__":
    sys.exit(main())

"""``celery -A tasks route``: why a request would go where it goes.

Registered as a Celery CLI plugin (entry point group ``celery.commands`` in
pyproject.toml), so it runs like any ``celery`` subcommand, with the app's
settings: it reads the live registry (heartbeats) and prints the router's
decision ladder for the request described on the command line, without
publishing anything::

    celery -A tasks route --model cnn --dtype fp16
    celery -A tasks route --model transformer --device cuda --min-free-memory-mb 8000
"""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryCommand

from models.errors import InferenceError

__all__ = ["route"]


@click.command(cls=CeleryCommand)
@click.option("--model", required=True, help="model name, e.g. cnn")
@click.option("--dtype", default=None, help="fp32, fp16, bf16 or auto")
@click.option("--device", default="any", help="any, cpu or cuda")
@click.option("--min-free-memory-mb", type=int, default=0, help="headroom asked for")
@click.option("--min-compute-capability", default=None, help="e.g. 8.0")
@click.option("--wait", type=float, default=None, help="seconds to collect heartbeats first")
@click.pass_context
def route(ctx: Any, model: str, dtype: str | None, wait: float | None, **requires: Any) -> None:
    """Print the capability router's decision ladder for one request."""
    from tasks.client.routes import call_requirements

    app = ctx.obj.app
    try:
        base = call_requirements(model, dtype)
        overrides = {k: v for k, v in requires.items() if v not in (None, 0, "any")}
        req = base.merged(overrides) if overrides else base
    except InferenceError as e:
        raise click.UsageError(str(e)) from e
    router = app.router
    router.registry.refresh()
    if wait:
        import time

        time.sleep(wait)
        router.registry.refresh()
    for line in router.explain(req):
        click.echo(line)

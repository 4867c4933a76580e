"""docs/settings.md, generated from the declarations in :mod:`tasks.settings`.

    python -m tasks.ops.settings_doc > docs/settings.md

``tests/unit/test_settings_doc.py`` fails when the committed page drifts.
"""

from __future__ import annotations

from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

from tasks.settings import Spec, declared

__all__ = ["REGENERATE", "settings_markdown"]

REGENERATE = "python -m tasks.ops.settings_doc > docs/settings.md"

_NAV = (
    "[README](../README.md) · [errors](errors.md) · [routing](routing.md) · [batching](batching.md) · "
    "[guarantees](guarantees.md) · [operations](operations.md) · [benchmarks](benchmarks.md)"
)

_INTRO = f"""\
Every environment variable the deployment reads, with its type, default,
bounds and meaning. This page is generated from the declarations in
[`tasks/settings.py`](../tasks/settings.py) (each a field of `Settings`); do not
edit it by hand: change the declaration, then regenerate it with

```sh
{REGENERATE}
```

Unset and empty variables take the default. Booleans take `1`, `true`, `yes`,
`on` or `0`, `false`, `no`, `off`; lists are comma-separated; paths are resolved
against the current directory. A value that cannot be read, or is out of
bounds, stops the process at start-up with a message naming the variable.
"""

_TYPES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    tuple: "list",
}


def _default(f: Field[Any], spec: Spec) -> str:
    if spec.shown is not None:
        return spec.shown
    value = f.default
    if value is MISSING or value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _bounds(spec: Spec, kind: type) -> str:
    if spec.choices:
        return ", ".join(f"`{c}`" for c in spec.choices)
    if kind is int:
        return f"≥ {spec.at_least}"
    if kind is float:
        return "> 0"
    return ""


def settings_markdown() -> str:
    """The whole page: title, navigation, intro, and one table row per setting."""
    rows = [
        "| variable | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f, spec, kind in declared():
        cells = (f"`{spec.env}`", _TYPES[kind], _default(f, spec), _bounds(spec, kind), spec.help)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(["# Settings", "", _NAV, "", _INTRO, *rows, ""])


if __name__ == "__main__":
    print(settings_markdown(), end="")

"""docs/settings.md is generated from the declarations in tasks/settings.py, and complete."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.ops.settings_doc import REGENERATE, settings_markdown
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "settings.md"


def documented() -> list[str]:
    """The variables in the page's table, in order."""
    return re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", PAGE.read_text(), flags=re.MULTILINE)


class Recording(Mapping[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.asked.append(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_page_is_generated_from_the_declarations() -> None:
    assert PAGE.read_text() == settings_markdown(), (
        f"docs/settings.md is out of date with tasks/settings.py: regenerate it with `{REGENERATE}`"
    )


def test_every_variable_read_is_documented_once() -> None:
    env = Recording()
    Settings.from_env(env)
    rows = documented()
    assert len(rows) == len(set(rows)), "a variable is documented twice"
    assert env.asked == rows, (
        f"Settings.from_env reads {sorted(set(env.asked) - set(rows))} undocumented and the page "
        f"lists {sorted(set(rows) - set(env.asked))} that nothing reads: `{REGENERATE}`"
    )


def test_every_variable_compose_sets_is_documented() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    rows = set(documented())
    for name, service in compose["services"].items():
        for key in service.get("environment") or {}:
            if key.startswith(("INFER_", "CELERY_")):
                assert key in rows, f"compose service {name} sets {key}, which no setting reads"

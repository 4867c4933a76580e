"""docs/beyond-one-machine.md's ledger table is the rendering of the committed multihost run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.multihost.table import SCENARIOS, render

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "beyond-one-machine.md"
BLOCK = re.compile(r"<!-- multihost:begin (\S+) -->\n(.*?)<!-- multihost:end -->", re.S)


def test_the_docs_table_is_rendered_from_the_committed_run() -> None:
    match = BLOCK.search(PAGE.read_text())
    assert match, "docs/beyond-one-machine.md has no multihost:begin <results file> block"
    results = json.loads((ROOT / match.group(1)).read_text())
    assert match.group(2) == render(results), (
        f"regenerate it: python -m tests.multihost.table {match.group(1)}"
    )


def test_the_committed_run_is_a_full_run_of_every_scenario_with_nothing_lost() -> None:
    results = json.loads((ROOT / BLOCK.search(PAGE.read_text()).group(1)).read_text())  # type: ignore[union-attr]
    assert results["scale"] == "full"
    assert set(results["scenarios"]) == set(SCENARIOS)
    for name, record in results["scenarios"].items():
        ledger = record["ledger"]
        assert ledger["lost"] == 0, name
        assert ledger["succeeded"] + ledger["unpublished"] == ledger["submitted"], name

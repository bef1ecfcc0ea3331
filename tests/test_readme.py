"""The README's promises: its curl example works, and it lists exactly the allowed functions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from app.engine.expressions import ALLOWED_FUNCTIONS
from tests.conftest import ROOT, LiveServer

README = (ROOT / "README.md").read_text()


def _block(lang: str, after: str) -> str:
    start = README.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", README[start:], re.S)
    assert match, f"no ```{lang} block after {after!r}"
    return match.group(1)


def test_readme_quickstart_is_exactly_make_run_and_make_test() -> None:
    assert _block("sh", "## Quickstart").split() == ["make", "run", "make", "test"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_readme_curl_example_answers_as_shown(live_server: LiveServer) -> None:
    command = _block("sh", "Ask for a JVP").replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=30, check=True
    )
    got = json.loads(result.stdout)
    shown = json.loads(_block("json", "Ask for a JVP"))
    got.pop("timing_ms")
    shown.pop("timing_ms")
    assert got == shown


def test_readme_lists_exactly_the_allowed_functions() -> None:
    table = README[README.index("<!-- functions:") : README.index("Everything else is a 400")]
    first_cells = re.findall(r"^\| (.*?) \|", table, re.M)
    listed = {name for cell in first_cells for name in re.findall(r"`([a-z0-9_]+)\(", cell)}
    assert listed == set(ALLOWED_FUNCTIONS)


def test_readme_accuracy_table_rows_are_the_surveyed_functions_all_within_1e_12() -> None:
    from bench.accuracy_survey import BINARY, UNARY

    section = README.split("<!-- accuracy:", 1)[1]
    rows = [line for line in section.splitlines()[1:40] if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    binary = [f"{source} (d/d{arg})" for source, *_ in BINARY.values() for arg in "ab"]
    assert names == [*UNARY, *binary]
    for row in rows:
        cells = [c.strip() for c in row.strip()[1:-1].split("|")][2:]
        assert all(float(c) <= 1e-12 for c in cells), row

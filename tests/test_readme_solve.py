"""The README's POST /solve examples (the worked Bratu solve against SciPy, the
least-squares fit) run as written against a live service."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, LiveServer

README = (ROOT / "README.md").read_text()
SECTION = README[README.index("<!-- solve-examples") : README.index("<!-- /solve-examples -->")]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)


def test_readme_solve_section_has_the_examples() -> None:
    assert len(BLOCKS) == 2
    assert "newton_krylov" in BLOCKS[0] and "least_squares" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_solve_example_runs(live_server: LiveServer, index: int) -> None:
    code = BLOCKS[index].replace("http://127.0.0.1:8000", live_server.url)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "JVPs" in result.stdout

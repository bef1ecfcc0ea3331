"""The README's reverse-mode and binding examples run as written against a live service."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, LiveServer

README = (ROOT / "README.md").read_text()
SECTION = README[README.index("<!-- vjp-examples") : README.index("<!-- /vjp-examples -->")]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)


def test_readme_vjp_section_has_the_examples() -> None:
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_vjp_example_runs(live_server: LiveServer, index: int) -> None:
    code = BLOCKS[index]
    for module in ("scipy", "jax"):
        if f"import {module}" in code or f"from {module}" in code:
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{module} is not installed (jvp-client[{module}])")
    code = code.replace("http://127.0.0.1:8000", live_server.url)
    # A process of its own: forward AD on the client side must not share the test's.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]

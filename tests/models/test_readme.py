"""The README's "Serving your model" lines, run as written (the shell lines that call the
served model are run by tests/test_readme_blocks.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from torch.func import jvp

from tests.conftest import ROOT, make_client
from tests.models.conftest import ADMIN
from tests.wire import from_wire


def _five_lines() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- serving:", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_export_six_lines_then_load_and_call(tmp_path: Path) -> None:
    code = _five_lines()
    assert len(code.strip().splitlines()) == 6
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)

    client: TestClient
    with make_client(model_dir=tmp_path / "models", admin_keys=["secret"]) as client:
        r = client.post(
            "/models/regressor/load", headers=ADMIN | {"Authorization": "Bearer secret"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["inputs"] == [{"name": "input", "shape": [-1, 3], "dtype": "float32"}]
        r = client.post(
            "/jvp",
            json={
                "model": "regressor",
                "primals": {"input": [[1, 2, 3]]},
                "tangents": {"input": [[1, 0, 0]]},
            },
        )
        assert r.status_code == 200, r.text
    program = torch.export.load(tmp_path / "models" / "regressor" / "model.pt2").module()
    out, want = jvp(program, (torch.tensor([[1.0, 2.0, 3.0]]),), (torch.tensor([[1.0, 0, 0]]),))
    torch.testing.assert_close(from_wire(r.json()["output"]), out)
    torch.testing.assert_close(from_wire(r.json()["jvp"]), want)

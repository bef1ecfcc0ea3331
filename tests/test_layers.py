"""The layers of app/ hold (NOTE [layers] in pyproject.toml): `lint-imports` passes on the
code as it is, and fails, naming the arrow, on a copy given one import the wrong way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the package `app` under ``root`` with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_app(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return tmp_path


@pytest.fixture(scope="module", autouse=True)
def _needs_lint_imports() -> None:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"lint-imports is not installed beside {sys.executable} (make install-dev)")


def test_the_code_keeps_every_layer_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("engine/wrong.py", "import app.api.errors", "app layers"),
        ("jobs/wrong.py", "import app.api.auth", "app layers"),
        ("models/wrong.py", "import app.services.jvp", "app layers"),
        ("engine/wrong.py", "import pydantic", "the engine is torch only"),
        ("services/wrong.py", "import starlette.responses", "speak no HTTP"),
    ],
)
def test_an_import_the_wrong_way_fails_the_lint(
    tmp_path: Path, where: str, line: str, contract: str
) -> None:
    root = copy_of_app(tmp_path)
    (root / "app" / where).write_text(f"{line}  # the wrong way\n")
    result = lint_imports(root)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), result.stdout
    module = "app." + where.removesuffix(".py").replace("/", ".")
    assert module in result.stdout  # the report names the module at fault

"""The layers of app/ hold (NOTE [layers] in pyproject.toml): `lint-imports` passes on the
code as it is, and fails, naming the arrow, on a copy given one import the wrong way."""

from __future__ import annotations

import ast
import os
import re
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


# Small files and functions (STYLE, the "Done means"): no module of app/ over
# MAX_MODULE_LINES and no function over MAX_FUNCTION_LINES, unless it says why. A module
# says so in a NOTE of its own ("# NOTE [one module: ...]" at the start of a line); a
# function in its docstring or in the comment block right above it ("A long function on
# purpose: ..."), so the reason sits where the length does.
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MODULE_NOTE = re.compile(r"^# NOTE \[one module: [^\]]+\]", re.MULTILINE)
FUNCTION_NOTE = re.compile(r"\blong (?:function|method) on purpose\b", re.IGNORECASE)


def _comment_above(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    block: list[str] = []
    i = first - 2  # the line above the def (or its first decorator), 0-based
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i])
        i -= 1
    return "\n".join(reversed(block))


def size_offenders(root: Path) -> list[str]:
    """Each module and function under ``root`` past its limit without a NOTE, with its
    line count."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        where = path.relative_to(root.parent).as_posix()
        if len(lines) > MAX_MODULE_LINES and not MODULE_NOTE.search(text):
            found.append(f"{where}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            why = (ast.get_docstring(node) or "") + "\n" + _comment_above(lines, node)
            if not FUNCTION_NOTE.search(why):
                found.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_of_app_is_too_long_without_a_note() -> None:
    assert size_offenders(ROOT / "app") == []


def test_the_size_check_names_each_long_module_and_function(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (app / "long.py").write_text(
        f"def long_one():\n{body}\n\n\n"
        f"# A long function on purpose: kept whole.\ndef excused():\n{body}\n\n\n"
        f'def documented():\n    """A long function on purpose: one table."""\n{body}\n'
        f"\n\ndef short():\n    return 1\n" + "\n" * MAX_MODULE_LINES
    )
    (app / "noted.py").write_text("# NOTE [one module: a test]\n" + "\n" * MAX_MODULE_LINES)
    (app / "ok.py").write_text("\n" * MAX_MODULE_LINES)
    module_lines = len((app / "long.py").read_text().splitlines())
    assert module_lines > MAX_MODULE_LINES
    assert size_offenders(app) == [
        f"app/long.py: {module_lines} lines",
        f"app/long.py:1 long_one: {MAX_FUNCTION_LINES + 1} lines",
    ]

"""The client's layout (issue 16): no import cycle outside TYPE_CHECKING, small modules and
functions, and live tests that skip, with their reason, where the server cannot be imported."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jvp_client

PACKAGE = Path(jvp_client.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _runtime_imports(tree: ast.Module) -> set[str]:
    """The package's modules a module imports when it runs (TYPE_CHECKING blocks left out)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module)
                else:
                    found.update(alias.name for alias in node.names)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return found


def test_client_modules_import_without_cycles() -> None:
    graph = {name: _runtime_imports(tree) - {name} for name, tree in _modules().items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in jvp_client: {' -> '.join(exc.args[1])}")
    assert order.index("_base") < order.index("_bodies") < order.index("_client")


def test_client_modules_and_functions_are_small() -> None:
    """Modules of at most 450 lines; functions of at most 60 lines besides their docstring,
    or with a NOTE saying why."""
    too_long = []
    for path in sorted(PACKAGE.glob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                size -= _docstring_lines(node)  # documentation is not length
                body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if size > MAX_FUNCTION_LINES and "# NOTE" not in body:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {size} lines")
    assert not too_long, too_long


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            return (first.end_lineno or first.lineno) - first.lineno + 1
    return 0


def _pytest(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env=env,
        timeout=300,
        check=False,
    )


def test_live_tests_skip_with_reason_without_server(tmp_path: Path) -> None:
    # A plugin that makes `import app` fail, as in an environment with the client alone.
    (tmp_path / "no_server_here.py").write_text("import sys\nsys.modules['app'] = None\n")
    live = ["test_live.py", "test_derivatives_live.py", "test_eval_shape_live.py"]
    done = _pytest("-p", "no_server_here", *live, pythonpath=str(tmp_path))
    # 5: no test collected, as every module skipped; an import error would be 2 (or 1)
    assert done.returncode in (0, 5), done.stdout + done.stderr
    assert "3 skipped" in done.stdout and "error" not in done.stdout.lower()
    assert "the live tests need the server" in done.stdout


def test_live_tests_are_collected_with_server() -> None:
    done = _pytest("--collect-only", "test_live.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_jvp_expression_matches_torch_func_jvp_numpy" in done.stdout

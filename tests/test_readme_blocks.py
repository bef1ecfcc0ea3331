"""Every code block of README.md and clients/python/README.md, run as written against a live
server, in order, in one scratch folder, with `.venv/bin` first on PATH (as the README's
`source .venv/bin/activate` puts it). The only change made to a block is the port: the
server under test listens on a free port instead of 8000 (and the README's second server
on another free port instead of 8001).

A block either runs here, with the answers it prints checked (no JSON answer may be an
error envelope, and where the README shows numbers they are compared), or is listed in
`NOT_RUN` with the reason and the test that covers it instead. A new block that is neither
fails `test_every_block_is_run_or_accounted_for`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.cli import build_parser
from app.settings import Settings
from tests.conftest import ROOT, LiveServer, free_port

DOCS = (ROOT / "README.md", ROOT / "clients" / "python" / "README.md")
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str

    @property
    def first(self) -> str:
        return self.code.strip().splitlines()[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} ({self.first[:50]})"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path, line, match.group(1), match.group(2)))
    return found


def json_answers(stdout: str) -> list[object]:
    """The JSON documents a block printed, one after another (curl prints no newline)."""
    decoder, answers, at = json.JSONDecoder(), [], 0
    while True:
        start = min((i for i in (stdout.find("{", at), stdout.find("[", at)) if i >= 0), default=-1)
        if start < 0:
            return answers
        try:
            value, at = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        answers.append(value)


# --- what each block's answers must show (the numbers the README prints beside it) ---------


def _tangent_batch(answers: list[dict]) -> None:
    assert answers[0]["jvp"]["shape"] == [3, 2]
    assert answers[0]["jvp"]["data"] == [2, 0, 0, 4, 2, 4]


def _jacobian(answers: list[dict]) -> None:
    assert answers[0]["jacobian"]["x"]["shape"] == [1, 5, 1, 5]
    assert answers[0]["jacobian"]["bias"]["shape"] == [1, 5, 5]


def _hvp(answers: list[dict]) -> None:
    assert answers[0]["output"]["data"] == [9.0]
    assert answers[0]["hvp"]["x"] == {"shape": [2], "dtype": "float32", "data": [6.0, 0.0]}


def _linearize(answers: list[dict]) -> None:
    # J e_1 of nn.Linear(5, 5) is its weight's first column (the built-in: seed 0).
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weight = torch.nn.Linear(5, 5).weight.detach()
    assert answers[-1]["jvp"]["shape"] == [1, 5]
    got = torch.tensor(answers[-1]["jvp"]["data"])
    torch.testing.assert_close(got, weight[:, 0], rtol=1e-6, atol=1e-6)


def _eval_shape(answers: list[dict]) -> None:
    assert answers[0]["output"] == {"shape": [8, 64], "dtype": "float32"}
    assert answers[0]["jacobian"] == {"x": {"shape": [8, 64, 8, 64], "dtype": "float32"}}
    assert answers[0]["cost"]["flops"] > 0


def _serving(answers: list[dict]) -> None:
    assert answers[0]["name"] == "regressor"  # the load
    assert answers[1]["jvp"]["shape"] == [1, 1]


def _solve(answers: list[dict]) -> None:
    assert answers[0]["converged"] is True and answers[0]["residual_norm"] < 1e-8
    assert answers[0]["solution"]["u"]["dtype"] == "float64"
    for got, want in zip(answers[0]["solution"]["u"]["data"], [2.0, 3.0], strict=True):
        assert abs(got - want) < 1e-9


def _jobs(answers: list[dict]) -> None:
    assert answers[0]["total"] == 3


CHECKS: dict[str, Callable[[list[dict]], None]] = {
    "curl -s localhost:8000/jvp -H 'content-type: application/json' -d '{": _tangent_batch,
    "curl -s localhost:8000/jacobian": _jacobian,
    "curl -s localhost:8000/hvp": _hvp,
    "id=$(curl -s localhost:8000/linearize": _linearize,
    "curl -s localhost:8000/eval_shape": _eval_shape,
    "curl -s localhost:8000/solve": _solve,
    "# A second server (make run's holds port 8000)": _serving,
    "curl -s http://127.0.0.1:8000/jobs": _jobs,
}

PYTHON_CHECKS = {
    # The safetensors example: J v of sin(x) * x along ones is sin(x) + x cos(x).
    "import json, urllib.request, torch": (
        "assert torch.allclose(jvp, torch.sin(x) + x * torch.cos(x), atol=1e-5), jvp"
    ),
}


# --- blocks that do not run here, and what covers them instead --------------------------


def _quickstart(block: Block) -> None:
    assert block.code.split() == ["make", "run", "make", "test"]  # the premise of the rest


def _shown_answer(block: Block) -> None:
    json.loads(block.code)  # the quickstart's answer: compared by tests/test_readme.py


def _scale_out(block: Block) -> None:
    fields = {f"JVP_{name.upper()}" for name in Settings.model_fields}
    assert set(re.findall(r"\b(JVP_[A-Z_]+)=", block.code)) <= fields
    for line in block.code.splitlines():
        if line.startswith("jvp-service "):
            build_parser().parse_args(line.split("#")[0].split()[1:])


def _docker(block: Block) -> None:
    for line in block.code.splitlines():
        assert line.startswith(("docker build", "docker run", "docker compose")), line
        if line.startswith("docker run"):
            assert "-p 127.0.0.1:8000:8000" in line  # published on this host only


def _client_install(block: Block) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-e clients/python" in makefile  # make test installs it so (tests/test_live.py)
    extras = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    assert "torch" in extras["optional-dependencies"]


def _client_tests(block: Block) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "clients/python/tests" in config["ini_options"]["testpaths"]  # make test runs it


def _client_python(block: Block) -> None:
    test_live = ROOT / "clients/python/tests/test_live.py"  # runs it against a live server
    assert "def test_run_readme_example(" in test_live.read_text()


NOT_RUN: dict[str, tuple[str, Callable[[Block], None]]] = {
    "make run": ("the premise of every block (it starts the server they call)", _quickstart),
    '{"output":': ("an answer shown, not a command", _shown_answer),
    "export JVP_JOBS_BACKEND=celery": (
        "starts Redis, PostgreSQL and long-running processes; tests/scaleout runs the same "
        "set-up against the real services",
        _scale_out,
    ),
    "docker compose up --build": ("no Docker engine here; tests/scaleout/test_compose.py", _docker),
    "docker build -t jvp-service .": ("no Docker engine here; tests/test_docker.py", _docker),
    "pip install -e clients/python": ("make test installs the client so", _client_install),
    "pytest clients/python/tests": ("the test suite itself", _client_tests),
    "import numpy as np": (
        "run by clients/python/tests/test_live.py::test_run_readme_example",
        _client_python,
    ),
}


def classify(block: Block) -> str:
    if any(block.first.startswith(key) for key in NOT_RUN):
        return "not run"
    if block.lang in ("sh", "bash", "python"):
        return "run"
    return "unknown"


def test_every_block_is_run_or_accounted_for() -> None:
    found = blocks()
    assert len(found) >= 20
    unknown = [str(b) for b in found if classify(b) == "unknown"]
    assert unknown == [], f"blocks neither run nor in NOT_RUN: {unknown}"
    for block in found:
        for key, (_reason, check) in NOT_RUN.items():
            if block.first.startswith(key):
                check(block)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer()
    try:
        yield live
    finally:
        live.stop()


def test_activate_puts_the_commands_on_path() -> None:
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.fail(".venv/bin/activate is missing: run make test (or make run) first")
    (block,) = [b for b in blocks() if b.first == "source .venv/bin/activate"]
    result = subprocess.run(
        ["bash", "-c", block.code + "command -v jvp-service python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [
        str(ROOT / ".venv/bin/jvp-service"),
        str(ROOT / ".venv/bin/python"),
    ]


def test_every_block_runs_as_written(server: LiveServer, tmp_path: Path) -> None:
    port, second = str(server.port), str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("JVP_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    ran = 0
    for block in blocks():
        if classify(block) != "run" or block.first == "source .venv/bin/activate":
            continue
        code = re.sub(r"(127\.0\.0\.1|localhost):8000\b", rf"\g<1>:{port}", block.code)
        code = code.replace("8001", second)
        if block.lang == "python":
            code += "\n" + PYTHON_CHECKS.get(block.first, "")
            command = ["python", "-c", code]
        else:
            command = ["bash", "-c", code]
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{block} exited {result.returncode}:\n{result.stderr}"
        answers = json_answers(result.stdout)
        errors = [a for a in answers if isinstance(a, dict) and "error" in a]
        assert errors == [], f"{block} answered errors: {errors}"
        check = next((c for key, c in CHECKS.items() if block.first.startswith(key)), None)
        if check is not None:
            check([a for a in answers if isinstance(a, dict)])  # type: ignore[misc]
        ran += 1
    assert ran >= 11

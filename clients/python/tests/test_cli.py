"""The `jvp` command line, with an httpx client over a MockTransport injected into main()."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from jvp_fakes import FakeJobs, Recorder, error_response, fake_service

from jvp_client.cli import main


@pytest.fixture
def run_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """run_cli(handler, *argv) -> (exit status, stdout, stderr); sleeps are skipped."""
    monkeypatch.delenv("JVP_BASE_URL", raising=False)
    monkeypatch.delenv("JVP_API_KEY", raising=False)
    monkeypatch.setattr("jvp_client._client.time.sleep", lambda s: None)

    def run(handler: Callable[[httpx.Request], httpx.Response], *argv: str) -> tuple[int, str, str]:
        with httpx.Client(transport=httpx.MockTransport(handler)) as http:
            code = main(list(argv), http_client=http)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, Path]:
    files = {
        "x": np.array([1.0, 2.0, 3.0], dtype=np.float32),
        "y": np.array([0.5, 0.0, -1.0], dtype=np.float32),
        "v": np.array([1.0, 1.0, 1.0], dtype=np.float32),
        "big": np.linspace(0, 1, 100, dtype=np.float32),
    }
    paths = {}
    for name, value in files.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    return paths


def test_call_cli_writes_npz(run_cli, arrays, tmp_path) -> None:
    recorder = Recorder(fake_service)
    out_file = tmp_path / "result.npz"
    code, out, err = run_cli(
        recorder,
        "call",
        "--expression",
        "x**2 + y**2",
        "--primal",
        f"x={arrays['x']}",
        "--primal",
        f"y={arrays['y']}",
        "--tangent",
        f"x={arrays['v']}",
        "--out",
        str(out_file),
        "--engine",
        "functional",
    )
    assert code == 0, err
    with np.load(out_file) as data:
        assert sorted(data.files) == ["jvp", "output"]
        np.testing.assert_allclose(data["output"], [1.25, 4.0, 10.0])
        np.testing.assert_allclose(data["jvp"], [2.0, 4.0, 6.0])
        assert data["output"].dtype == np.float32
    assert "output: float32 [3]" in out and "jvp:" in out and "method forward" in out
    assert f"wrote {out_file}" in out
    body = json.loads(recorder.requests[0].content)
    assert body["expression"] == "x**2 + y**2" and set(body["primals"]) == {"x", "y"}
    assert set(body["tangents"]) == {"x"}
    assert body["options"] == {"dtype": "float32", "engine": "functional"}


def test_call_cli_sends_b64_for_large_arrays(run_cli, arrays, tmp_path) -> None:
    recorder = Recorder(fake_service)
    out_file = tmp_path / "r.npz"
    code, _, err = run_cli(
        recorder,
        "call",
        "-e",
        "x * 2",
        "-p",
        f"x={arrays['big']}",
        "-t",
        f"x={arrays['big']}",
        "-o",
        str(out_file),
    )
    assert code == 0, err
    body = json.loads(recorder.requests[0].content)
    assert "b64" in body["primals"]["x"] and body["options"]["encoding"] == "b64"
    with np.load(out_file) as data:
        np.testing.assert_allclose(data["jvp"], 2 * np.linspace(0, 1, 100, dtype=np.float32))


def test_call_cli_numbers_several_outputs(run_cli, tmp_path) -> None:
    out_file = tmp_path / "r.npz"
    code, _, err = run_cli(
        fake_service,
        "call",
        "-e",
        "(sin(x), cos(x))",
        "-p",
        "x=[0.0, 1.0]",
        "-t",
        "x=[1, 1]",
        "--out",
        str(out_file),
    )
    assert code == 0, err
    with np.load(out_file) as data:
        assert sorted(data.files) == ["jvp_0", "jvp_1", "output_0", "output_1"]
        np.testing.assert_allclose(data["jvp_1"], -np.sin([0.0, 1.0]), rtol=1e-6)


def test_call_cli_prints_server_error_and_exits_1(run_cli) -> None:
    code, out, err = run_cli(fake_service, "call", "-e", "x ** ", "-p", "x=1")
    assert code == 1
    assert "400 invalid_expression: Unknown expression 'x ** '" in err
    assert "(param: expression)" in err


def test_call_cli_exits_1_when_unreachable(run_cli) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    code, _, err = run_cli(refuse, "--max-retries", "0", "call", "-e", "x", "-p", "x=1")
    assert code == 1 and "Connection error" in err and "connection refused" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["call", "-e", "x"], "give at least one --primal"),
        (["call", "-e", "x", "-p", "x"], "expected NAME=FILE.npy"),
        (["call", "-e", "x", "-p", "x=missing.npy"], "cannot read missing.npy"),
        (["call", "-e", "x", "-p", "x=not json"], "neither a .npy file nor a JSON"),
        (["call", "-e", "x", "-p", "x=1", "-p", "x=2"], "'x' given twice"),
        (["call", "-e", "x", "-p", "x=1", "--dtype", "int3"], "dtype"),
    ],
)
def test_call_cli_rejects_bad_arguments(run_cli, argv, match) -> None:
    recorder = Recorder(fake_service)
    code, _, err = run_cli(recorder, *argv)
    assert code == 2 and match in err
    assert recorder.requests == []


def test_call_cli_requires_expression_or_model(run_cli) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(fake_service, "call", "-p", "x=1")
    assert info.value.code == 2


def test_call_cli_takes_connection_flags_after_command(run_cli) -> None:
    recorder = Recorder(fake_service)
    code, _, _ = run_cli(
        recorder,
        "--base-url",
        "http://ignored.test",
        "call",
        "-e",
        "x * 2",
        "-p",
        "x=[1]",
        "--base-url",
        "http://flag.test",
        "--api-key",
        "k",
    )
    assert code == 0
    assert recorder.requests[0].url.host == "flag.test"
    assert recorder.requests[0].headers["authorization"] == "Bearer k"


def test_call_cli_reads_env_fallbacks(run_cli, monkeypatch) -> None:
    monkeypatch.setenv("JVP_BASE_URL", "http://env.test")
    monkeypatch.setenv("JVP_API_KEY", "from-env")
    recorder = Recorder(fake_service)
    assert run_cli(recorder, "call", "-e", "x * 2", "-p", "x=[1]")[0] == 0
    assert recorder.requests[0].url.host == "env.test"
    assert recorder.requests[0].headers["authorization"] == "Bearer from-env"


def test_models_cli_lists_and_describes(run_cli) -> None:
    code, out, _ = run_cli(fake_service, "models")
    assert code == 0 and out.startswith("linear\tbuiltin\tinputs: x[-1, 5]")
    code, out, _ = run_cli(fake_service, "models", "linear")
    assert code == 0 and "weight [5, 5] float32" in out and "outputs: 1" in out
    code, _, err = run_cli(fake_service, "models", "nope")
    assert code == 1 and "404 not_found" in err


def test_health_cli_exit_status(run_cli) -> None:
    assert run_cli(fake_service, "health")[:2] == (0, "live: yes, ready: yes\n")

    def starting(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return error_response(503, "overloaded", "starting")
        return fake_service(request)

    assert run_cli(starting, "health")[:2] == (1, "live: yes, ready: no\n")


def _tasks_file(tmp_path: Path, arrays: dict[str, Path]) -> Path:
    lines = [
        {"primals": {"x": "x.npy", "y": [1.0, 1.0, 1.0]}, "tangents": {"x": "v.npy"}},
        {"primals": {"x": [2.0], "y": [0.0]}, "tangents": {"y": [1.0]}},
        {"expression": "nope", "primals": {"x": [1.0]}},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_jobs_cli_submit_wait_results(run_cli, arrays, tmp_path) -> None:
    fake = FakeJobs(per_poll=1)
    tasks = _tasks_file(tmp_path, arrays)
    code, out, err = run_cli(
        fake, "jobs", "submit", str(tasks), "-e", "x**2 + y**2", "--idempotency-key", "cli-1"
    )
    assert (code, out) == (0, "job-1\n"), err
    body = json.loads(fake.requests[0].content)
    assert body["expression"] == "x**2 + y**2" and len(body["tasks"]) == 3
    assert body["tasks"][0]["primals"]["x"]["data"] == [1.0, 2.0, 3.0]  # read from x.npy
    assert fake.requests[0].headers["idempotency-key"] == "cli-1"

    code, out, _ = run_cli(fake, "jobs", "status", "job-1")
    assert code == 0 and out.startswith("job job-1: running, 1/3 done")

    code, out, err = run_cli(fake, "jobs", "wait", "job-1")
    assert code == 0 and "job job-1: completed, 3/3 done, 1 failed" in out
    assert "job job-1" in err and "3/3" in err  # the progress bar

    out_file = tmp_path / "results.npz"
    code, out, err = run_cli(fake, "jobs", "results", "job-1", "--out", str(out_file))
    assert code == 1  # a task failed
    assert "task 2: invalid_expression: Unknown expression 'nope'" in err
    assert "3 results, 1 failed" in out
    with np.load(out_file) as data:
        assert sorted(data.files) == ["task0_jvp", "task0_output", "task1_jvp", "task1_output"]
        np.testing.assert_allclose(data["task0_output"], [2.0, 5.0, 10.0])
        np.testing.assert_allclose(data["task1_jvp"], [0.0])


def test_jobs_cli_submit_with_wait_and_cancel(run_cli, arrays, tmp_path) -> None:
    fake = FakeJobs(per_poll=5)
    tasks = _tasks_file(tmp_path, arrays)
    code, out, _ = run_cli(
        fake, "jobs", "submit", str(tasks), "-e", "x * 2", "--wait", "--no-progress"
    )
    assert code == 0 and "job job-1: completed, 3/3 done" in out
    run_cli(fake, "jobs", "submit", str(tasks), "-e", "x * 2")
    fake.per_poll = 1  # `jobs cancel` reads the job first: leave it running
    code, out, _ = run_cli(fake, "jobs", "cancel", "job-2")
    assert code == 0 and "job job-2: cancelled" in out


def test_jobs_cli_results_prints_without_out(run_cli, arrays, tmp_path) -> None:
    fake = FakeJobs(per_poll=5)
    run_cli(fake, "jobs", "submit", str(_tasks_file(tmp_path, arrays)), "-e", "x * 2")
    run_cli(fake, "jobs", "status", "job-1")
    code, out, _ = run_cli(fake, "jobs", "results", "job-1")
    assert "task 0: output float32 [3] [2. 4. 6.]" in out


def test_jobs_cli_rejects_bad_tasks_file(run_cli, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    code, _, err = run_cli(FakeJobs(), "jobs", "submit", str(bad), "-e", "x")
    assert code == 2 and "expected a JSON object per line" in err
    code, _, err = run_cli(FakeJobs(), "jobs", "submit", str(tmp_path / "none.jsonl"), "-e", "x")
    assert code == 2 and "cannot read" in err


def test_console_script_is_installed() -> None:
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="jvp")
    assert entry.value == "jvp_client.cli:main"
    done = subprocess.run(
        [sys.executable, "-m", "jvp_client", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("jvp-client ")

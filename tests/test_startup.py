"""What `jvp-service` says when it starts: one summary line (not Alembic's and uvicorn's set-up
lines), `--version`, and `--log-level` with its choices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import httpx

from tests.conftest import ROOT, _scratch_database, free_port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_is_the_installed_package_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"jvp-service {version('jvp-service')}"


def test_log_level_lists_its_choices_and_refuses_others() -> None:
    help_text = cli("serve", "--help").stdout
    assert "--log-level {critical,error,warning,info,debug}" in help_text
    assert "default JVP_LOG_LEVEL or info" in " ".join(help_text.split())
    result = cli("serve", "--log-level", "loud")
    assert result.returncode == 2
    assert "invalid choice: 'loud'" in result.stderr


def test_start_up_logs_one_summary_line() -> None:
    port = free_port()
    database = _scratch_database()
    env = {
        **os.environ,
        "JVP_DATABASE_URL": database,
        "JVP_API_KEYS": "k",
        "JVP_LOG_LEVEL": "info",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    lines = [line for line in stderr.splitlines() if "uvicorn.access" not in line]
    assert len(lines) == 1, stderr
    summary = lines[0]
    assert "INFO app [-]: ready: 4 models (convnet, linear, mlp, transformer)" in summary
    assert "; devices cpu" in summary
    assert f"; job store {database} (jobs run here)" in summary
    assert f"; docs http://127.0.0.1:{port}/docs" in summary
    assert summary.endswith("; API keys on (docs need a key too)")
    assert "alembic" not in stderr.lower()

"""An unusable job store stops `jvp-service serve` at start with one line that names the URL,
the file and the setting (NOTE [job store preflight] in app/preflight.py).

The folder is really unwritable: as root (CI, the dev machine) the server runs as `nobody`
(uid 65534, through util-linux's setpriv) in a folder owned by root, the image's situation
(uid 10001 in /srv); as another user, in a folder of mode 0555.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.preflight import store_problem
from tests.conftest import ROOT

NOBODY = 65534


def _as_unprivileged() -> list[str]:
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run the server as nobody"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def unwritable() -> Iterator[Path]:
    # Not under pytest's own temporary folder, which only its owner may enter (mode 0700).
    folder = Path(tempfile.mkdtemp(prefix="jvp-unwritable-", dir="/tmp"))
    # Readable and searchable by everyone (the server can start there), writable only by
    # its owner, root (or by nobody at all, mode 0555, for another user).
    folder.chmod(0o755 if os.getuid() == 0 else 0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def serve(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [*_as_unprivileged(), sys.executable, "-m", "app.cli", "serve", "--port", "0"]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("JVP_DATABASE_URL", None)  # the default, unless the test gives one
    full_env.update(env)
    return subprocess.run(
        command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_default_store_in_an_unwritable_folder_fails_with_one_line(unwritable: Path) -> None:
    result = serve(unwritable, {})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("jvp-service: Cannot open the job store sqlite:///./jvp-jobs.db"), line
    assert f"({unwritable / 'jvp-jobs.db'})" in line
    assert f"its folder {unwritable} is not writable by this process" in line
    assert "JVP_DATABASE_URL" in line
    assert not (unwritable / "jvp-jobs.db").exists()


def test_store_url_into_a_missing_folder_fails_with_one_line(unwritable: Path) -> None:
    tmp_path = unwritable
    url = f"sqlite:///{tmp_path}/no/such/folder/jobs.db"
    result = serve(ROOT, {"JVP_DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert url in line and f"its folder {tmp_path}/no/such/folder does not exist" in line
    assert "JVP_DATABASE_URL" in line


def test_unreachable_postgres_is_named_without_its_password() -> None:
    problem = store_problem("postgresql+psycopg://jvp:secret@127.0.0.1:1/jvp?connect_timeout=2")
    assert problem is not None
    assert problem.startswith(
        "Cannot open the job store postgresql+psycopg://jvp:***@127.0.0.1:1/jvp"
    )
    assert "secret" not in problem and "JVP_DATABASE_URL" in problem
    assert "\n" not in problem


def test_a_usable_store_has_no_problem(tmp_path: Path) -> None:
    assert store_problem(f"sqlite:///{tmp_path}/jobs.db") is None
    assert (tmp_path / "jobs.db").exists()

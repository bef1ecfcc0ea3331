"""The Dockerfile and compose files against the code (no Docker engine runs on this project's
machines, so no image is built here): the torch pin is the torch the tests run on, the
dependency layers come before the code, the user can write the job store's folder, the
healthcheck asks a route that answers without a key on the port the service listens on,
and compose publishes the API on this host only."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from typing import Any

import pytest
import torch
import yaml
from dockerfile_parse import DockerfileParser
from sqlalchemy.engine import make_url

from app.cli import build_parser
from app.settings import Settings
from tests.conftest import ROOT, make_client

TORCH_VERSION = (ROOT / "torch-version.txt").read_text().strip()


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def instructions(parsed: DockerfileParser) -> list[tuple[str, str]]:
    return [
        (i["instruction"], i["value"]) for i in parsed.structure if i["instruction"] != "COMMENT"
    ]


def test_torch_pin_is_the_torch_the_tests_run_on(dockerfile: DockerfileParser) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", TORCH_VERSION)
    assert torch.__version__.split("+")[0] == TORCH_VERSION
    steps = instructions(dockerfile)
    copy = steps.index(("COPY", "torch-version.txt ./"))
    (install,) = [i for i, (kind, value) in enumerate(steps) if "pip install $index" in value]
    assert copy < install
    assert '"torch==$(cat torch-version.txt)"' in steps[install][1]
    # The Makefile installs the same version, CPU by default, PyPI's CUDA build with GPU=1.
    for gpu, expected in (("0", "--index-url"), ("1", "")):
        dry = subprocess.run(
            ["make", "-n", "install", f"GPU={gpu}", "VENV=/nonexistent-venv"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (line,) = [cmd for cmd in dry.splitlines() if "torch==" in cmd]
        assert f'"torch=={TORCH_VERSION}"' in line
        assert ("--index-url https://download.pytorch.org/whl/cpu" in line) == bool(expected)


def test_base_python_is_the_one_the_project_requires(dockerfile: DockerfileParser) -> None:
    assert dockerfile.baseimage.startswith("python:3.11-")
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()


def test_torch_variants_are_cpu_and_cuda(dockerfile: DockerfileParser) -> None:
    assert dockerfile.args["TORCH_VARIANT"] == "cuda"
    install = next(v for k, v in instructions(dockerfile) if "TORCH_VARIANT" in v and k == "RUN")
    cases = re.findall(r"(\w+)\) index=", install)
    assert cases == ["cpu", "cuda"]
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for service in yaml.safe_load((ROOT / name).read_text())["services"].values():
            variant = service.get("build", {}).get("args", {}).get("TORCH_VARIANT")
            assert variant in (None, "cpu", "cuda")


def test_dependency_layers_come_before_the_code(dockerfile: DockerfileParser) -> None:
    steps = instructions(dockerfile)
    code = steps.index(("COPY", "app ./app"))
    before = [value for kind, value in steps[:code] if kind == "COPY"]
    assert before == ["torch-version.txt ./", "pyproject.toml ./", "README.md ./"]
    installs = [
        i for i, (kind, value) in enumerate(steps) if kind == "RUN" and "pip install" in value
    ]
    after = [steps[i][1] for i in installs if i > code]
    assert after == ["pip install --no-deps --no-build-isolation . && rm -rf build"]
    # The dependency list the image installs is pyproject's, read the way the RUN line reads it.
    run = next(v for k, v in steps if k == "RUN" and "tomllib" in v)
    command = run.split(" > /tmp/requirements.txt")[0]
    listed = subprocess.run(
        ["sh", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    import tomllib

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [line for line in listed if line] == expected


def test_what_the_image_copies_is_not_docker_ignored(dockerfile: DockerfileParser) -> None:
    ignored = [p for p in (ROOT / ".dockerignore").read_text().split() if p]
    for kind, value in instructions(dockerfile):
        if kind == "COPY":
            source = value.split()[0]
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_the_user_owns_the_job_store_folder(dockerfile: DockerfileParser) -> None:
    steps = instructions(dockerfile)
    (user,) = [value for kind, value in steps if kind == "USER"]
    useradd = next(v for k, v in steps if k == "RUN" and "useradd" in v)
    assert f"--uid {user}" in useradd
    url = dockerfile.envs["JVP_DATABASE_URL"]
    assert Settings(database_url=url).database_url == url
    database = make_url(url).database
    assert database == "/data/jvp-jobs.db"
    assert ("VOLUME", '["/data"]') in steps
    assert "mkdir -p /data" in useradd and "chown jvp:jvp /data" in useradd
    assert steps.index(("USER", user)) > next(i for i, s in enumerate(steps) if "useradd" in s[1])


def test_healthcheck_asks_an_open_route_on_the_service_port(dockerfile: DockerfileParser) -> None:
    steps = instructions(dockerfile)
    (check,) = [value for kind, value in steps if kind == "HEALTHCHECK"]
    (url,) = re.findall(r"'(http://[^']+)'", check)
    port = dockerfile.envs["JVP_PORT"]
    assert url == f"http://127.0.0.1:{port}/healthz"
    assert ("EXPOSE", port) in steps
    assert dockerfile.envs["JVP_HOST"] == "0.0.0.0"
    with make_client(api_keys=["k"]) as client:
        assert client.get("/healthz").status_code == 200  # open with keys on


def test_default_command_is_a_real_command_line(dockerfile: DockerfileParser) -> None:
    (cmd,) = [value for kind, value in instructions(dockerfile) if kind == "CMD"]
    argv: list[Any] = yaml.safe_load(cmd)  # the JSON (exec) form
    assert argv[0] == "jvp-service"
    assert build_parser().parse_args(argv[1:]).command == "serve"
    assert shlex.join(argv) == "jvp-service serve"


def test_compose_publishes_the_api_on_this_host_only() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert compose["services"]["api"]["ports"] == ["127.0.0.1:8000:8000"]

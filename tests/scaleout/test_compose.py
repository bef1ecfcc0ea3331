"""docker-compose.yml and its GPU override: parsed (Docker does not run on this machine) and
checked against what the service really offers: every command is a real `jvp-service`
command line, every service has a healthcheck, the roles share one image."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.settings import Settings
from tests.conftest import ROOT


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


def test_compose_runs_api_worker_rabbitmq_and_postgres_with_healthchecks() -> None:
    services = load("docker-compose.yml")["services"]
    assert set(services) == {"api", "worker", "rabbitmq", "postgres"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    for role in ("api", "worker"):
        depends = services[role]["depends_on"]
        assert depends == {
            "postgres": {"condition": "service_healthy"},
            "rabbitmq": {"condition": "service_healthy"},
        }
        assert "/models" in [v.split(":")[1] for v in services[role]["volumes"]]
    assert services["api"]["image"] == services["worker"]["image"]  # one image, two roles
    assert "models" in load("docker-compose.yml")["volumes"]


@pytest.mark.parametrize("role", ["api", "worker"])
def test_compose_commands_are_real_cli_command_lines(role: str) -> None:
    services = load("docker-compose.yml")["services"]
    for command in (services[role]["command"], services[role]["healthcheck"]["test"][1:]):
        if command[0] != "jvp-service":
            continue
        args = build_parser().parse_args(command[1:])  # argparse exits 2 on anything unknown
        assert args.command in ("serve", "worker", "worker-ping")
    assert services[role]["command"][1] == {"api": "serve", "worker": "worker"}[role]


def test_compose_environment_names_real_settings() -> None:
    compose = load("docker-compose.yml")
    fields = {f"JVP_{name.upper()}" for name in Settings.model_fields}
    for role in ("api", "worker"):
        env = compose["services"][role]["environment"]
        assert set(env) <= fields, set(env) - fields
        assert env["JVP_JOBS_BACKEND"] == "celery"
        assert env["JVP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["JVP_BROKER_URL"].startswith("amqp://jvp:jvp@rabbitmq:5672/")
    rabbitmq = compose["services"]["rabbitmq"]["environment"]
    assert (rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]) == ("jvp", "jvp")
    # The ack timeout outlasts the longest chunk (JVP_CELERY_TASK_TIMEOUT_S, in ms here).
    timeout_ms = int(rabbitmq["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()[-1])
    assert timeout_ms > Settings().celery_task_timeout_s * 1000


def test_compose_gpu_override_reserves_nvidia_gpus_for_workers_only() -> None:
    services = load("docker-compose.gpu.yml")["services"]
    assert set(services) == {"api", "worker"}
    assert "deploy" not in services["api"]  # the api only gets the CUDA build of the image
    for role in ("api", "worker"):
        assert services[role]["build"] == {"args": {"TORCH_VARIANT": "cuda"}}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # The default file works on CPU hosts: no GPU reservation there.
    assert "deploy" not in load("docker-compose.yml")["services"]["worker"]

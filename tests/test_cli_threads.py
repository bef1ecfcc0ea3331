"""`jvp-service serve` chooses torch's threads before torch starts (NOTE [CPU threads])."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, LiveServer

# Runs `jvp-service serve` with uvicorn.run replaced: what the app's process would see.
_PROBE = """
import json, os, sys
import uvicorn

def run(*args, **kwargs):
    imported_before = "torch" in sys.modules
    import torch
    print(json.dumps({
        "torch_imported_before": imported_before,
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "policy": os.environ.get("OMP_WAIT_POLICY"),
    }))

uvicorn.run = run
from app.cli import main
main(["serve", *sys.argv[1:]])
"""


def _probe(env: dict[str, str], *args: str, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "JVP_"))}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _PROBE, *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_serve_sets_threads_before_torch_is_imported() -> None:
    seen = _probe({})
    assert seen["torch_imported_before"] is False
    cpus = len(os.sched_getaffinity(0))
    expected = max(1, cpus - 1)
    assert seen["omp"] == str(expected)
    assert seen["threads"] == expected  # torch's pool was sized by it
    assert seen["policy"] == ("PASSIVE" if expected > 1 else None)


def test_serve_splits_the_cpus_between_workers() -> None:
    seen = _probe({}, "--workers", "2")
    assert seen["threads"] == max(1, len(os.sched_getaffinity(0)) // 2 - 1)


def test_serve_explicit_num_threads_wins() -> None:
    seen = _probe({"JVP_NUM_THREADS": "3"})
    # (torch caps a pool sized from the environment at the cores; the app's lifespan then
    # sets the number exactly: test_serve_explicit_num_threads_shows_on_metrics.)
    assert (seen["omp"], seen["policy"]) == ("3", None)


def test_serve_keeps_the_environments_omp_settings() -> None:
    seen = _probe({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"})
    assert (seen["omp"], seen["threads"], seen["policy"]) == ("2", 2, "ACTIVE")


def _cpu_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("jvp_cpu_usable", "jvp_cpu_threads"):
            found[name] = float(value)
    return found


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_serve_on_one_cpu_detects_it_and_computes_on_one_thread() -> None:
    cpu = str(min(os.sched_getaffinity(0)))
    server = LiveServer({"JVP_NUM_THREADS": "0"}, prefix=["taskset", "-c", cpu])
    try:
        assert _cpu_metrics(server.url) == {"jvp_cpu_usable": 1.0, "jvp_cpu_threads": 1.0}
        body = {"expression": "x * y", "primals": {"x": 3.0, "y": 2.0}, "tangents": {"x": 1.0}}
        answer = httpx.post(f"{server.url}/jvp", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["jvp"]["data"] == [2.0]  # d(x*y)/dx at y = 2
    finally:
        server.stop()


def test_serve_explicit_num_threads_shows_on_metrics() -> None:
    server = LiveServer({"JVP_NUM_THREADS": "3"})
    try:
        assert _cpu_metrics(server.url)["jvp_cpu_threads"] == 3.0
    finally:
        server.stop()


def test_workers_auto_is_one_process_per_usable_cpu() -> None:
    from app.cli import build_parser, workers_count
    from app.engine.cpu_budget import this_process_cpus

    args = build_parser().parse_args(["serve", "--workers", "auto"])
    assert args.workers == this_process_cpus()
    assert workers_count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="positive count or 'auto'"):
        workers_count("0")
    with pytest.raises(argparse.ArgumentTypeError, match="got 'many'"):
        workers_count("many")


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_serve_workers_auto_under_taskset_sizes_each_process_for_one_cpu() -> None:
    cpu = str(min(os.sched_getaffinity(0)))
    seen = _probe({}, "--workers", "auto", prefix=("taskset", "-c", cpu))
    assert (seen["omp"], seen["threads"]) == ("1", 1)

"""What the forward-coverage check costs a JVP (NOTE [forward mode: exact or refused] in
app/engine/forward_coverage.py): cached (a repeated request: one dictionary look-up) and
uncached (the first request of its target, dtype, device, shapes and tangents).

    .venv/bin/python -m bench.forward_coverage [--repeat 2000]

In process, on the CPU, one thread: for each workload, the median time of `compute` (the
worker's whole path for one task) with the check and without it, their difference, and
one uncached check (its cache emptied before each run). Nothing is asserted; the table is
the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import app.engine.compute as compute_module
from app.engine.compute import compute
from app.engine.forward_coverage import FORWARD_COVERAGE, check_forward
from app.engine.protocol import Arguments
from app.engine.target import Target
from app.engine.task import JVPTask
from app.runtime import build_registry
from app.services.jvp import expression_target
from app.settings import Settings

CPU = torch.device("cpu")
F32 = torch.float32


def workloads() -> dict[str, tuple[Target, tuple[torch.Tensor, ...]]]:
    registry = build_registry(Settings())
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    def expr(source: str) -> Target:
        return expression_target(source, 10_000, 1_000, 100)

    return {
        "x**2 + y**2, 10x10": (expr("x**2 + y**2"), (rand(10, 10), rand(10, 10))),
        "sin(x) * y, 100": (expr("sin(x) * y"), (rand(100), rand(100))),
        "model mlp, 8x64": (registry.get("mlp").target, (rand(8, 64),)),
        "model transformer, 2x8x32": (registry.get("transformer").target, (rand(2, 8, 32),)),
    }


def median_us(f: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    repeat = parser.parse_args().repeat
    torch.set_num_threads(1)
    print("| workload                  | compute µs | without µs | check µs | uncached µs |")
    print("| ------------------------- | ---------- | ---------- | -------- | ----------- |")
    for name, (target, inputs) in workloads().items():
        print(row(name, target, inputs, repeat))


def row(name: str, target: Target, inputs: tuple[torch.Tensor, ...], repeat: int) -> str:
    """One workload's table row."""
    tangents = (torch.ones_like(inputs[0]),) + (None,) * (len(inputs) - 1)
    task = JVPTask(target, inputs, tangents, {}, F32, CPU)
    args = Arguments(target.materialize(F32, CPU), inputs, tangents, {})
    compute(task)  # warm: materialized, verdict cached
    with_check = median_us(lambda: compute(task), repeat)
    compute_module.check_forward = lambda *a: None
    try:
        without = median_us(lambda: compute(task), repeat)
    finally:
        compute_module.check_forward = check_forward

    def uncached() -> None:
        FORWARD_COVERAGE._verdicts.clear()
        check_forward(target, None, args)

    first = median_us(uncached, max(3, repeat // 200))
    cells = f"| {name:25} | {with_check:10.1f} | {without:10.1f} |"
    return f"{cells} {with_check - without:8.1f} | {first:11.1f} |"


if __name__ == "__main__":
    main()

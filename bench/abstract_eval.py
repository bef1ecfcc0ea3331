"""What the up-front abstract evaluation costs a request (NOTE [abstract evaluation] in
app/engine/abstract.py): cached (a repeated request: one dictionary look-up and the
bounds) and uncached (the first request of its target, shapes, dtype and operation).

    .venv/bin/python -m bench.abstract_eval [--repeat 2000]

In process, on the CPU, with the service's default settings: for each workload, the
median time of `JVPService.prepare` without the evaluation (decoding and checking the
request, what every request paid before), the extra time of the cached evaluation, and
the time of one uncached evaluation (its cache emptied before each run). Nothing is
asserted; the table is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from app.engine.engine import Engine
from app.runtime import build_registry
from app.schemas import JVPRequest
from app.services.jvp import JVPService
from app.settings import Settings


def ones(*shape: int) -> dict[str, Any]:
    n = 1
    for d in shape:
        n *= d
    return {"shape": list(shape), "dtype": "float32", "data": [0.5] * n}


WORKLOADS: dict[str, dict[str, Any]] = {
    "x**2 + y**2, 10x10": {
        "expression": "x**2 + y**2",
        "primals": {"x": ones(10, 10), "y": ones(10, 10)},
        "tangents": {"x": ones(10, 10)},
    },
    "sin(x) * y, 100": {
        "expression": "sin(x) * y",
        "primals": {"x": ones(100), "y": ones(100)},
        "tangents": {"x": ones(100), "y": ones(100)},
    },
    "tanh(A @ x), 64x64": {
        "expression": "tanh(A @ x)",
        "primals": {"A": ones(64, 64), "x": ones(64)},
        "tangents": {"x": ones(64)},
    },
    "model mlp, 8x64": {
        "model": "mlp",
        "primals": {"x": ones(8, 64)},
        "tangents": {"x": ones(8, 64)},
    },
    "model transformer, 2x8x32": {
        "model": "transformer",
        "primals": {"x": ones(2, 8, 32)},
        "tangents": {"x": ones(2, 8, 32)},
    },
}


def median_us(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(min(repeat, 50)):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    settings = Settings()
    engine = Engine([torch.device("cpu")], max_queue=16)
    service = JVPService(settings, engine, build_registry(settings))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeat {args.repeat}")
    header = (
        f"{'workload':<28} {'prepare µs':>11} {'+ cached µs':>12} {'cached %':>9} "
        f"{'uncached µs':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, body in WORKLOADS.items():
        request = JVPRequest.model_validate(body)

        def unbounded(r: JVPRequest = request) -> None:
            service.prepare(r, bound=False)

        baseline = median_us(unbounded, args.repeat)
        task = service.prepare(request, bound=False)
        service.bound(task)  # fills the cache

        def cached_bound(t: Any = task) -> None:
            service.bound(t)

        cached = median_us(cached_bound, args.repeat)

        def uncached(t: Any = task) -> None:
            service.estimator._cache.clear()
            service.bound(t)

        cold = median_us(uncached, max(args.repeat // 20, 20))
        print(
            f"{name:<28} {baseline:>11.1f} {cached:>12.1f} {100 * cached / baseline:>8.1f}% "
            f"{cold:>12.1f}"
        )


if __name__ == "__main__":
    main()

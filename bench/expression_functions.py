"""In-process cost of one JVP through an expression function: PyTorch's form against the
accurate one (NOTE [accurate elementwise functions]), both engines, interleaved.

    .venv/bin/python bench/expression_functions.py              # all of functions.ACCURATE
    .venv/bin/python bench/expression_functions.py gelu tanh    # some of them

For each function and size (10x10 and 1000x1000, float64, a tangent on x) the
engine's JVP (`app.engine.jvp`, what a worker calls) of ``f(x)`` is timed with
PyTorch's own operator and with the accurate form, alternating the two in 9
rounds of N calls; each cell is the fastest round, in µs per call (the fastest
is the least disturbed by other work on a shared machine). ``x**2 + y**2`` (the
small-request benchmark's expression, which these forms do not touch) is timed
alongside for scale. The numbers are in bench/README.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.functions import ACCURATE
from app.engine.jvp import ENGINES
from app.engine.target import Materialized

NATIVE: dict[str, Callable[..., torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    **{name: getattr(torch, name) for name in ACCURATE if name not in ("gelu", "silu")},
}
SIZES = {"10x10": ((10, 10), 400), "1000x1000": ((1000, 1000), 4)}


def _sum_of_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x**2 + y**2


def _round(fn: Callable[..., torch.Tensor], engine: str, xs: tuple, ts: tuple, n: int) -> float:
    target = Materialized(fn=lambda args, state: (fn(*args),), parameters={}, buffers={})
    jvp = ENGINES[engine]
    start = time.perf_counter()
    for _ in range(n):
        jvp(target, xs, ts, {})
    return (time.perf_counter() - start) / n * 1e6


def compare(fns: dict[str, Callable[..., torch.Tensor]], engine: str, size: str) -> dict:
    shape, n = SIZES[size]
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    best = dict.fromkeys(fns, float("inf"))
    for label, fn in fns.items():  # warm up
        args = (x, y) if label == "x**2 + y**2" else (x,)
        _round(fn, engine, args, (t,) * len(args), max(2, n // 10))
    for _ in range(9):
        for label, fn in fns.items():
            args = (x, y) if label == "x**2 + y**2" else (x,)
            best[label] = min(best[label], _round(fn, engine, args, (t,) * len(args), n))
    return best


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(ACCURATE)
    print("| function | engine | size | PyTorch µs | accurate µs | ratio | `x**2 + y**2` µs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        for engine in ENGINES:
            for size in SIZES:
                fns: dict[str, Callable[..., torch.Tensor]] = {
                    "native": NATIVE[name],
                    "accurate": ACCURATE[name],
                    "x**2 + y**2": _sum_of_squares,
                }
                best = compare(fns, engine, size)
                ratio = best["accurate"] / best["native"]
                print(
                    f"| `{name}` | {engine} | {size} | {best['native']:.1f} | "
                    f"{best['accurate']:.1f} | {ratio:.2f} | {best['x**2 + y**2']:.1f} |"
                )


if __name__ == "__main__":
    main()

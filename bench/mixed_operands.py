"""In-process cost of a JVP where some operands carry no tangent, three ways.

    .venv/bin/python -m bench.mixed_operands [--rounds 15] [--inner 200]

NOTE [mixed dual and plain operands] in app/engine/jvp.py: in PyTorch 2.13 an
operator mixing a dual and a plain tensor takes a slow path. The ways timed, on
the service's own engine functions (one torch thread, float32):

- "zero tangents, unchecked": small plain operands get a dense zero tangent and
  the result is taken as is (the engine before issue 14: fast, but 0 * inf put
  NaN into JVPs);
- "plain operands": what has no tangent stays plain (exact, the slow path);
- "zero tangents, verified": the engine now (zero tangents, the result kept when
  it holds no NaN, else computed again with plain operands).

Cases: ``x**2 + y**2`` on 10x10 with a tangent on x (the `make bench` small
request), the built-in ``mlp`` on x[32, 64] with a tangent on x only (its four
parameters without one), and the same MLP as a dynamic batch of 8
(`vmap_jvp`). The rounds interleave the ways, so a drift of the machine's
speed hits all alike; the table gives the median µs per JVP. Nothing is
asserted; the table is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from app.engine import jvp
from app.engine.batching import vmap_jvp
from app.engine.protocol import Arguments
from app.engine.target import Materialized
from app.models.builtin import mlp
from app.services.jvp import expression_target

Call = Callable[[], object]


def _cases() -> dict[str, dict[str, Call]]:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    expr = expression_target("x**2 + y**2", 2000, 500, 50).materialize(torch.float32, cpu)
    xy = (torch.rand(10, 10), torch.rand(10, 10))
    t_xy = (torch.rand(10, 10), None)
    model = mlp().target.materialize(torch.float32, cpu)
    x = (torch.randn(32, 64),)
    t_x = (torch.randn(32, 64),)
    xb = (torch.randn(8, 32, 64),)
    t_xb = (torch.randn(8, 32, 64),)

    def ways(
        target: Materialized, inputs: jvp.Tensors, tangents: jvp.OptionalTensors
    ) -> dict[str, Call]:
        a = Arguments(target, inputs, tangents, {})
        return {
            "dual, zero tangents, unchecked": lambda: jvp._dual(a, True),
            "dual, plain operands": lambda: jvp._dual(a, False),
            "dual, zero tangents, verified": lambda: jvp.jvp_dual(*a),
            "functional, zero tangents, unchecked": lambda: jvp.functional(a, True),
            "functional, plain operands": lambda: jvp.functional(a, False),
            "functional, zero tangents, verified": lambda: jvp.jvp_functional(*a),
        }

    def batch(zeros: bool | None) -> Call:
        if zeros is None:
            return lambda: vmap_jvp(Arguments(model, xb, t_xb, {}))
        return lambda: torch.func.vmap(
            lambda xs, ts: jvp.functional(Arguments(model, (xs,), (ts,), {}), zeros)
        )(xb[0], t_xb[0])

    return {
        "x**2 + y**2, 10x10, tangent on x": ways(expr, xy, t_xy),
        "mlp, x[32, 64], tangent on x only": ways(model, x, t_x),
        "mlp, batch of 8 (vmap), per batch": {
            "vmap, zero tangents, unchecked": batch(True),
            "vmap, plain operands": batch(False),
            "vmap, zero tangents, verified": batch(None),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median µs per call of {args.rounds} rounds")
    print()
    print("| case | way | µs |")
    print("| --- | --- | ---: |")
    for case, ways in _cases().items():
        samples: dict[str, list[float]] = {way: [] for way in ways}
        for fn in ways.values():  # warm-up: first-call costs
            for _ in range(20):
                fn()
        inner = args.inner if "batch" not in case else max(1, args.inner // 8)
        for _ in range(args.rounds):
            for way, fn in ways.items():
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[way].append((time.perf_counter() - start) / inner * 1e6)
        for way, values in samples.items():
            print(f"| {case} | {way} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()

"""One GMRES solve (50 iterations) through ``client.linear_operator`` on a linearize session,
against the same solve with a plain ``POST /jvp`` per product.

    .venv/bin/python -m bench.krylov [--quick] [--model mlp] [--repeat 3]

Starts `jvp-service serve` on a free 127.0.0.1 port (CPU, default settings). The system
is J δ = b with J the Jacobian of the ``mlp`` built-in at a point ([1, 64] -> [1, 64], a
square 64 x 64 J); GMRES runs exactly 50 iterations (restart 50, maxiter 1, a tolerance
it cannot reach), so both ways make the same number of products. The first way linearizes
once (``POST /linearize`` with ``options.transpose``) and applies the session
(``POST /linearize/{id}/jvp``); the second sends the primals again with every tangent
(``POST /jvp``). Prints the median wall time of each, the ratio, the number of products,
and the largest difference between the two solutions (they must agree). Nothing is
asserted about speed; the table is the result (and on a machine shared with other work,
only its order of magnitude).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from jvp_client import JVPClient
from scipy.sparse.linalg import LinearOperator, gmres

from bench.servers import jvp_service

ITERATIONS = 50


def _solve(A: Any, b: np.ndarray) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    x, _ = gmres(A, b, rtol=1e-30, atol=0.0, restart=ITERATIONS, maxiter=1)
    return x, time.perf_counter() - started


def plain_jvp_operator(client: JVPClient, model: str, x: np.ndarray, counter: list[int]) -> Any:
    n = x.size

    def matvec(v: np.ndarray) -> np.ndarray:
        counter[0] += 1
        r = client.jvp(model=model, primals={"x": x}, tangents={"x": v.reshape(x.shape)})
        return np.asarray(r.jvp).reshape(-1)

    return LinearOperator((n, n), matvec=matvec, dtype=x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat (shows it works)")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 64)) * 0.1).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    with jvp_service("krylov") as server, JVPClient(base_url=server.url) as client:
        client.jvp(model=args.model, primals={"x": x}, tangents={"x": x})  # warm up
        session_s, plain_s = [], []
        products = 0
        for _ in range(repeat):
            with client.linear_operator(model=args.model, primals={"x": x}, wrt="x") as J:
                before = J.calls
                x_session, seconds = _solve(J, b)
                products = J.calls - before
            session_s.append(seconds)
            counter = [0]
            x_plain, seconds = _solve(plain_jvp_operator(client, args.model, x, counter), b)
            plain_s.append(seconds)
        diff = float(np.max(np.abs(x_session - x_plain)))
    s, p = statistics.median(session_s), statistics.median(plain_s)
    print(f"GMRES, {ITERATIONS} iterations, J of {args.model!r} at a point (64 x 64), float32")
    print(f"{'way':<34} {'median s':>9} {'products':>9}")
    print(f"{'linear_operator (linearize session)':<34} {s:>9.3f} {products:>9}")
    print(f"{'plain POST /jvp per product':<34} {p:>9.3f} {counter[0]:>9}")
    print(f"ratio plain / session: {p / s:.2f}x; max |difference| of the solutions: {diff:.2e}")
    print(f"(median of {repeat} run(s); measured on this machine, under whatever else runs)")


if __name__ == "__main__":
    main()

"""The 2-D Bratu solve (32 x 32 interior grid, λ = 6, float64) three ways, in one run:

1. ``POST /solve``: Newton-Krylov on the server, every J·v an exact JVP on the device
   worker, one request;
2. SciPy's Newton-Krylov driver (``scipy.optimize.nonlin.nonlin_solve``, what
   ``newton_krylov`` runs) with its Jacobian's products taken from the service through
   ``client.linear_operator`` (exact JVPs over HTTP: one ``POST /linearize`` per Newton
   step, one ``POST /linearize/{id}/jvp`` per product, one ``POST /jvp`` per evaluation
   of F);
3. SciPy's ``newton_krylov`` in process on the numpy residual, its products by finite
   differences (one evaluation of F each).

    .venv/bin/python -m bench.solve [--quick] [--repeat 3]

Starts `jvp-service serve` on a free 127.0.0.1 port (CPU, default settings) with the Bratu
residual exported into a temporary model repository (tests/solve/bratu.py). Prints, per
way, the median wall time, the products of J (JVPs; finite-difference evaluations for
the third), the HTTP requests, and the final ||F|| recomputed here in numpy for all three
alike, and the largest difference of each solution from the in-process one. Nothing is
asserted; the table is the result (the target of issue 18: the first at least 10x faster
than the second and as accurate as the third).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from jvp_client import JVPClient
from scipy.optimize import newton_krylov
from scipy.optimize._nonlin import KrylovJacobian, nonlin_solve

from bench.servers import jvp_service
from tests.solve.bratu import LAMBDA, N, export, residual

F_TOL = 1e-8


class ServiceJacobian(KrylovJacobian):
    """SciPy's Krylov Jacobian with its products J·v taken from the service (exact), at
    each Newton point one linearize session."""

    def __init__(self, client: JVPClient, counts: dict[str, int]) -> None:
        super().__init__(method="lgmres")
        self.client, self.counts = client, counts
        self.J: Any = None

    def _at(self, x: np.ndarray) -> None:
        if self.J is not None:
            self.counts["products"] += self.J.calls
            self.J.close()
        self.J = self.client.linear_operator(
            model="bratu", primals=_primals(x), wrt="u", dtype="float64"
        )
        self.counts["requests"] += 1

    def setup(self, x: np.ndarray, f: np.ndarray, func: Any) -> None:
        super().setup(x, f, func)
        self._at(x)

    def update(self, x: np.ndarray, f: np.ndarray) -> None:
        super().update(x, f)
        self._at(x)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(self.J.matvec(v), dtype=np.float64).reshape(-1)

    def finish(self) -> None:
        if self.J is not None:
            self.counts["products"] += self.J.calls
            self.J.close()
            self.J = None


def _primals(u: np.ndarray) -> dict[str, np.ndarray]:
    return {"u": np.asarray(u, dtype=np.float64).reshape(N, N), "lam": np.array([LAMBDA])}


def on_the_server(client: JVPClient) -> tuple[np.ndarray, dict[str, Any]]:
    r = client.solve(model="bratu", primals=_primals(np.zeros((N, N))), unknowns="u")
    assert r.converged, r.reason
    return np.asarray(r.solution["u"]), {"products": r.jvp_count, "requests": 1}


def scipy_over_http(client: JVPClient) -> tuple[np.ndarray, dict[str, Any]]:
    counts = {"products": 0, "requests": 0}

    def f(u: np.ndarray) -> np.ndarray:
        counts["requests"] += 1
        r = client.jvp(model="bratu", primals=_primals(u), dtype="float64")
        return np.asarray(r.output).reshape(u.shape)

    jacobian = ServiceJacobian(client, counts)
    try:
        u = nonlin_solve(f, np.zeros((N, N)), jacobian=jacobian, f_tol=F_TOL)
    finally:
        jacobian.finish()
    counts["requests"] += counts["products"]
    return u, counts


def scipy_in_process() -> tuple[np.ndarray, dict[str, Any]]:
    calls = [0]

    def f(u: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return residual(u)

    u = newton_krylov(f, np.zeros((N, N)), f_tol=F_TOL)
    return u, {"products": calls[0], "requests": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat (shows it works)")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    root = Path(tempfile.mkdtemp(prefix="bench-solve-models-"))
    export(root)
    env = {"JVP_MODEL_DIR": str(root)}
    with jvp_service("solve", env=env) as server, JVPClient(base_url=server.url) as client:
        client.solve(model="bratu", primals=_primals(np.zeros((N, N))), unknowns="u")  # warm up
        ways = {
            "POST /solve (exact JVPs on the server)": lambda: on_the_server(client),
            "SciPy Newton-Krylov, linear_operator": lambda: scipy_over_http(client),
            "SciPy newton_krylov, in-process FD": scipy_in_process,
        }
        rows = []
        for name, run in ways.items():
            times: list[float] = []
            u: Any = None
            counts: dict[str, Any] = {}
            for _ in range(repeat):
                started = time.perf_counter()
                u, counts = run()
                times.append(time.perf_counter() - started)
            rows.append((name, statistics.median(times), counts, u))
    reference = rows[-1][3]
    print(f"2-D Bratu, {N}x{N} interior, lambda={LAMBDA}, float64, f_tol {F_TOL:g}")
    head = f"{'way':<40} {'median s':>9} {'J·v':>6} {'requests':>9} {'||F||':>9} {'max|du|':>9}"
    print(head)
    for name, seconds, counts, u in rows:
        norm = float(np.linalg.norm(residual(np.asarray(u).reshape(N, N))))
        du = float(np.abs(np.asarray(u).reshape(N, N) - reference).max())
        print(
            f"{name:<40} {seconds:>9.3f} {counts['products']:>6} {counts['requests']:>9} "
            f"{norm:>9.2e} {du:>9.1e}"
        )
    print(f"HTTP-driven / POST /solve: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()

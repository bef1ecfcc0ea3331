"""``POST /solve``: Newton-Krylov, linear and least-squares solves on the device worker,
every J·v an exact forward-mode JVP and every Jᵀ·u an exact reverse-mode VJP.

# NOTE [the solve is one work item]
The whole solve, every Newton step and every Krylov product, runs as one operation of
one `JVPTask` on the device worker (NOTE [one dual level per process] in
app/engine/worker.py): the forward-AD level is per process, so the products cannot be
spread over threads, and running them on the worker keeps one owner of device work, one
queue and one deadline (a long solve is watched between operators, `DeadlineWatch`).
The unknowns travel as one flat vector z (each unknown flattened, in ``unknowns``
order); f's outputs as one flat vector F(z). J·v is a JVP with tangents on the unknowns
only (every other input carries none: NOTE [reverse mode: exact or refused] and
[mixed dual and plain operands] hold as for /jvp); Jᵀ·u is `torch.func.vjp` at the
current point, its forward pass run once per Gauss-Newton step and its graph reused
for every LSMR iteration of that step, after the same coverage check as /vjp.

J·v by `torch.func.jvp` recomputes f(z) with every product. `torch.func.linearize` once
per Newton step would save that forward pass, but it traces f with make_fx at every new
point, which costs more than the products it saves for the small residuals this route
is bounded to; so it is not used (the measure: bench/solve.py).

# NOTE [a solve's deadline]
A solve is not watched operator by operator (`DeadlineWatch`, a Python dispatch mode on
every operator, made the Bratu solve of bench/solve.py 2.4x slower: 0.29 s against
0.12 s); instead `Problem` checks the request's deadline before every evaluation of f and
every product, and a solve past it stops there with the 504 that points to batch jobs.
One product is bounded like one /jvp (its estimate against the limits), so the check
comes often enough.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.func import vjp as func_vjp

from app.engine.abstract import Plan
from app.engine.devices import api_float
from app.engine.errors import DeadlineExceeded, InvalidRequest
from app.engine.fallback import jvp_with_fallback
from app.engine.jvp import ENGINES
from app.engine.krylov import KrylovResult, NonFinite, krylov, lsmr, norm2
from app.engine.protocol import Arguments, Operation, Wrt, partial_function
from app.engine.target import Materialized, Target
from app.engine.vjp import COVERAGE

Tensors = tuple[torch.Tensor, ...]
OptionalTensors = tuple[torch.Tensor | None, ...]

# Backtracking (NOTE [Newton-Krylov]): at most this many halvings of a Newton step.
LINE_SEARCH_STEPS = 20
ARMIJO = 1e-4  # sufficient decrease: ||F(z + t δ)|| <= (1 - ARMIJO t (1 - η)) ||F(z)||
# Eisenstat and Walker (1996), choice 2: η_k = γ (||F_k|| / ||F_{k-1}||)^α.
EW_GAMMA, EW_ALPHA, EW_ETA0, EW_ETA_MAX = 0.9, 2.0, 0.5, 0.9
# A step whose forcing term would leave ||F|| within this factor of tol solves to 0.5 tol.
EW_FINISH = 10.0


@dataclass
class SolveOptions:
    method: str  # newton_krylov | linear | least_squares
    tol: float = 1e-8
    max_iterations: int = 50
    krylov: str = "gmres"
    krylov_tol: float | None = None  # None: "auto" (Eisenstat-Walker for newton_krylov)
    max_krylov: int = 200
    restart: int = 50
    line_search: bool = True


class SolveDeadlineExceeded(DeadlineExceeded):
    """The solve itself stopped at the request's deadline (NOTE [a solve's deadline]): its
    message says how far it got and points to batch jobs."""


class Stopped(NonFinite):
    """The solve met a NaN or an infinity; ``what`` is the whole reason, where included."""


@dataclass
class Problem:
    """F(z) and its products at one target, the unknowns as one flat vector z."""

    f: Callable[..., Tensors]  # of the unknowns (as shaped tensors), the rest fixed
    target: Materialized
    inputs: Tensors
    indices: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    jvps: int = 0
    vjps: int = 0
    n_outputs: int = 0  # f's outputs, known once it ran
    deadline: float | None = None  # time.monotonic(); NOTE [a solve's deadline]

    def _in_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise SolveDeadlineExceeded(
                f"The solve passed the request's deadline after {self.jvps} products of J and "
                f"{self.vjps} of Jᵀ, and was stopped (JVP_REQUEST_TIMEOUT_S). Submit it as a "
                'batch job (POST /jobs with "operation": "solve"), which has no request '
                "deadline, or lower options.max_iterations / options.max_krylov"
            )

    def split(self, z: torch.Tensor) -> Tensors:
        sizes = [math.prod(s) for s in self.shapes]
        return tuple(p.reshape(s) for p, s in zip(z.split(sizes), self.shapes, strict=True))

    def full(self, z: torch.Tensor) -> Tensors:
        full = list(self.inputs)
        for i, x in zip(self.indices, self.split(z), strict=True):
            full[i] = x
        return tuple(full)

    def outputs(self, z: torch.Tensor) -> Tensors:
        self._in_time()
        with torch.no_grad():
            found = tuple(o.detach() for o in self.f(*self.split(z)))
        self.n_outputs = len(found)
        return found

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        return flat(self.outputs(z))

    def jvp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tangents: list[torch.Tensor | None] = [None] * len(self.inputs)
        for i, t in zip(self.indices, self.split(v), strict=True):
            tangents[i] = t
        self._in_time()
        self.jvps += 1
        _, jv, _ = jvp_with_fallback(
            ENGINES["dual"], self.target, self.full(z), tuple(tangents), {}
        )
        return flat(jv)

    def vjp_at(self, z: torch.Tensor, source: Target | None) -> Callable[[torch.Tensor], Any]:
        """u -> Jᵀu at z, one forward pass kept for every u (NOTE [the solve is one work
        item]); refused (501) where reverse mode would drop a gradient."""
        full = self.full(z)
        outputs = tuple(range(self.n_outputs or len(self.outputs(z))))
        COVERAGE.check(source, self.target, full, self.indices, (), outputs)
        f, primals = partial_function(self.target, full, self.indices, ())
        pullback = func_vjp(lambda *a: flat(f(*a)), *primals)[1]

        def apply(u: torch.Tensor) -> torch.Tensor:
            self._in_time()
            self.vjps += 1
            return torch.cat([g.reshape(-1) for g in pullback(u)])

        return apply


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def finite(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all())


@dataclass(eq=False)
class SolveOperation(Operation):
    """The solve as a `JVPTask` operation: returns ``(f at the solution, the solution per
    unknown)``; the rest of the answer (iterations, counts, history) is `report`'s.
    ``progress``: called with each finished iteration (a job's task reports it)."""

    unknown_indices: tuple[int, ...]
    names: tuple[str, ...]
    options: SolveOptions
    rhs: torch.Tensor | None = None  # linear: flat, host
    source: Target | None = None  # the coverage cache's key (least squares)
    progress: Callable[[int], None] | None = None
    deadline: float | None = None  # the request's (NOTE [a solve's deadline]); None in a job
    kind: str = "solve"
    method: str = "forward"
    result: dict[str, Any] = field(default_factory=dict, init=False)

    def forward_wrt(self, a: Arguments) -> Wrt:
        """Every J·v of the solve carries tangents from the unknowns: the coverage check
        (NOTE [forward mode: exact or refused]) runs on them before the first product."""
        return self.unknown_indices, ()

    def plan_for(self, target: Target, inputs: Sequence[torch.Tensor]) -> Plan:
        """One J·v's plan: the service multiplies its estimate by the iteration caps."""
        return Plan("jvp", directions=len(self.unknown_indices))

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        target, inputs = a.target, a.inputs
        f, primals = a.partial(self.unknown_indices, ())
        shapes = tuple(p.shape for p in primals)
        problem = Problem(f, target, inputs, self.unknown_indices, shapes, deadline=self.deadline)
        z0 = flat(primals) if primals else inputs[0].new_zeros(0)
        run = {
            "newton_krylov": self._newton,
            "linear": self._linear,
            "least_squares": self._least_squares,
        }[self.options.method]
        state = _State(z=z0)
        try:
            run(problem, state)
        except NonFinite as e:
            stopped = isinstance(e, Stopped)
            state.reason = e.what if stopped else f"{e.what} is NaN or infinite at {state.where()}"
            state.converged = False
        outputs = problem.outputs(state.z)
        self.result = {
            "residual_norm": api_float(state.residual_norm),
            "converged": state.converged,
            "iterations": state.iterations,
            "jvp_count": problem.jvps,
            "vjp_count": problem.vjps,
            "history": state.history,
        }
        if state.reason is not None:
            self.result["reason"] = state.reason
        return outputs, problem.split(state.z if state.delta is None else state.delta)

    def report(self) -> dict[str, Any]:
        return dict(self.result)

    def _step(self, state: _State, entry: dict[str, Any]) -> None:
        state.history.append(entry)
        if self.progress is not None:
            self.progress(state.iterations)

    def _krylov(
        self, problem: Problem, z: torch.Tensor, b: torch.Tensor, rtol: float
    ) -> KrylovResult:
        o = self.options
        return krylov(
            o.krylov,
            lambda v: problem.jvp(z, v),
            b,
            rtol=rtol,
            maxiter=o.max_krylov,
            restart=o.restart,
        )

    # NOTE [Newton-Krylov]
    # Inexact Newton (Dembo, Eisenstat and Steihaug 1982): each step solves J δ = -F to
    # ||J δ + F|| <= η ||F|| by the chosen Krylov method. η is krylov_tol when given;
    # "auto" is Eisenstat and Walker's choice 2 (SIAM J. Sci. Comput. 17(1), 1996), with
    # their safeguard (η_k >= γ η_{k-1}^α while that is above 0.1), at most EW_ETA_MAX,
    # and never below what the final tolerance needs (0.5 tol / ||F||); where η ||F|| is
    # within EW_FINISH of tol the step is the last one and solves to 0.5 tol exactly (on
    # the Bratu solve of bench/solve.py, η = 5e-6 left ||F|| at 1.7e-8 against 1e-8, and a
    # sixth Newton step took 20 products to finish: 182 in all, 166 with the rule). The
    # step is then
    # backtracked (halved, at most LINE_SEARCH_STEPS times) until ||F|| decreases
    # sufficiently (Armijo on ||F||, as in Eisenstat and Walker's globalized method); a
    # trial point where F is not finite counts as no decrease. With line_search off the
    # full step is taken and a non-finite F stops the solve.
    def _newton(self, problem: Problem, state: _State) -> None:
        o = self.options
        fz = self._residual(problem, state, "f at the initial guess")
        check_square(fz.numel(), state.z.numel(), o.method)
        norm = state.residual_norm
        eta, previous = (o.krylov_tol if o.krylov_tol is not None else EW_ETA0), None
        while norm > o.tol and state.iterations < o.max_iterations:
            if o.krylov_tol is None and previous is not None:
                eta = self._forcing(eta, norm, previous, o.tol)
            state.iterations += 1
            solved = self._krylov(problem, state.z, -fz, eta)
            if not bool(solved.x.any()):
                state.reason = solved.reason or "The linear solve gave no Newton step (δ = 0)"
                self._step(state, _entry(state.iterations, norm, solved.iterations, 0.0))
                return
            found = self._line_search(problem, state.z, solved.x, norm, eta)
            if found is None:
                state.reason = (
                    f"The line search found no sufficient decrease of ||F|| along Newton step "
                    f"{state.iterations} (its linear solve's residual: "
                    f"{solved.residual_norm:.3g}{'; ' + solved.reason if solved.reason else ''})"
                )
                self._step(state, _entry(state.iterations, norm, solved.iterations, 0.0))
                return
            t, state.z, fz, trial_norm = found
            previous, norm = norm, trial_norm
            state.residual_norm = norm
            self._step(state, _entry(state.iterations, norm, solved.iterations, t))
        state.converged = norm <= o.tol

    def _line_search(
        self, problem: Problem, z: torch.Tensor, delta: torch.Tensor, norm: float, eta: float
    ) -> tuple[float, torch.Tensor, torch.Tensor, float] | None:
        """(t, z + t δ, f there, ||f||) for the first t of 1, 1/2, 1/4, ... with sufficient
        decrease (NOTE [Newton-Krylov]), or None after LINE_SEARCH_STEPS halvings; without
        the line search t = 1, and a NaN there stops the solve."""
        t = 1.0
        for _ in range(LINE_SEARCH_STEPS + 1):
            trial = z + t * delta
            ft = problem.residual(trial)
            trial_norm = norm2(ft) if finite(ft) else math.inf
            if not self.options.line_search:
                if not math.isfinite(trial_norm):
                    raise Stopped("f is NaN or infinite after a full Newton step")
                return t, trial, ft, trial_norm
            if trial_norm <= (1 - ARMIJO * t * (1 - eta)) * norm:
                return t, trial, ft, trial_norm
            t *= 0.5
        return None

    @staticmethod
    def _forcing(eta: float, norm: float, previous: float, tol: float) -> float:
        new = EW_GAMMA * (norm / previous) ** EW_ALPHA
        safeguard = EW_GAMMA * eta**EW_ALPHA
        if safeguard > 0.1:
            new = max(new, safeguard)
        new = min(new, EW_ETA_MAX)
        finish = min(0.5 * tol / norm, EW_ETA_MAX)
        if new * norm <= EW_FINISH * tol:
            return finish  # the last step: to the tolerance, not past it nor one step short
        return max(new, finish)

    def _linear(self, problem: Problem, state: _State) -> None:
        """J δ = rhs at the primals; ``tol`` relative to ||rhs||."""
        assert self.rhs is not None
        z = state.z
        b = self.rhs.to(dtype=z.dtype, device=z.device)
        check_square(b.numel(), z.numel(), "linear")
        if not finite(b):
            raise Stopped("rhs is NaN or infinite")
        solved = self._krylov(problem, z, b, self.options.tol)
        state.iterations = 1
        state.z = z  # the primals stay; the answer is δ
        state.delta = solved.x
        state.residual_norm = solved.residual_norm
        state.converged = solved.converged
        if solved.reason is not None and not solved.converged:
            state.reason = solved.reason
        self._step(state, _entry(1, solved.residual_norm, solved.iterations, 1.0))

    # NOTE [Levenberg-Marquardt]
    # Gauss-Newton with Levenberg-Marquardt damping (Moré, "The Levenberg-Marquardt
    # algorithm", 1978, without scaling): each iteration solves
    # min ||J δ + F||² + μ² ||δ||² by LSMR (damp = μ), J·v by JVPs and Jᵀ·u by VJPs at the
    # current point. A step that lowers ||F|| is taken and μ shrinks tenfold (to 0: pure
    # Gauss-Newton); one that does not is refused (its iteration reported with step 0)
    # and μ grows tenfold (from 1e-3 ||Jᵀ F|| / ||F||). Converged: ||F|| <= tol, or
    # ||Jᵀ F|| <= tol (a stationary point with a nonzero residual).
    def _least_squares(self, problem: Problem, state: _State) -> None:
        o = self.options
        z = state.z
        fz = self._residual(problem, state, "f at the initial guess")
        norm = state.residual_norm
        mu, n = 0.0, z.numel()
        pullback, gradient = None, fz
        while norm > o.tol and state.iterations < o.max_iterations:
            if pullback is None:  # a new point (a refused step keeps the last one's)
                pullback = problem.vjp_at(z, self.source)
                gradient = pullback(fz)
                if not finite(gradient):
                    raise NonFinite("Jᵀ·F")
                if norm2(gradient) <= o.tol:  # a stationary point: nothing left to gain
                    state.converged = True
                    return
            state.iterations += 1
            solved = lsmr(
                partial(problem.jvp, z),
                pullback,
                -fz,
                n,
                damp=mu,
                atol=min(1e-10, o.tol),
                btol=min(1e-10, o.tol),
                maxiter=o.max_krylov,
            )
            trial = z + solved.x
            ft = problem.residual(trial)
            trial_norm = norm2(ft) if finite(ft) else math.inf
            if trial_norm < norm:
                z, fz, norm = trial, ft, trial_norm
                state.z, state.residual_norm = z, norm
                mu = mu / 10 if mu > 1e-12 else 0.0
                pullback = None
                self._step(state, _entry(state.iterations, norm, solved.iterations, 1.0))
            else:
                mu = mu * 10 if mu > 0 else 1e-3 * norm2(gradient) / max(norm, 1e-300)
                self._step(state, _entry(state.iterations, norm, solved.iterations, 0.0))
        state.converged = norm <= o.tol

    @staticmethod
    def _residual(problem: Problem, state: _State, where: str) -> torch.Tensor:
        fz = problem.residual(state.z)
        state.residual_norm = norm2(fz)
        if not finite(fz):
            raise Stopped(f"{where} is NaN or infinite")
        return fz


@dataclass
class _State:
    z: torch.Tensor
    iterations: int = 0
    residual_norm: float = math.inf
    converged: bool = False
    reason: str | None = None
    delta: torch.Tensor | None = None  # linear: the answer
    history: list[dict[str, Any]] = field(default_factory=list)

    def where(self) -> str:
        return f"iteration {self.iterations}" if self.iterations else "the start"


def _entry(iteration: int, norm: float, krylov: int, step: float) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "residual_norm": norm,
        "krylov_iterations": krylov,
        "step": step,
    }


def check_square(outputs: int, unknowns: int, method: str) -> None:
    """422 unless F has as many elements as the unknowns (newton_krylov, linear)."""
    if method != "least_squares" and outputs != unknowns:
        raise InvalidRequest(
            f"'{method}' needs a square system: f's output has {outputs} elements but the "
            f"unknowns have {unknowns}; use method 'least_squares' for a non-square one",
            param="unknowns",
        )

"""`SolveOperation` alone (no HTTP): its deadline check between products, its progress
callback, and the Eisenstat-Walker forcing term against the formula."""

from __future__ import annotations

import time

import pytest
import torch

from app.engine.errors import DeadlineExceeded
from app.engine.solve import (
    EW_ALPHA,
    EW_ETA_MAX,
    EW_FINISH,
    EW_GAMMA,
    SolveOperation,
    SolveOptions,
)
from app.engine.target import Materialized

F64 = torch.float64
CUBE = Materialized(fn=lambda a, s: (a[0] ** 3 - a[1],), parameters={}, buffers={})
POINT = (torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([8.0, 27.0], dtype=F64))


def operation(**kw: object) -> SolveOperation:
    return SolveOperation((0,), ("u",), SolveOptions(method="newton_krylov"), **kw)  # type: ignore[arg-type]


def test_solve_converges_and_reports_each_iteration_to_progress() -> None:
    seen: list[int] = []
    op = operation(progress=seen.append)
    outputs, (u,) = op(CUBE, POINT, (None, None), {})
    torch.testing.assert_close(u, torch.tensor([2.0, 3.0], dtype=F64), rtol=0, atol=1e-9)
    assert op.report()["converged"] is True
    assert seen == list(range(1, op.report()["iterations"] + 1))
    assert float(outputs[0].abs().max()) < 1e-8


def test_a_solve_past_its_deadline_stops_with_a_504() -> None:
    op = operation(deadline=time.monotonic() - 1.0)
    with pytest.raises(DeadlineExceeded, match='"operation": "solve"'):
        op(CUBE, POINT, (None, None), {})


def test_a_solve_within_its_deadline_is_not_stopped() -> None:
    op = operation(deadline=time.monotonic() + 60.0)
    op(CUBE, POINT, (None, None), {})
    assert op.report()["converged"] is True


@pytest.mark.parametrize(
    ("eta", "norm", "previous"),
    [(0.5, 1.0, 2.0), (0.9, 0.9, 1.0), (0.01, 1e-3, 1.0), (0.5, 1e-9, 1e-6), (0.003, 3e-3, 1.3)],
)
def test_forcing_term_is_eisenstat_walker_choice_2(
    eta: float, norm: float, previous: float
) -> None:
    tol = 1e-8
    got = SolveOperation._forcing(eta, norm, previous, tol)
    want = EW_GAMMA * (norm / previous) ** EW_ALPHA
    if EW_GAMMA * eta**EW_ALPHA > 0.1:
        want = max(want, EW_GAMMA * eta**EW_ALPHA)
    want, finish = min(want, EW_ETA_MAX), min(0.5 * tol / norm, EW_ETA_MAX)
    want = finish if want * norm <= EW_FINISH * tol else max(want, finish)
    assert got == pytest.approx(want)
    assert 0 < got <= EW_ETA_MAX


def test_the_last_newton_step_solves_to_half_the_tolerance() -> None:
    """Bratu's fifth step: EW's η = 4.8e-6 would leave ||F|| at about 1.5e-8 (> tol), and a
    sixth step would be needed; the step aims at 0.5 tol instead."""
    tol, norm, previous = 1e-8, 3.06e-3, 1.27
    ew = EW_GAMMA * (norm / previous) ** EW_ALPHA
    assert ew * norm > tol  # EW alone stops short of the tolerance
    assert SolveOperation._forcing(0.0027, norm, previous, tol) == 0.5 * tol / norm
    # Far from the tolerance the rule leaves EW's choice alone.
    assert SolveOperation._forcing(0.5, 1.0, 2.0, tol) == pytest.approx(EW_GAMMA * 0.25)

"""Every operator the fallbacks cover, in every argument, against float64 central differences.

The cases are generated from `FALLBACK_OPERATORS` (NOTE [fallback coverage]): a
tangent on each listed argument must give the listed method and the derivative
central differences give; a tangent on a refused argument must be a 501 naming
the operator. The igamma reproducer of issue 14 also goes through the HTTP
service as a repository model (a `torch.export` program), at two sizes, and is
checked against the closed form.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import mpmath
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn

from app.engine.derivatives import first_uncovered
from app.engine.errors import ForwardADUnsupported
from app.engine.fallback import FALLBACK_OPERATORS, decompose, jvp_with_fallback
from app.engine.jvp import ENGINES
from app.engine.target import Materialized
from tests.conftest import ROOT
from tests.models.conftest import INFERENCE, Loader, save_model
from tests.wire import from_wire, to_wire

D = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta:UserWarning")
Inputs = dict[str, torch.Tensor]


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(1414)


def _cdist() -> tuple[Callable[..., torch.Tensor], Inputs]:
    g = _g()
    return torch.cdist, {
        "x1": torch.randn(3, 4, generator=g, dtype=D),
        "x2": torch.randn(5, 4, generator=g, dtype=D),
    }


def _euclidean() -> tuple[Callable[..., torch.Tensor], Inputs]:
    g = _g()  # more than 25 rows: cdist takes the |x|**2 + |y|**2 - 2 x.y form
    return torch.cdist, {
        "x1": torch.randn(30, 4, generator=g, dtype=D),
        "x2": torch.randn(27, 4, generator=g, dtype=D),
    }


def _pdist() -> tuple[Callable[..., torch.Tensor], Inputs]:
    return F.pdist, {"input": torch.randn(5, 3, generator=_g(), dtype=D)}


def _embedding_bag() -> tuple[Callable[..., torch.Tensor], Inputs]:
    indices, offsets = torch.tensor([1, 2, 4, 4, 3, 0]), torch.tensor([0, 2, 5])
    g = _g()

    def fn(weight: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(
            indices, weight, offsets, mode="sum", per_sample_weights=per_sample_weights
        )

    return fn, {
        "weight": torch.randn(6, 3, generator=g, dtype=D),
        "per_sample_weights": torch.rand(6, generator=g, dtype=D),
    }


def _grid_sample(dims: int) -> Callable[[], tuple[Callable[..., torch.Tensor], Inputs]]:
    def make() -> tuple[Callable[..., torch.Tensor], Inputs]:
        g = _g()
        size = (1, 2, *([4] * dims))
        grid = torch.rand(1, *([3] * dims), dims, generator=g, dtype=D) * 1.6 - 0.8

        def fn(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return F.grid_sample(input, grid, align_corners=False)

        return fn, {"input": torch.randn(size, generator=g, dtype=D), "grid": grid}

    return make


def _multi_margin() -> tuple[Callable[..., torch.Tensor], Inputs]:
    target = torch.tensor([1, 0, 3])
    return (
        lambda self: F.multi_margin_loss(self, target),
        {"self": torch.randn(3, 4, generator=_g(), dtype=D)},
    )


def _multilabel_margin() -> tuple[Callable[..., torch.Tensor], Inputs]:
    target = torch.tensor([[1, 0, -1, 2], [3, -1, 0, 0], [2, 3, 1, -1]])
    return (
        lambda self: F.multilabel_margin_loss(self, target),
        {"self": torch.randn(3, 4, generator=_g(), dtype=D)},
    )


def _incomplete_gamma(op: Callable[..., torch.Tensor]) -> Callable[[], tuple[Callable, Inputs]]:
    def make() -> tuple[Callable[..., torch.Tensor], Inputs]:
        g = _g()
        return op, {
            "self": torch.rand(6, generator=g, dtype=D) * 3 + 0.5,
            "other": torch.rand(6, generator=g, dtype=D) * 4 + 0.1,
        }

    return make


def _index_reduce() -> tuple[Callable[..., torch.Tensor], Inputs]:
    index = torch.tensor([0, 2, 0, 3])
    g = _g()

    def fn(self: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.index_reduce(0, index, source, "amax")

    return fn, {
        "self": torch.randn(5, 3, generator=g, dtype=D),
        "source": torch.randn(4, 3, generator=g, dtype=D),
    }


def _segment_reduce() -> tuple[Callable[..., torch.Tensor], Inputs]:
    lengths = torch.tensor([2, 1, 3])
    return (
        lambda data: torch.segment_reduce(data, "sum", lengths=lengths),
        {"data": torch.rand(6, generator=_g(), dtype=D)},
    )


def _ctc() -> tuple[Callable[..., torch.Tensor], Inputs]:
    targets, lengths, target_lengths = torch.tensor([[1, 2]]), torch.tensor([5]), torch.tensor([2])
    return (
        lambda log_probs: F.ctc_loss(log_probs, targets, lengths, target_lengths),
        {"log_probs": torch.randn(5, 1, 4, generator=_g(), dtype=D).log_softmax(-1)},
    )


MAKERS: dict[str, Callable[[], tuple[Callable[..., torch.Tensor], Inputs]]] = {
    "_cdist_forward": _cdist,
    "_euclidean_dist": _euclidean,
    "_pdist_forward": _pdist,
    "_embedding_bag": _embedding_bag,
    "grid_sampler_2d": _grid_sample(2),
    "grid_sampler_3d": _grid_sample(3),
    "multi_margin_loss": _multi_margin,
    "multilabel_margin_loss_forward": _multilabel_margin,
    "igamma": _incomplete_gamma(torch.igamma),
    "igammac": _incomplete_gamma(torch.igammac),
    "index_reduce": _index_reduce,
    "segment_reduce": _segment_reduce,
    "_ctc_loss": _ctc,
}

ANSWERED = [(op, arg) for op, c in FALLBACK_OPERATORS.items() for arg in c.arguments]
REFUSED = [(op, arg) for op, c in FALLBACK_OPERATORS.items() for arg in c.refused]


def _target(fn: Callable[..., torch.Tensor]) -> Materialized:
    return Materialized(fn=lambda args, state: (fn(*args),), parameters={}, buffers={})


def _central_difference(
    fn: Callable[..., torch.Tensor], inputs: Inputs, arg: str, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    plus = fn(*{**inputs, arg: inputs[arg] + eps * v}.values())
    minus = fn(*{**inputs, arg: inputs[arg] - eps * v}.values())
    return (plus - minus) / (2 * eps)


def test_every_listed_operator_has_a_case() -> None:
    assert set(MAKERS) == set(FALLBACK_OPERATORS)


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize(("operator", "arg"), ANSWERED)
def test_fallback_matches_central_differences_in_each_argument(
    operator: str, arg: str, engine: str
) -> None:
    fn, inputs = MAKERS[operator]()
    names = list(inputs)
    v = torch.randn(inputs[arg].shape, generator=torch.Generator().manual_seed(7), dtype=D)
    tangents = tuple(v if name == arg else None for name in names)

    outputs, jvps, method = jvp_with_fallback(
        ENGINES[engine], _target(fn), tuple(inputs.values()), tangents, {}
    )

    assert method == FALLBACK_OPERATORS[operator].method
    torch.testing.assert_close(outputs[0], fn(*inputs.values()))
    want = _central_difference(fn, inputs, arg, v)
    assert want.abs().max() > 1e-3  # the derivative is not zero there: a zero JVP would fail
    torch.testing.assert_close(jvps[0], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize(("operator", "arg"), REFUSED)
def test_fallback_refuses_an_argument_without_a_derivative(
    operator: str, arg: str, engine: str
) -> None:
    fn, inputs = MAKERS[operator]()
    tangents = tuple(torch.ones_like(x) if name == arg else None for name, x in inputs.items())
    with pytest.raises(ForwardADUnsupported, match=f"Operator {operator} has no forward-AD"):
        jvp_with_fallback(ENGINES[engine], _target(fn), tuple(inputs.values()), tangents, {})


def test_an_operator_outside_the_list_is_refused_at_once() -> None:
    # ormqr has no forward-AD formula and is not listed: a 501 naming it, no fallback tried.
    g = _g()
    a, tau, c = (torch.randn(4, 3, generator=g, dtype=D) for _ in range(3))
    tau = tau[0]

    def fn(a: torch.Tensor, tau: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.ormqr(a, tau, c)

    with pytest.raises(ForwardADUnsupported, match="no fallback is tested for it"):
        jvp_with_fallback(ENGINES["dual"], _target(fn), (a, tau, c), (None, None, c), {})


def test_igamma_decomposition_is_refused_by_the_coverage_check() -> None:
    # The decomposition ends in prims.igamma, which forward AD treats as a constant:
    # the check refuses it, so the answer comes from the double-VJP instead.
    fn, inputs = MAKERS["igamma"]()
    _, graph = decompose(_target(fn), tuple(inputs.values()), {"igamma"})
    gap = first_uncovered(graph.graph, [1])
    assert gap is not None and gap.operator == "prims.igamma"
    assert first_uncovered(graph.graph, []) is None  # no tangent: nothing to drop


# --- the reproducer through the service: a repository model ------------------------------


class IncompleteGamma(nn.Module):
    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.igamma(a, x)


def _closed_form(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d/dx P(a, x) = x**(a-1) exp(-x) / Gamma(a), in float64 with lgamma."""
    return torch.exp((a - 1) * torch.log(x) - x - torch.lgamma(a))


def _post(client: TestClient, primals: Inputs, tangents: Inputs, engine: str) -> dict:
    r = client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": "igamma",
            "primals": {k: to_wire(v, "b64") for k, v in primals.items()},
            "tangents": {k: to_wire(v, "b64") for k, v in tangents.items()},
            "options": {"dtype": "float64", "encoding": "b64", "engine": engine},
        },
    )
    return {"status": r.status_code, **r.json()}


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("n", [6, 70_000])
def test_igamma_model_jvp_in_x_is_the_closed_form_and_in_a_is_501(
    repo: Path, keyed_client: TestClient, load: Loader, n: int, engine: str
) -> None:
    save_model(
        repo,
        "igamma",
        IncompleteGamma(),
        (torch.rand(4) + 1, torch.rand(4)),
        dynamic_shapes={"a": {0: torch.export.Dim("n")}, "x": {0: torch.export.Dim("n")}},
    )
    load("igamma")
    g = _g()
    a = torch.rand(n, generator=g, dtype=D) * 4 + 0.25
    x = torch.rand(n, generator=g, dtype=D) * 6 + 1e-3
    a[:3] = torch.tensor([1.0, 2.5, 0.5], dtype=D)  # edge points: exp(-x), a > 1, a < 1
    x[:3] = torch.tensor([1.0, 10.0, 1e-3], dtype=D)
    v = torch.randn(n, generator=g, dtype=D)

    body = _post(keyed_client, {"a": a, "x": x}, {"x": v}, engine)

    assert body["status"] == 200, body
    assert body["method"] == "double_vjp"
    got = from_wire(body["jvp"])
    torch.testing.assert_close(got, _closed_form(a, x) * v, rtol=1e-12, atol=0)
    # Three points against mpmath's independent incomplete-gamma derivative.
    for i in range(3):
        ai, xi = float(a[i]), float(x[i])
        want = mpmath.diff(lambda t, ai=ai: mpmath.gammainc(ai, 0, t, regularized=True), xi)
        assert math.isclose(float(got[i]), float(want) * float(v[i]), rel_tol=1e-12)

    body = _post(keyed_client, {"a": a, "x": x}, {"a": v}, engine)

    assert body["status"] == 501, body
    assert body["error"]["type"] == "forward_ad_unsupported"
    assert "Operator igamma" in body["error"]["message"]


def test_readme_lists_exactly_the_covered_operators_and_arguments() -> None:
    text = (ROOT / "README.md").read_text().split("<!-- fallbacks:", 1)[1]
    lines = text.splitlines()[1:]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines))[2:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip()[1:-1].split("|")]
        op = cells[0].split("`")[1]
        answered = tuple(a.split("`")[1] for a in cells[2].split(",") if "`" in a)
        refused = tuple(a.split("`")[1] for a in cells[3].split(",") if "`" in a)
        table[op] = (cells[1].strip("`") or None, answered, refused)
    want = {
        op: (c.method if c.arguments else None, c.arguments, c.refused)
        for op, c in FALLBACK_OPERATORS.items()
    }
    assert table == want


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize(("op", "sign"), [(torch.igamma, 1.0), (torch.igammac, -1.0)])
def test_incomplete_gamma_above_65536_elements_is_the_closed_form(
    op: Callable[..., torch.Tensor], sign: float, engine: str
) -> None:
    g = _g()
    n = 70_000
    a = torch.rand(n, generator=g, dtype=D) * 4 + 0.25
    x = torch.rand(n, generator=g, dtype=D) * 6 + 1e-3
    v = torch.randn(n, generator=g, dtype=D)

    outputs, jvps, method = jvp_with_fallback(ENGINES[engine], _target(op), (a, x), (None, v), {})

    assert method == "double_vjp"
    torch.testing.assert_close(outputs[0], op(a, x), rtol=0, atol=0)
    torch.testing.assert_close(jvps[0], sign * _closed_form(a, x) * v, rtol=1e-12, atol=0)
    with pytest.raises(ForwardADUnsupported, match=f"Operator {op.__name__} has no"):
        jvp_with_fallback(ENGINES[engine], _target(op), (a, x), (v, None), {})

"""Concurrency: many clients against a live uvicorn server, every answer its own.

See NOTE [one dual level per process] in app/engine/worker.py.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable

import httpx
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import jvp

from tests.conftest import LiveServer
from tests.wire import from_wire, to_wire

CLIENTS = 32
REQUESTS = 2000

# Expressions and their references, written directly in torch (independent of the compiler).
EXPRESSIONS: dict[str, Callable[..., torch.Tensor]] = {
    "x**2 + y**2": lambda x, y: x**2 + y**2,
    "sin(x) * exp(y)": lambda x, y: torch.sin(x) * torch.exp(y),
    "tanh(x @ y)": lambda x, y: torch.tanh(x @ y),
    "sum(sigmoid(x) * y, -1)": lambda x, y: (torch.sigmoid(x) * y).sum(-1),
}


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(5, 5).double()
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).double()
    return {"linear": linear, "mlp": mlp}


def _cases(n: int) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """n requests with distinct random inputs, each with its reference (output, jvp)."""
    rng = random.Random(1234)
    g = torch.Generator().manual_seed(1234)
    models = _models()
    cases = []
    for i in range(n):
        engine = rng.choice(["dual", "functional"])
        options = {"dtype": "float64", "engine": engine, "encoding": "b64"}
        if i % 3 == 2:
            name = rng.choice(sorted(models))
            width = 5 if name == "linear" else 64
            x = torch.randn(rng.randint(1, 4), width, generator=g, dtype=torch.float64)
            v = torch.randn(x.shape, generator=g, dtype=torch.float64)
            with torch.no_grad():
                out, ref = jvp(models[name], (x,), (v,))
            body = {
                "model": name,
                "primals": {"x": to_wire(x, "b64")},
                "tangents": {"x": to_wire(v, "b64")},
            }
        else:
            source = rng.choice(sorted(EXPRESSIONS))
            n_ = rng.randint(2, 6)
            x, y, vx, vy = (torch.randn(n_, n_, generator=g, dtype=torch.float64) for _ in range(4))
            out, ref = jvp(EXPRESSIONS[source], (x, y), (vx, vy))
            body = {
                "expression": source,
                "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
                "tangents": {"x": to_wire(vx, "b64"), "y": to_wire(vy, "b64")},
            }
        body["options"] = options
        cases.append((body, out.detach(), ref.detach()))
    return cases


def test_concurrent_clients_each_get_their_own_result(live_server: LiveServer) -> None:
    # References are computed here, before any thread starts: reference JVPs in
    # several threads at once would themselves collide on the dual level.
    cases = _cases(REQUESTS)
    work: queue.Queue[int] = queue.Queue()
    for i in range(len(cases)):
        work.put(i)
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=live_server.url, timeout=60) as http:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                body, want_out, want_jvp = cases[i]
                r = http.post("/jvp", json=body)
                problem = None
                if r.status_code != 200:
                    problem = f"request {i}: {r.status_code} {r.text[:200]}"
                else:
                    got = r.json()
                    out, jv = from_wire(got["output"]), from_wire(got["jvp"])
                    if out.shape != want_out.shape or not torch.allclose(
                        out, want_out, rtol=1e-12, atol=1e-12
                    ):
                        problem = f"request {i}: wrong output"
                    elif not torch.allclose(jv, want_jvp, rtol=1e-12, atol=1e-12):
                        problem = f"request {i}: wrong jvp"
                with lock:
                    done[0] += 1
                    if problem:
                        failures.append(problem)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert done[0] == REQUESTS
    assert failures == [], failures[:10]


def test_naive_design_two_threads_in_dual_levels_fail() -> None:
    """Why the engine has one worker per device: the dual level is per process.

    Thread A holds a dual level open (as a request computing would); thread B,
    entering its own, fails. A web app running forward AD in its thread pool
    hits exactly this under load.
    """
    entered, release = threading.Event(), threading.Event()
    errors: list[str] = []

    def a() -> None:
        with fwAD.dual_level():
            entered.set()
            release.wait(10)

    def b() -> None:
        entered.wait(10)
        try:
            with fwAD.dual_level():
                pass
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            release.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors and "Nested forward mode AD is not supported" in errors[0]

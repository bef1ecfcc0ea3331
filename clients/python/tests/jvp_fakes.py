"""Fakes of the JVP service for tests that need no server: ``httpx.MockTransport`` handlers.

The fakes write tensors with their own small encoder (not the client's), so a
round trip through them checks the client against API.md rather than itself.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

#: The repository root: it holds the server package `app/` that the live tests import.
REPO_ROOT = Path(__file__).resolve().parents[3]

_NP = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}


def wire_to_numpy(t: Any) -> np.ndarray:
    """A request tensor (any form of API.md) as float64, independently of the client."""

    def num(v: Any) -> Any:
        if isinstance(v, list):
            return [num(x) for x in v]
        if isinstance(v, str):
            return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[v]
        return float(v)

    if not isinstance(t, dict):
        return np.array(num(t), dtype=np.float64)
    if "b64" in t:
        raw = base64.b64decode(t["b64"])
        if t["dtype"] == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(t["shape"])
        return np.frombuffer(raw, dtype=_NP[t["dtype"]]).astype(np.float64).reshape(t["shape"])
    return np.array(num(t["data"]), dtype=np.float64).reshape(t["shape"])


def numpy_to_wire(a: np.ndarray, dtype: str, encoding: str) -> dict[str, Any]:
    """A response tensor: form 2 (``json``) or form 3 (``b64``)."""
    a = np.asarray(a, dtype=np.float64)
    if encoding == "b64":
        if dtype == "bfloat16":
            bits = (a.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
            raw = bits.tobytes()
        else:
            raw = a.astype(_NP[dtype]).tobytes()
        return {"shape": list(a.shape), "dtype": dtype, "b64": base64.b64encode(raw).decode()}

    def jnum(v: float) -> Any:
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v

    return {"shape": list(a.shape), "dtype": dtype, "data": [jnum(v) for v in a.ravel().tolist()]}


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.Response(
        status,
        json={"error": {"type": type_, "message": message, "param": param}},
        headers=headers,
    )


# Expressions the fake knows: name -> (f, jvp); a tuple means several outputs.
EXPRESSIONS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "x**2 + y**2": (
        lambda p: p["x"] ** 2 + p["y"] ** 2,
        lambda p, t: 2 * p["x"] * t["x"] + 2 * p["y"] * t["y"],
    ),
    "x * 2": (lambda p: p["x"] * 2, lambda p, t: t["x"] * 2),
    "(sin(x), cos(x))": (
        lambda p: (np.sin(p["x"]), np.cos(p["x"])),
        lambda p, t: (np.cos(p["x"]) * t["x"], -np.sin(p["x"]) * t["x"]),
    ),
}


def compute_jvp(body: dict[str, Any]) -> httpx.Response:
    """The fake's POST /jvp (also used for job tasks)."""
    expr = body.get("expression")
    if expr not in EXPRESSIONS:
        return error_response(
            400, "invalid_expression", f"Unknown expression {expr!r}", "expression"
        )
    options = body.get("options") or {}
    dtype = options.get("dtype", "float32")
    encoding = options.get("encoding", "json")
    primals = {k: wire_to_numpy(v) for k, v in body["primals"].items()}
    tangents = {k: np.zeros_like(v) for k, v in primals.items()}
    for k, v in (body.get("tangents") or {}).items():
        tangents[k] = wire_to_numpy(v)
    f, df = EXPRESSIONS[expr]
    out, jvp = f(primals), df(primals, tangents)
    if isinstance(out, tuple):
        out_w: Any = [numpy_to_wire(o, dtype, encoding) for o in out]
        jvp_w: Any = [numpy_to_wire(o, dtype, encoding) for o in jvp]
    else:
        out_w, jvp_w = numpy_to_wire(out, dtype, encoding), numpy_to_wire(jvp, dtype, encoding)
    return httpx.Response(
        200,
        json={
            "output": out_w,
            "jvp": jvp_w,
            "dtype": dtype,
            "device": "cpu",
            "engine": options.get("engine", "dual"),
            "method": "forward",
            "timing_ms": {"queue": 0.01, "compute": 0.2, "total": 0.5},
        },
    )


@dataclass
class Recorder:
    """A MockTransport handler that records requests and answers from a script or a function."""

    handler: Callable[[httpx.Request], httpx.Response]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def fake_service(request: httpx.Request) -> httpx.Response:
    """A fake of the stateless routes: /jvp, /models, /healthz, /readyz."""
    path = request.url.path
    if path == "/jvp" and request.method == "POST":
        return compute_jvp(json.loads(request.content))
    if path == "/models":
        return httpx.Response(200, json={"models": [LINEAR_INFO]})
    if path == "/models/linear":
        return httpx.Response(200, json=LINEAR_INFO)
    if path.startswith("/models/"):
        return error_response(
            404, "not_found", f"Unknown model {path.rsplit('/', 1)[1]!r}", "model"
        )
    if path == "/healthz":
        return httpx.Response(200, json={"status": "ok"})
    if path == "/readyz":
        return httpx.Response(200, json={"status": "ready"})
    return error_response(404, "not_found", f"No route {path}")


LINEAR_INFO = {
    "name": "linear",
    "description": "nn.Linear(5, 5)",
    "source": "builtin",
    "inputs": [{"name": "x", "shape": [-1, 5], "dtype": "float32"}],
    "outputs": 1,
    "parameters": [
        {"name": "weight", "shape": [5, 5], "dtype": "float32"},
        {"name": "bias", "shape": [5], "dtype": "float32"},
    ],
    "buffers": [],
}


class FakeJobs:
    """A fake of API.md's batch jobs: each GET /jobs/{id} finishes ``per_poll`` more tasks.

    Tasks whose expression is unknown end in error, as on the service.
    """

    def __init__(self, *, per_poll: int = 2) -> None:
        self.per_poll = per_poll
        self.jobs: dict[str, dict[str, Any]] = {}
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.bodies: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}
        self.requests: list[httpx.Request] = []

    def _job(self, job_id: str) -> dict[str, Any]:
        return dict(self.jobs[job_id])

    def _advance(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job["status"] in ("completed", "cancelled"):
            return
        body = self.bodies[job_id]
        job["status"] = "running"
        for _ in range(self.per_poll):
            i = job["done"]
            if i >= job["total"]:
                break
            task = dict(body["tasks"][i])
            task.setdefault("expression", body.get("expression"))
            task["options"] = {**(body.get("options") or {}), **(task.get("options") or {})}
            response = compute_jvp(task)
            data = json.loads(response.content)
            if response.status_code == 200:
                self.results[job_id].append(
                    {"index": i, "output": data["output"], "jvp": data["jvp"]}
                )
            else:
                self.results[job_id].append({"index": i, "error": data["error"]})
                job["failed"] += 1
            job["done"] += 1
        if job["done"] >= job["total"]:
            job["status"] = "completed"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if parts[0] != "jobs":
            return fake_service(request)
        if len(parts) == 1 and request.method == "POST":
            key = request.headers.get("idempotency-key")
            if key in self.keys:
                return httpx.Response(202, json=self._job(self.keys[key]))
            body = json.loads(request.content)
            job_id = f"job-{len(self.jobs) + 1}"
            self.jobs[job_id] = {
                "id": job_id,
                "status": "queued",
                "total": len(body["tasks"]),
                "done": 0,
                "failed": 0,
                "created_at": "2025-01-01T00:00:00Z",
                "updated_at": "2025-01-01T00:00:00Z",
            }
            self.bodies[job_id], self.results[job_id] = body, []
            if key:
                self.keys[key] = job_id
            return httpx.Response(202, json=self._job(job_id))
        job_id = parts[1]
        if job_id not in self.jobs:
            return error_response(404, "not_found", f"Unknown job {job_id!r}", "id")
        if len(parts) == 2 and request.method == "GET":
            self._advance(job_id)
            return httpx.Response(200, json=self._job(job_id))
        if len(parts) == 2 and request.method == "DELETE":
            job = self.jobs[job_id]
            if job["status"] != "completed":
                job["status"] = "cancelled"
            return httpx.Response(200, json=self._job(job_id))
        if len(parts) == 3 and parts[2] == "results":
            offset = int(request.url.params.get("offset", 0))
            limit = int(request.url.params.get("limit", 100))
            done = self.results[job_id]
            page = done[offset : offset + limit]
            nxt = offset + limit if offset + limit < self.jobs[job_id]["total"] else None
            if nxt is not None and nxt > len(done) and self.jobs[job_id]["status"] != "running":
                nxt = None
            return httpx.Response(200, json={"results": page, "next_offset": nxt})
        return error_response(404, "not_found", f"No route {request.url.path}")

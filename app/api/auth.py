"""API keys as ``Authorization: Bearer <key>``, compared in constant time.

With ``JVP_API_KEYS`` set, every route but /healthz and /readyz needs a key;
admin routes need one of ``JVP_ADMIN_KEYS`` (an inference key gets 403). An
admin key also works on inference routes.

A route says which check it needs by its dependencies (`KeyDep`, `AdminDep`);
`guard_for` reads that declaration so that `app.api.middleware.KeyFirstMiddleware`
runs the same check from the headers alone, before anything reads the body
(NOTE [the key before the body] in app/api/middleware.py).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.routing import compile_path

from app.api.errors import Forbidden, Unauthorized
from app.settings import Settings


def _matches(key: str, keys: list[str]) -> bool:
    # Check every key (no early exit) so timing says nothing about which matched.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def require_key(request: Request) -> None:
    # async: FastAPI runs a plain-def dependency in a thread, a hop on every request.
    """Inference routes: with JVP_API_KEYS set, an inference or an admin key."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    key = _bearer(request)
    if key is None:
        raise Unauthorized("This service needs an API key: send 'Authorization: Bearer <key>'")
    if not _matches(key, settings.api_keys + settings.admin_keys):
        raise Unauthorized("The API key is not valid")


async def require_admin(request: Request) -> None:
    """Admin routes: an admin key, always (with no admin keys configured, nobody is admin)."""
    settings: Settings = request.app.state.settings
    key = _bearer(request)
    if key is None:
        raise Unauthorized("This route needs an admin key: send 'Authorization: Bearer <key>'")
    if _matches(key, settings.admin_keys):
        return
    if _matches(key, settings.api_keys):
        raise Forbidden("This route needs an admin key; an inference key is not enough")
    raise Unauthorized("The API key is not valid")


async def require_metrics_key(request: Request) -> None:
    """GET /metrics: as inference routes, unless JVP_METRICS_PUBLIC opens it."""
    settings: Settings = request.app.state.settings
    if not settings.metrics_public:
        await require_key(request)


async def require_docs_key(request: Request) -> None:
    """/docs and /redoc (not the schema): as inference routes, unless JVP_DOCS_PUBLIC opens
    them (app/api/routes/docs.py)."""
    settings: Settings = request.app.state.settings
    if not settings.docs_public:
        await require_key(request)


KeyDep = Annotated[None, Depends(require_key)]
AdminDep = Annotated[None, Depends(require_admin)]
MetricsKeyDep = Annotated[None, Depends(require_metrics_key)]
DocsKeyDep = Annotated[None, Depends(require_docs_key)]


Guard = Callable[[Request], Awaitable[None]]


# strictest first
GUARDS: tuple[Guard, ...] = (require_admin, require_key, require_metrics_key, require_docs_key)


def declared_guard(dependant: object) -> Guard | None:
    """The key check a route declares among its dependencies (the strictest of `GUARDS`),
    or None for an open route."""
    found: set[Guard] = set()
    stack = [dependant]
    while stack:
        d = stack.pop()
        call = getattr(d, "call", None)
        if call in GUARDS:
            found.add(call)
        stack.extend(getattr(d, "dependencies", []))
    return next((g for g in GUARDS if g in found), None)


_GuardTable = list[tuple[re.Pattern[str], frozenset[str], Guard]]


def _guard_table(app: Any) -> _GuardTable:
    cached: _GuardTable | None = getattr(app.state, "_route_guards", None)
    if cached is not None:
        return cached
    from fastapi import routing

    routes = app.routes
    # FastAPI >= 0.12x wraps included routers; iter_route_contexts unwraps them.
    contexts = (
        routing.iter_route_contexts(routes) if hasattr(routing, "iter_route_contexts") else routes
    )
    table: _GuardTable = []
    for route in contexts:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        guard = declared_guard(getattr(route, "dependant", None))
        if path and methods and guard is not None:
            table.append((compile_path(path)[0], frozenset(methods), guard))
    app.state._route_guards = table
    return table


def guard_for(app: Any, method: str, path: str) -> Guard | None:
    """The key check of the route that will serve ``method path``, or None."""
    for regex, methods, guard in _guard_table(app):
        if method in methods and regex.fullmatch(path):
            return guard
    return None

"""POST /jvp straight to its handler, past FastAPI's application, middleware and router.

# NOTE [POST /jvp past the framework]
A small JVP costs the engine well under 100 µs; FastAPI's layers around a route
(its telemetry check, Starlette's error middleware, the exception and exit-stack
middlewares, the router and its included-router wrappers, the dependency
solver) added about as much again to every request on this project's 2-core
machine (measured in process on a 10x10 request: 353 µs per request through the
route against 200 µs for the handler's own work). So `JVPApp` hands ``POST /jvp``
to a short stack of its own: the same request-id/metrics, key and body-limit
middlewares as every other route (app/api/middleware.py), then `JVPEndpoint`, which
calls the route's handler (`app.api.routes.jvp.answer_jvp`) and maps its errors with
the app's one mapping (app/api/errors.py), the unexpected ones to the same logged 500.
Everything else, and the OpenAPI description of /jvp, stays with FastAPI; with
``JVP_OPENTELEMETRY`` on, /jvp goes through FastAPI too, so its spans are kept.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import jvp_service
from app.api.errors import handled_response, unexpected_response
from app.api.routes.jvp import JVP_PATH, answer_jvp


def _is_post_jvp(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == JVP_PATH


class JVPEndpoint:
    """The ASGI app at the bottom of the /jvp stack: handler, then the error mapping."""

    def __init__(self) -> None:
        self._route: Any = None

    def _jvp_route(self, app: FastAPI) -> Any:
        # The route object the router would have put in the scope: metrics label by it.
        if self._route is None:
            from fastapi import routing

            routes = app.routes
            found = (
                routing.iter_route_contexts(routes)
                if hasattr(routing, "iter_route_contexts")
                else routes
            )
            self._route = next(
                r
                for r in found
                if getattr(r, "path", None) == JVP_PATH and "POST" in getattr(r, "methods", ())
            )
        return self._route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self._jvp_route(scope["app"])
        request = Request(scope, receive, send)
        try:
            response = await answer_jvp(request, await jvp_service(request))
        except Exception as exc:  # noqa: BLE001 - mapped as the app's handlers map it
            response = handled_response(request, exc) or unexpected_response(request, exc)
            # The traceback's frames hold the request's tensors and the engine's future,
            # which holds the error: a cycle that only the garbage collector would free,
            # some time later. Cut it (NOTE [free on out-of-memory] in app/engine/worker.py).
            exc.__traceback__ = None
        await response(scope, receive, send)


class JVPApp(FastAPI):
    """FastAPI, except that ``POST /jvp`` goes to `jvp_stack` when one is set (NOTE [POST
    /jvp past the framework])."""

    jvp_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.jvp_stack is not None and not self.root_path and _is_post_jvp(scope):
            scope["app"] = self
            await self.jvp_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

"""The OpenAPI schema and its viewers: /openapi.json, /docs, /redoc.

They need a key when API keys are on, like every route but /healthz and
/readyz (API.md "Service"): fetch the schema with
``curl -H 'Authorization: Bearer <key>' .../openapi.json``. Without keys they
are open, as FastAPI serves them by default.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse

from app.api.auth import KeyDep

router = APIRouter(include_in_schema=False)

OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root


@router.get(OPENAPI_URL)
async def read_openapi(request: Request, _: KeyDep) -> JSONResponse:
    """The OpenAPI schema of this service."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def read_docs(request: Request, _: KeyDep) -> HTMLResponse:
    """Swagger UI."""
    return get_swagger_ui_html(
        openapi_url=_root(request) + OPENAPI_URL,
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=_root(request) + OAUTH2_REDIRECT_URL,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def read_docs_redirect(_: KeyDep) -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def read_redoc(request: Request, _: KeyDep) -> HTMLResponse:
    """ReDoc."""
    return get_redoc_html(
        openapi_url=_root(request) + OPENAPI_URL, title=f"{request.app.title} - ReDoc"
    )

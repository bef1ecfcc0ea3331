"""The OpenAPI schema and its viewers: /openapi.json, /docs (Swagger UI), /redoc (ReDoc).

The viewers' scripts and styles are served by this service itself, from the files the
`fastapi-offline` package ships, so the pages render on a machine without internet
(NOTE [docs offline]). The schema declares the Bearer scheme (``securitySchemes``) on
every route that checks a key, so Swagger UI's Authorize button sends it.

Keys: with ``JVP_API_KEYS`` set these routes need a key, like every route but /healthz
and /readyz (API.md "Service"); ``JVP_DOCS_PUBLIC=true`` serves the two pages (and their
assets) without one, and the page then asks for a key before it fetches the schema, which
stays behind the key (NOTE [docs behind a key]).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.api.auth import GUARDS, DocsKeyDep, KeyDep, declared_guard

# NOTE [docs offline]
# FastAPI's default /docs and /redoc pages load Swagger UI and ReDoc from a CDN (and ReDoc's
# fonts from Google Fonts): on a machine without internet the browser gets a blank page and
# never even asks for /openapi.json. The assets come from `fastapi-offline` instead, chosen
# over `swagger-ui-bundle` because it ships both viewers (swagger-ui-bundle has no ReDoc), its
# Swagger UI is a 5.x release, which renders OpenAPI 3.1 (the version FastAPI writes; the
# Swagger UI 4.15 of swagger-ui-bundle 1.1.0 says "Unable to render this definition"), and it
# is kept up (1.7.7, June 2026, against November 2023). Only its static folder is used: the
# pages are this module's own, for the key handling below. No font, script or style
# is asked of another host (tests/test_docs_browser.py checks every request a real Chromium
# makes).
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS_URL = "/docs/assets"
OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
BEARER = "bearer"  # the name of the scheme in components.securitySchemes

# The pages may load only from this service. ReDoc's sidebar shows a logo from its vendor's
# CDN; this policy has the browser refuse it without sending anything (the image hides
# itself on the error). Inline script: the page's own (`_PAGE`); blob: ReDoc's search worker.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'self'"
)

router = APIRouter(include_in_schema=False)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the Bearer scheme on every operation whose route checks a key
    (required with keys on, optional without), and the 415 of every operation that takes a
    body."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    schema.setdefault("components", {})["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "A key of JVP_API_KEYS (JVP_ADMIN_KEYS for model management), "
            "needed when the service has keys.",
        }
    }
    # With keys off the key is optional ({} : no scheme also works), as the service answers.
    settings = getattr(app.state, "settings", None)
    keys_on = bool(settings and (settings.api_keys or settings.admin_keys))
    security: list[dict[str, list[str]]] = [{BEARER: []}] if keys_on else [{BEARER: []}, {}]
    from fastapi import routing

    # FastAPI >= 0.12x wraps included routers; iter_route_contexts unwraps them (app/api/auth.py).
    unwrap = getattr(routing, "iter_route_contexts", None)
    for route in unwrap(app.routes) if unwrap else app.routes:
        guard = declared_guard(getattr(route, "dependant", None))
        operations = schema["paths"].get(getattr(route, "path", None) or "", {})
        if guard not in GUARDS:
            continue
        for method in getattr(route, "methods", ()) or ():
            operation = operations.get(method.lower())
            if operation is not None:
                operation["security"] = security
    for operations in schema["paths"].values():
        for operation in operations.values():
            if "requestBody" in operation:  # every body route answers a 415 (app/api/body.py)
                operation.setdefault("responses", {}).setdefault("415", _UNSUPPORTED_MEDIA)
    app.openapi_schema = schema
    return schema


_UNSUPPORTED_MEDIA = {
    "description": "Unsupported Media Type: a body that is not application/json",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def install(app: FastAPI) -> None:
    """The docs routes, their assets, and `openapi_schema` as ``app.openapi``."""
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    app.include_router(router)


@router.get(OPENAPI_URL)
async def read_openapi(request: Request, _: KeyDep) -> JSONResponse:
    """The OpenAPI schema of this service."""
    return JSONResponse(request.app.openapi())


# NOTE [docs behind a key]
# A browser cannot add an Authorization header to the page it opens, nor to the schema a
# viewer fetches by URL. So each page fetches the schema itself: without a key first (keys
# off, or a proxy that adds one), and on a 401 it shows a key field, fetches the schema with
# that key (the 401's message is shown for a wrong one) and hands the schema to the viewer
# as an object. Swagger UI is then pre-authorized with the same key (Authorize shows it,
# "Try it out" sends it); the key lives in the page's memory only, never in a URL or in
# storage.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="{assets}/favicon.png">
{head}
<style>
  #jvp-key {{ font-family: sans-serif; margin: 2em auto; max-width: 40em; }}
  #jvp-key input {{ width: 24em; padding: 0.3em; }}
  #jvp-key-error {{ color: #b00; }}
</style>
</head>
<body>
<form id="jvp-key" hidden>
  <p>This service needs an API key to show its schema.</p>
  <label>API key <input id="jvp-key-value" type="password" autocomplete="off"></label>
  <button type="submit">Show the API</button>
  <p id="jvp-key-error"></p>
</form>
<div id="jvp-viewer"></div>
<script src="{assets}/{script}"></script>
<script>
const schemaUrl = {schema_url};
async function fetchSchema(key) {{
  const headers = key ? {{"Authorization": "Bearer " + key}} : {{}};
  const response = await fetch(schemaUrl, {{headers}});
  if (response.ok) return await response.json();
  let message = response.status + " " + response.statusText;
  try {{ message = (await response.json()).error.message; }} catch (e) {{}}
  const error = new Error(message);
  error.status = response.status;
  throw error;
}}
{start}
(async () => {{
  const form = document.getElementById("jvp-key");
  try {{
    start(await fetchSchema(null), null);
  }} catch (error) {{
    if (error.status !== 401) {{
      document.getElementById("jvp-viewer").textContent = "Cannot load the schema: " + error;
      return;
    }}
    form.hidden = false;
    form.addEventListener("submit", async (event) => {{
      event.preventDefault();
      const key = document.getElementById("jvp-key-value").value.trim();
      try {{
        const schema = await fetchSchema(key);
        form.hidden = true;
        start(schema, key);
      }} catch (error) {{
        document.getElementById("jvp-key-error").textContent = error.message;
      }}
    }});
  }}
}})();
</script>
</body>
</html>
"""

_SWAGGER_START = """function start(schema, key) {
  const ui = SwaggerUIBundle({
    spec: schema,
    dom_id: "#jvp-viewer",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    layout: "BaseLayout",
    deepLinking: true,
    validatorUrl: null,
    showExtensions: true,
    showCommonExtensions: true,
    oauth2RedirectUrl: window.location.origin + OAUTH2_REDIRECT,
  });
  if (key) ui.preauthorizeApiKey(BEARER, key);
}
"""

_REDOC_START = """function start(schema, key) {
  Redoc.init(schema, {}, document.getElementById("jvp-viewer"));
}
"""


def _page(request: Request, title: str, head: str, script: str, start: str) -> HTMLResponse:
    root: str = request.scope.get("root_path", "")
    html = _PAGE.format(
        title=title,
        assets=root + ASSETS_URL,
        head=head,
        script=script,
        schema_url=json.dumps(root + OPENAPI_URL),
        start=start.replace("OAUTH2_REDIRECT", json.dumps(root + OAUTH2_REDIRECT_URL)).replace(
            "BEARER", json.dumps(BEARER)
        ),
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP})


@router.get("/docs")
async def read_docs(request: Request, _: DocsKeyDep) -> HTMLResponse:
    """Swagger UI."""
    root: str = request.scope.get("root_path", "")
    css = f'<link rel="stylesheet" href="{root}{ASSETS_URL}/swagger-ui.css">'
    title = f"{request.app.title} - Swagger UI"
    return _page(request, title, css, "swagger-ui-bundle.js", _SWAGGER_START)


@router.get(OAUTH2_REDIRECT_URL)
async def read_docs_redirect(_: DocsKeyDep) -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def read_redoc(request: Request, _: DocsKeyDep) -> HTMLResponse:
    """ReDoc."""
    title = f"{request.app.title} - ReDoc"
    return _page(request, title, "", "redoc.standalone.js", _REDOC_START)

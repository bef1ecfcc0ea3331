"""API keys as ``Authorization: Bearer <key>``, compared in constant time.

With ``JVP_API_KEYS`` set, every route but /healthz and /readyz needs a key;
admin routes need one of ``JVP_ADMIN_KEYS`` (an inference key gets 403). An
admin key also works on inference routes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
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


KeyDep = Annotated[None, Depends(require_key)]
AdminDep = Annotated[None, Depends(require_admin)]

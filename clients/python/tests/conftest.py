"""Fixtures shared by the client tests; the fakes themselves are in jvp_fakes.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jvp_fakes import REPO_ROOT

# The live tests import the server as `app.main` from the repository root.
if (REPO_ROOT / "app").is_dir() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def delays() -> list[float]:
    """Where patched ``_sleep`` functions record the delays they were asked for."""
    return []


@pytest.fixture
def make_client(delays: list[float]) -> Any:
    """``make_client(handler, **kwargs)``: a JVPClient over a MockTransport, sleeps recorded."""
    from jvp_client import JVPClient

    made: list[Any] = []

    def make(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> JVPClient:
        http = httpx.Client(transport=httpx.MockTransport(handler))
        kwargs.setdefault("base_url", "http://jvp.test")
        client = JVPClient(http_client=http, **kwargs)
        setattr(client, "_sleep", delays.append)  # noqa: B010 - record, do not sleep
        made.append(http)
        return client

    yield make
    for http in made:
        http.close()


@pytest.fixture
def make_async_client(delays: list[float]) -> Any:
    """``make_async_client(handler, **kwargs)``: an AsyncJVPClient over a MockTransport."""
    from jvp_client import AsyncJVPClient

    def make(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> AsyncJVPClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        kwargs.setdefault("base_url", "http://jvp.test")
        client = AsyncJVPClient(http_client=http, **kwargs)

        async def record(seconds: float) -> None:
            delays.append(seconds)

        setattr(client, "_sleep", record)  # noqa: B010
        return client

    return make

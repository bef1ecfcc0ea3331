"""/docs and /redoc as a person meets them: rendered by a real headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright) against a real server, with every request that
leaves the browser for another host refused, as on a machine without internet.

Each test asserts that the operations appear (so a page that stayed blank fails), and
that no request went to any other host: a request that reached the network is one of
this server's; one to elsewhere may only be one the page's Content-Security-Policy
refused before sending (ReDoc's vendor logo, NOTE [docs offline] in app/api/routes/docs.py).

In CI (CI=true) a missing Chromium fails these tests; `make test` and `.ci/run` install
it (apt-get install -y chromium).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import LiveServer

CHROMIUM = os.environ.get("JVP_TEST_CHROMIUM", "/usr/bin/chromium")
OPERATIONS = ["/jvp", "/jacobian", "/hvp", "/linearize", "/eval_shape", "/jobs", "/models"]
KEY = "docs-test-key"


def _chromium() -> str:
    found = shutil.which(CHROMIUM)
    if found:
        return found
    message = f"{CHROMIUM} not found: apt-get install -y chromium (make test installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Visit:
    """A browser context that lets only ``origin`` through, and what it asked for."""

    origin: str
    sent: list[str] = field(default_factory=list)  # requests that reached the network layer
    failed: list[tuple[str, str | None]] = field(default_factory=list)

    def elsewhere(self) -> list[str]:
        return [url for url in self.sent if not url.startswith(self.origin + "/")]

    def refused_by_page(self) -> set[str]:
        return {url for url, why in self.failed if why == "csp"}


def visit(browser: Any, server: LiveServer) -> tuple[Any, Visit]:
    context = browser.new_context()
    seen = Visit(server.url)

    def only_this_server(route: Any) -> None:
        seen.sent.append(route.request.url)
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            route.abort("internetdisconnected")

    context.route("**/*", only_this_server)
    page = context.new_page()
    page.on("requestfailed", lambda r: seen.failed.append((r.url, r.failure)))
    return page, seen


def assert_offline(seen: Visit) -> None:
    assert seen.elsewhere() == [], f"requests to other hosts: {seen.elsewhere()}"
    assert any(url.startswith(seen.origin + "/docs/assets/") for url in seen.sent), seen.sent


def swagger_paths(page: Any) -> list[str]:
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    return [
        text.replace("\u200b", "")
        for text in page.locator(".opblock-summary-path").all_inner_texts()
    ]


def redoc_text(page: Any) -> str:
    page.wait_for_selector("[data-section-id^='tag/']", timeout=60_000)
    text: str = page.inner_text("body")
    return text


@pytest.fixture(scope="module")
def open_server() -> Iterator[LiveServer]:
    server = LiveServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyed_public_docs() -> Iterator[LiveServer]:
    server = LiveServer(env={"JVP_API_KEYS": KEY, "JVP_DOCS_PUBLIC": "true"})
    try:
        yield server
    finally:
        server.stop()


def test_swagger_ui_renders_every_operation_offline(browser: Any, open_server: LiveServer) -> None:
    page, seen = visit(browser, open_server)
    page.goto(open_server.url + "/docs")
    paths = swagger_paths(page)
    for operation in OPERATIONS:
        assert operation in paths, paths
    # The Bearer scheme of the schema gives Swagger UI its Authorize button.
    assert page.locator("button.authorize").count() == 1
    assert_offline(seen)


def test_redoc_renders_every_operation_offline(browser: Any, open_server: LiveServer) -> None:
    page, seen = visit(browser, open_server)
    page.goto(open_server.url + "/redoc")
    text = redoc_text(page)
    for operation in OPERATIONS:
        assert operation in text
    assert "Create Jvp" in text
    assert_offline(seen)
    # ReDoc's vendor logo was refused by the page's policy, never sent.
    assert seen.refused_by_page() <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}


def test_public_docs_ask_for_the_key_and_swagger_sends_it(
    browser: Any, keyed_public_docs: LiveServer
) -> None:
    """JVP_DOCS_PUBLIC=true with keys on: the page opens without a key, the schema does not;
    a wrong key shows the service's message; the right one renders the operations, marks
    Authorize as authorized, and "Try it out" sends the key (a 200 from GET /models)."""
    from playwright.sync_api import expect

    page, seen = visit(browser, keyed_public_docs)
    page.goto(keyed_public_docs.url + "/docs")
    page.fill("#jvp-key-value", "wrong")
    page.click("#jvp-key button")
    # A locator assertion waits in Playwright's own isolated world; wait_for_function's
    # string polls by eval in the page, which the page's CSP (no unsafe-eval) refuses
    # whenever the message is not there at the first check.
    expect(page.locator("#jvp-key-error")).to_have_text("The API key is not valid")
    assert page.locator(".opblock").count() == 0

    page.fill("#jvp-key-value", KEY)
    page.click("#jvp-key button")
    assert "/jvp" in swagger_paths(page)
    assert "locked" in (page.locator("button.authorize").get_attribute("class") or "").split()

    block = page.locator(
        ".opblock-get", has=page.locator(".opblock-summary-path", has_text="/models")
    ).first
    block.locator(".opblock-summary").click()
    block.locator("button.try-out__btn").click()
    with page.expect_response(lambda r: r.url == keyed_public_docs.url + "/models") as answer:
        block.locator("button.execute").click()
    assert answer.value.status == 200
    assert answer.value.request.headers.get("authorization") == f"Bearer {KEY}"
    assert_offline(seen)


def test_public_redoc_asks_for_the_key(browser: Any, keyed_public_docs: LiveServer) -> None:
    page, seen = visit(browser, keyed_public_docs)
    page.goto(keyed_public_docs.url + "/redoc")
    page.fill("#jvp-key-value", KEY)
    page.click("#jvp-key button")
    assert "/jvp" in redoc_text(page)
    assert_offline(seen)

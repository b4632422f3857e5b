"""The gateway's pages over HTTP, in process (the browser's view is tests/e2e/test_pages.py):
each page is served with a policy that lets it load nothing from another origin, names
only assets the gateway serves, and the page at / goes away when its setting is off."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from service.transports.http.app import create_app
from tests.helpers.errors import assert_error

PAGES = ("/", "/docs", "/redoc")
# What a policy's sources may be: the gateway's own origin, nothing, an inline script named
# by its hash, the page's own memory (blob:, data:), and inline styles (ReDoc's).
ALLOWED_SOURCES = re.compile(r"'self'|'none'|'sha256-[A-Za-z0-9+/=]+'|blob:|data:|'unsafe-inline'")


@pytest.fixture(scope="module")
def client(tiny):
    with TestClient(create_app(Settings(repository=tiny.repository))) as c:
        yield c


def policy(header: str) -> dict[str, list[str]]:
    directives = [d.split() for d in header.split(";") if d.strip()]
    return {name: sources for name, *sources in directives}


@pytest.mark.parametrize("path", PAGES)
def test_each_page_may_load_only_from_the_gateway(client, path):
    resp = client.get(path)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    rules = policy(resp.headers["content-security-policy"])
    assert rules["default-src"] == ["'none'"] and rules["frame-ancestors"] == ["'none'"]
    for name, sources in rules.items():
        assert all(ALLOWED_SOURCES.fullmatch(s) for s in sources), (name, sources)
    assert "'unsafe-inline'" not in rules["script-src"]
    # Every URL the HTML names is the gateway's own, relative to the page.
    urls = re.findall(r'(?:src|href|spec-url)="([^"]*)"', resp.text)
    urls += re.findall(r"url: '([^']*)'", resp.text)  # Swagger UI's document
    assert urls and all("//" not in u and not u.startswith("/") for u in urls), urls
    for url in urls:
        assert client.get("/" + url.split("#")[0]).status_code == 200, url


def test_assets_are_named_ones_only_and_revalidated(client):
    resp = client.get("/assets/swagger-ui-bundle.js")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/javascript")
    again = client.get(
        "/assets/swagger-ui-bundle.js", headers={"if-none-match": resp.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content
    assert_error(client.get("/assets/core.py"), 404, "not_found")
    assert_error(client.get("/assets/..%2Fapp.py"), 404, "not_found")
    # ReDoc's bundle would fetch Redocly's logo from its CDN: the copy served does not.
    assert b"cdn.redoc.ly" not in client.get("/assets/redoc.standalone.js").content


def test_the_pages_are_not_in_the_api_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [
        p for p in paths if not p.startswith(("/v1/", "/v2", "/healthz", "/readyz", "/metrics"))
    ]


def test_the_pages_stay_open_when_keys_are_on(tiny):
    app = create_app(Settings(repository=tiny.repository, api_keys=["k"]))
    with TestClient(app) as c:
        for path in (*PAGES, "/assets/try.js", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert 'data-keys="on"' in c.get("/").text
        assert_error(c.get("/v1/models"), 401, "unauthorized")


def test_the_try_page_turns_off(tiny):
    with TestClient(create_app(Settings(repository=tiny.repository, try_page=False))) as c:
        assert_error(c.get("/"), 404, "not_found")
        assert c.get("/docs").status_code == 200

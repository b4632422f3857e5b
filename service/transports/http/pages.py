"""The gateway's own pages: a page to try a model at ``/`` (``static/``: plain HTML, JS and
CSS), Swagger UI at ``/docs`` and ReDoc at ``/redoc``. Everything they load comes from the
gateway itself, under ``/assets/``: Swagger UI's and ReDoc's builds are the files of the
pinned ``fastapi-offline`` package (no CDN, no web fonts), so the pages work on a cluster
without internet and pull no third party's JavaScript into the API's origin. A
Content-Security-Policy on each page holds them to that: scripts, styles, images and
requests from the gateway's origin only (images also from ``blob:``/``data:``, the picked
image's preview and Swagger UI's icons; ReDoc's search worker from ``blob:``), and the one
inline script (Swagger UI's start, FastAPI's HTML) allowed by its hash. ReDoc 2 shows
Redocly's logo from ``cdn.redoc.ly`` in its sidebar, whatever its options say: the copy served
has that address emptied (the image then hides itself), so not even a blocked request is
made.

The pages use relative URLs (``assets/...``, ``openapi.json``, ``v1/models``), so they also
work behind a proxy that serves the gateway under a path prefix. They are open when API
keys are on, as ``/openapi.json`` is; the calls they make to the API need a key then (the
try page asks for one; Swagger UI's Authorize button sets one).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from service.errors import NotFound

#: This package's own files (the try page).
STATIC = Path(__file__).with_name("static")
#: The pages' assets are served under /assets/ (every one named in :func:`assets`); the
#: pages name them relative to themselves.
ASSETS = "assets"
_MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
#: Swagger UI's settings beyond FastAPI's defaults: no validator badge (it would send the
#: document's URL to validator.swagger.io), the operations' durations shown.
SWAGGER_PARAMETERS = {"validatorUrl": None, "displayRequestDuration": True}
# The pages' common policy. No plugins, no <base>, no form posts, not framed.
_POLICY = {
    "default-src": "'none'",
    "connect-src": "'self'",
    "img-src": "'self' blob: data:",
    "font-src": "'self'",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _vendor() -> Path:
    """The folder of Swagger UI's and ReDoc's built files (the fastapi-offline package's;
    found without importing it: only its files are used)."""
    spec = find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the fastapi-offline package is missing: install the service extra")
    return Path(spec.origin).with_name("static")


#: What is taken out of a vendored file as it is served (the module's docstring says why).
_EDITS = {"redoc.standalone.js": (b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"")}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str

    @classmethod
    def read(cls, path: Path) -> Asset:
        body = path.read_bytes()
        if (edit := _EDITS.get(path.name)) is not None:
            body = body.replace(*edit)
        digest = hashlib.sha256(body).hexdigest()[:32]
        return cls(body, _MEDIA[path.suffix], f'"{digest}"')

    def response(self, request: Request) -> Response:
        # Revalidated on each use (ETag): the files change with the gateway's version.
        headers = {
            "etag": self.etag,
            "cache-control": "no-cache",
            "x-content-type-options": "nosniff",
        }
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


@functools.cache
def assets() -> dict[str, Asset]:
    """Every file under ``/assets/``, by name (nothing else is served from there), read
    once a process: about 3 MB."""
    vendor = _vendor()
    paths = [
        vendor / name
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
    ]
    paths += [p for p in STATIC.iterdir() if p.suffix in (".js", ".css")]
    return {p.name: Asset.read(p) for p in paths}


def content_security_policy(
    script: str = "'self'", style: str = "'self'", worker: str | None = None
) -> str:
    """The policy of a page: :data:`_POLICY` with its own script, style and worker sources."""
    policy = {**_POLICY, "script-src": script, "style-src": style}
    if worker is not None:
        policy["worker-src"] = worker
    return "; ".join(f"{name} {value}" for name, value in policy.items())


def _inline_hashes(html: str) -> str:
    """CSP sources allowing exactly the inline scripts of ``html`` (their SHA-256)."""
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    )


@dataclass(frozen=True)
class Page:
    """A page's whole HTML and the policy it is served with, both made once."""

    html: str
    policy: str

    def response(self) -> HTMLResponse:
        return HTMLResponse(
            self.html,
            headers={
                "content-security-policy": self.policy,
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
                "cache-control": "no-cache",
            },
        )


def _text(response: HTMLResponse) -> str:
    return bytes(response.body).decode()


def swagger_page(title: str) -> Page:
    html = _text(
        get_swagger_ui_html(
            openapi_url="openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )
    )
    # Swagger UI sets styles through the DOM only (CSSOM, which a policy does not govern).
    return Page(html, content_security_policy(script=f"'self' {_inline_hashes(html)}"))


def redoc_page(title: str) -> Page:
    html = _text(
        get_redoc_html(
            openapi_url="openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
    )
    # ReDoc writes its styles as <style> elements as it renders (styled-components): inline
    # styles, which no hash can name; they load nothing. Its search index runs in a worker
    # made from a blob: URL.
    return Page(
        html,
        content_security_policy(style="'self' 'unsafe-inline'", worker="'self' blob:"),
    )


def try_page(keys: bool) -> Page:
    """The page to try a model (``static/try.html``): it asks for a key when ``keys``."""
    html = (STATIC / "try.html").read_text().replace("{{keys}}", "on" if keys else "off")
    return Page(html, content_security_policy())


def pages_router(title: str, keys: bool, try_it: bool) -> APIRouter:
    """The pages' routes (none in the OpenAPI document): ``/docs``, ``/redoc``, their assets,
    and ``/`` when ``try_it`` (else ``/`` stays a 404)."""
    router = APIRouter(include_in_schema=False)
    files = assets()
    swagger, redoc = swagger_page(title), redoc_page(title)

    @router.get("/docs", operation_id="docs_page")
    async def docs() -> HTMLResponse:
        return swagger.response()

    @router.get("/redoc", operation_id="redoc_page")
    async def redoc_() -> HTMLResponse:
        return redoc.response()

    @router.get(f"/{ASSETS}/{{name}}", operation_id="asset")
    async def asset(name: str, request: Request) -> Response:
        if (found := files.get(name)) is None:
            raise NotFound("no such asset; see /docs")
        return found.response(request)

    if try_it:
        page = try_page(keys)

        @router.get("/", operation_id="try_page")
        async def home() -> HTMLResponse:
            return page.response()

    return router

"""``GET /``: the chat page, and ``GET /page/{name}``: its static files (``services/web/``, shipped as package data).

The page is plain HTML, CSS and JavaScript (no build step, nothing fetched from elsewhere: it works offline) and
uses only the public API, so it needs no key to load: it asks for one when ``/v1/models`` answers 401. Only the
files of ``services/web/`` are served, by name (no sub-folders, no path outside it). Not in the OpenAPI schema:
``/docs`` stays the API's page.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from services.errors import APIError
from services.ingress.service import IngressService, get_service

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
"""The page's files: ``index.html`` and the assets it links (``/page/<name>``)."""

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
"""The file kinds served, by suffix (anything else is a 404)."""


def headers(svc: IngressService) -> dict[str, str]:
    """No caching, no sniffing, and a content security policy: the page loads and connects only to this server
    (and ``public_base_url``, where artifact URLs point), plus the media it gets back as data: / blob: URLs."""
    origin = ""
    if svc.settings.public_base_url:
        u = urlsplit(svc.settings.public_base_url)
        origin = f" {u.scheme}://{u.netloc}" if u.scheme and u.netloc else ""
    csp = (f"default-src 'self'{origin}; img-src 'self'{origin} data: blob:; media-src 'self'{origin} data: blob:; "
           "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
    return {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": csp}


router = APIRouter(include_in_schema=False)


def _file(name: str) -> Path:
    path = WEB_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise APIError(404, f"no page file {name!r}", type="not_found_error", code="not_found")
    return path


@router.get("/")
async def index(svc: IngressService = Depends(get_service)):
    return FileResponse(_file("index.html"), media_type=MEDIA_TYPES[".html"], headers=headers(svc))


@router.get("/page/{name}")
async def asset(name: str, svc: IngressService = Depends(get_service)):
    path = _file(name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers(svc))

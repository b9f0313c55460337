"""GET /inspector: the web inspector, a single page served from the package's own files.

The page (``dgserve/inspector/static``) calls the ``/v1`` API from the browser, with the
key the user types in as ``Authorization: Bearer``. Its own HTML, JavaScript and CSS hold
no records, so they load without a key (``auth.OPEN_PATHS``): the page must load before
it can ask for one. Only the listed files are served, so the route cannot read anything
else from the package. The routes stay out of the OpenAPI document: they are a page, not
the API.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

from fastapi import APIRouter
from fastapi.responses import Response

from dgserve.errors import NotFoundError

__all__ = ["ASSETS", "router"]

router = APIRouter(include_in_schema=False)

ASSETS: Final = {
    "index.html": "text/html; charset=utf-8",
    "inspector.js": "text/javascript; charset=utf-8",
    "inspector.css": "text/css; charset=utf-8",
}
# Only this server's own files and the images the page makes itself (data: and blob: URLs of
# uploads, label maps, pictures fetched with the key): a CDN reference fails loudly in the
# browser's console instead of silently needing the network.
_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new dgserve version must not run with the old page's script
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("dgserve.inspector") / "static" / name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_read(name), media_type=ASSETS[name], headers=_HEADERS)


@router.get("/inspector")
async def inspector_page() -> Response:
    return _asset("index.html")


@router.get("/inspector/{asset}")
async def inspector_asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise NotFoundError(f"the inspector has no file {asset!r}")
    return _asset(asset)

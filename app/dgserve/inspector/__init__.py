"""The web inspector's assets (``static/``): one page of plain JavaScript and SVG, served at
``GET /inspector`` by ``dgserve.api.routes.inspector``. Everything it draws comes from the
``/v1`` API, so it needs no network beyond the server (no CDN, no framework)."""

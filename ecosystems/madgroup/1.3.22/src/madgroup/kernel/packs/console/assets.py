"""Grace's stylesheet, script and icon (the files in static/), served from /static/ so the CSP can forbid every
inline script and style.

The script only adds conveniences; every page works without it. It never builds HTML: text goes in through
`value` and `textContent`, and the CSP requires Trusted Types, so an `innerHTML` would throw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

STATIC = Path(__file__).with_name("static")
MEDIA_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
ASSETS: dict[str, tuple[bytes, str]] = {}
"""URL path -> (the file's bytes, its media type), read once at import."""


def _asset(name: str) -> str:
    body = (STATIC / name).read_bytes()
    suffix = Path(name).suffix
    # Versioned URLs: a new kernel's assets are never served from a browser's stale cache.
    path = f"/static/{Path(name).stem}-{hashlib.sha256(body).hexdigest()[:12]}{suffix}"
    ASSETS[path] = (body, MEDIA_TYPES[suffix])
    return path


CSS_PATH = _asset("grace.css")
JS_PATH = _asset("grace.js")
ICON_PATH = _asset("grace.svg")

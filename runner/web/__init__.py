"""The status page's files, shipped inside the package (pyproject package-data).

Plain HTML, CSS and JavaScript with no build step and nothing fetched from a CDN,
so the page works on a machine without internet.  Read once, through
importlib.resources, so it works from a wheel as from a checkout.
"""

from __future__ import annotations

import functools
from importlib import resources

#: URL path -> (file in this package, Content-Type)
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html"),
    "/ui/app.js": ("app.js", "text/javascript"),
    "/ui/style.css": ("style.css", "text/css"),
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def page_file(path: str) -> tuple[bytes, str]:
    """The bytes and Content-Type served at `path` (one of PAGE_FILES)."""
    name, content_type = PAGE_FILES[path]
    return _read(name), content_type

"""What the daemon needs to know of a URL besides fetching it: its host.

One function, shared by the import (which stores the host beside the URL so a
claim can skip a host that asked us to back off) and the downloader's HostGate
(which decides that it did), so both always agree on what "the same host" is.
"""

from __future__ import annotations

import re
from hashlib import blake2b
from urllib.parse import urlsplit


def host_of(url: str | None) -> str:
    """The URL's host, lower-cased, without port or credentials; '' if it has none."""
    if not url:
        return ""
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:  # 'Invalid IPv6 URL': the download itself will say so
        return ""


#: A URL `same_fetch_url` returns unchanged: lower-case http(s) scheme and host, no
#: port, a path, no fragment, no blank.
_NORMAL_URL = re.compile(r"https?://[a-z0-9.-]+/[^#\s]*")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
#: The common spelling, normalised without urlsplit's cost (import runs it a million
#: times): scheme, host of plain ASCII, optional port, the rest, optional fragment.
_SIMPLE_URL = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*)://([A-Za-z0-9.-]+)(?::(\d+))?([/?][^#]*)?(?:#.*)?"
)


def same_fetch_url(url: str) -> str:
    """`url` up to spellings that fetch the same bytes.

    Scheme and host are case-insensitive, a default port is the same as none, an
    empty path is "/", and the fragment never leaves the client.  Path, query and
    credentials are kept as written: servers may tell them apart.
    """
    if _NORMAL_URL.fullmatch(url):  # most URLs are already spelt this way
        return url
    url = url.strip()
    simple = _SIMPLE_URL.fullmatch(url)
    if simple:
        scheme, host, port, rest = simple.groups()
        scheme = scheme.lower()
        netloc = host.lower()
    else:
        try:
            parts = urlsplit(url)
            port = str(parts.port) if parts.port is not None else None
        except ValueError:  # malformed: only the very same string is the same URL
            return url
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if "@" in parts.netloc:
            netloc = parts.netloc.rpartition("@")[0] + "@" + netloc
        rest = parts.path + (f"?{parts.query}" if parts.query or url.endswith("?") else "")
    if port is not None and _DEFAULT_PORTS.get(scheme) != port.lstrip("0"):
        netloc += f":{int(port)}"
    if not rest or rest.startswith("?"):
        rest = "/" + (rest or "")
    return f"{scheme}://{netloc}{rest}"


def url_hash(url: str | None) -> str | None:
    """The `url_hash` column: 128 bits of `same_fetch_url`, as hex; None without a URL."""
    if not url:
        return None
    return blake2b(same_fetch_url(url).encode(), digest_size=16).hexdigest()

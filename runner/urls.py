"""What the daemon needs to know of a URL besides fetching it: its host.

One function, shared by the import (which stores the host beside the URL so a
claim can skip a host that asked us to back off) and the downloader's HostGate
(which decides that it did), so both always agree on what "the same host" is.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def host_of(url: str | None) -> str:
    """The URL's host, lower-cased, without port or credentials; '' if it has none."""
    if not url:
        return ""
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:  # 'Invalid IPv6 URL': the download itself will say so
        return ""

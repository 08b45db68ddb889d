"""Streaming HTTP download to a temp file.

Bodies go to disk chunk by chunk, never whole into memory, and stop at a byte cap,
so one huge or endless response cannot take the machine down.  Errors are
classified: transient ones (timeouts, dropped connections, 408/425/429/5xx) are
worth retrying, permanent ones are not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from runner.errors import DownloadError, TransientDownloadError
from runner.retry import parse_retry_after

CHUNK_BYTES = 1 << 20
TRANSIENT_STATUSES = frozenset({408, 425, 429})
#: Content types that are never media: a login wall, an error page, a JSON API reply.
NON_MEDIA_TYPES = ("text/html", "text/plain", "application/json", "application/xml", "text/xml")


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int = 4 << 30
    connect_timeout_s: float = 30.0
    #: Longest silence between two reads of the body or headers.
    read_timeout_s: float = 60.0


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size_bytes: int


def make_session(
    limits: DownloadLimits, *, connections: int, per_host: int
) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=limits.connect_timeout_s,
        connect=limits.connect_timeout_s,
        sock_read=limits.read_timeout_s,
    )
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=per_host)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        auto_decompress=False,
        headers={"User-Agent": "runner/0.1 (audio embeddings)"},
    )


def _status_error(response: aiohttp.ClientResponse) -> DownloadError:
    message = f"HTTP {response.status} {response.reason or ''}".strip()
    if response.status in TRANSIENT_STATUSES or response.status >= 500:
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"), now=time.time())
        return TransientDownloadError(
            message, http_status=response.status, retry_after_s=retry_after_s
        )
    return DownloadError(message, http_status=response.status)


class HostGate:
    """Hosts that told us to back off (429/503), and until when.

    One URL's 429 is a statement about the whole host: sending its other URLs
    meanwhile would only earn more 429s and, on some CDNs, a ban.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    @staticmethod
    def host_of(url: str) -> str:
        return (urlsplit(url).hostname or "").lower()

    def blocked_until(self, url: str, *, now: float) -> float | None:
        until = self._until.get(self.host_of(url))
        if until is None or until <= now:
            return None
        return until

    def back_off(self, url: str, *, until: float) -> None:
        host = self.host_of(url)
        self._until[host] = max(until, self._until.get(host, 0.0))


def _check_content_type(response: aiohttp.ClientResponse) -> None:
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type.startswith(NON_MEDIA_TYPES):
        raise DownloadError(
            f"not a media file: server sent {content_type}", http_status=response.status
        )


async def _stream_body(response: aiohttp.ClientResponse, dest: Path, max_bytes: int) -> int:
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise DownloadError(f"file is {declared} bytes, over the {max_bytes}-byte cap")
    size = 0
    with dest.open("wb") as out:
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise DownloadError(f"body exceeds the {max_bytes}-byte cap")
            out.write(chunk)
    if declared is not None and size < declared:
        raise TransientDownloadError(f"body ended after {size} of {declared} bytes")
    return size


async def download(
    session: aiohttp.ClientSession, url: str, dest: Path, limits: DownloadLimits
) -> Downloaded:
    """Fetch `url` into `dest`; on any error `dest` may be partial and the caller removes it."""
    try:
        async with session.get(url, allow_redirects=True, max_redirects=10) as response:
            if response.status != 200:
                raise _status_error(response)
            _check_content_type(response)
            size = await _stream_body(response, dest, limits.max_bytes)
    except (TimeoutError, asyncio.TimeoutError):
        raise TransientDownloadError(
            f"timed out (connect {limits.connect_timeout_s:g} s, read {limits.read_timeout_s:g} s)"
        ) from None
    except aiohttp.TooManyRedirects:
        raise DownloadError("too many redirects") from None
    except aiohttp.RedirectClientError as exc:
        raise DownloadError(f"redirect to a non-http or invalid url: {exc}") from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise DownloadError(f"invalid or non-http url: {exc}") from None
    except aiohttp.ClientPayloadError as exc:
        raise TransientDownloadError(f"body cut short: {exc}") from None
    except aiohttp.ClientConnectorError as exc:
        raise TransientDownloadError(f"cannot connect: {exc.os_error or exc}") from None
    except aiohttp.ClientError as exc:
        raise TransientDownloadError(f"connection error: {type(exc).__name__}: {exc}") from None
    return Downloaded(path=dest, size_bytes=size)

"""Streaming HTTP download to a temp file.

Bodies go to disk chunk by chunk, never whole into memory, and stop at a byte cap,
so one huge or endless response cannot take the machine down.  Errors are
classified: transient ones (timeouts, dropped connections, 408/425/429/5xx) are
worth retrying, permanent ones are not.  A URL that serves an HLS playlist is
fetched as the segments it names (runner/hls.py), every request of it through the
same session, byte cap and rate floor (`Transfer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

import runner.hls as hls
from runner.errors import (
    DownloadError,
    DownloadTimeoutError,
    JobError,
    TransientDownloadError,
    UrlRefusedError,
)
from runner.retry import parse_retry_after
from runner.urls import host_of

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
    #: Slowest average body rate tolerated over `stall_window_s` (0 disables the
    #: floor): `read_timeout_s` alone never cuts a server that drips one byte just
    #: inside it, and such a transfer would hold a download slot forever.
    min_bytes_per_s: float = 10 * 1024
    #: Window of the rate floor, measured from the start of the body; short bursts
    #: of slowness inside it are forgiven.
    stall_window_s: float = 60.0
    #: HLS: the largest playlist read; it is held in memory to be parsed, and 4 MiB
    #: lists tens of thousands of segments
    max_playlist_bytes: int = 4 << 20
    #: HLS: most segments one media playlist may list, each a request of its own
    #: (6 hours of 1-second segments is 21,600)
    max_segments: int = 30_000


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size_bytes: int


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A host spelt like an IPv4 address in one of the legacy forms `inet_aton` (and so
#: getaddrinfo) accepts: one to four dot-separated decimal, octal or hex parts.
_NUMERIC_HOST = re.compile(
    r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}\.?"
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: RFC 8215 local-use NAT64 prefix: translates into the operator's own network, so it
#: is never public whatever it embeds (Python before 3.13 calls it global).
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: deprecated IPv4-compatible addresses (::a.b.c.d); :: and ::1 are judged as themselves
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric host such as ``127.1``, ``2130706433``, ``0177.0.0.1`` or
    ``0x7f.1`` means, or None for any other host.

    `ipaddress` rejects these spellings, yet the system resolver reads them as
    addresses, so treating them as names would let ``http://127.1/`` through as a
    "name" that is really loopback.  A numeric host that is no address either (a part
    too large) is refused: no DNS name is all digits, so it is not a name.
    """
    if not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        raise UrlRefusedError(f"refused: {host} is not a valid IPv4 address") from None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries for a transition mechanism: packets to it
    end up at the IPv4 address (via a gateway or relay), so that address must be
    public too.  IPv4-mapped addresses are unwrapped before this, as the same host."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        found.append(("NAT64", low32))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo", client), ("Teredo server", server)]
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        found.append(("IPv4-compatible", low32))
    return found


def _non_public_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:  # deprecated, but still routed inside some networks
            return "site-local"
        if ip in _NAT64_LOCAL:
            return "local-use NAT64"
    if ip.is_global and not ip.is_multicast:
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    return "non-public"


@dataclass(frozen=True)
class UrlGuard:
    """Refuses URLs that point into the machine's own networks (SSRF).

    Used for URLs that arrive over the HTTP API: only http/https, and no host that
    resolves to a loopback, private, link-local or otherwise non-global address.
    The check runs on every request of a redirect chain (a client middleware) and
    again on the addresses the connector actually connects to (a resolver), so
    neither a redirect nor a DNS answer that changes between check and connect
    gets through.
    """

    #: networks let through anyway (tests serve media from 127.0.0.1)
    exempt: tuple[IPNetwork, ...] = ()

    def address_problem(self, host: str, address: str) -> str | None:
        """Why connecting to `address` (which `host` names) is refused, or None.

        IPv6 addresses that embed an IPv4 address (NAT64, 6to4, Teredo,
        IPv4-compatible) are judged by the embedded address as well: a public-looking
        IPv6 literal must not reach 127.0.0.1 or 10.x through a translator.
        """
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.exempt):
            return None
        shown = host if host == str(ip) else f"{host} ({ip})"
        if isinstance(ip, ipaddress.IPv6Address):
            for mechanism, inner in _embedded_ipv4(ip):
                kind = _non_public_kind(inner)
                if kind:
                    return f"refused: {host} ({mechanism} of {inner}) is a {kind} address"
        kind = _non_public_kind(ip)
        return f"refused: {shown} is a {kind} address" if kind else None

    def literal_address(self, host: str) -> IPAddress | None:
        """The address `host` spells, in any form the connector or the system resolver
        would take as an address rather than a name; None for a name."""
        legacy = legacy_ipv4(host)
        if legacy is not None:
            return legacy
        try:
            return ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None

    def check_url(self, url: str | URL) -> None:
        """Scheme, and the host when it is an IP literal (the connector never resolves
        those).  Legacy numeric spellings (``127.1``) count as literals."""
        parsed = URL(url) if isinstance(url, str) else url
        if parsed.scheme not in ("http", "https"):
            scheme = parsed.scheme or "none"
            raise UrlRefusedError(f"refused: only http and https urls, not {scheme!r}")
        host = (parsed.raw_host or "").strip("[]")
        if not host:
            raise UrlRefusedError("refused: url has no host")
        address = self.literal_address(host)
        if address is None:
            return  # a name: the resolver checks what it resolves to
        problem = self.address_problem(host, str(address))
        if problem:
            raise UrlRefusedError(problem)

    async def check_resolved(self, url: str) -> None:
        """`check_url`, then the addresses the host resolves to now: for URLs stored to
        be fetched later.  A name that does not resolve passes (its download fails)."""
        self.check_url(url)
        host = (URL(url).raw_host or "").strip("[]")
        if self.literal_address(host) is not None:
            return  # a literal, checked above
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, None), 10)
        except (TimeoutError, OSError, UnicodeError):
            return
        for info in infos:
            problem = self.address_problem(host, str(info[4][0]))
            if problem:
                raise UrlRefusedError(problem)

    async def middleware(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        self.check_url(request.url)
        return await handler(request)


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, then refuses if any address is non-public."""

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        literal = self.guard.literal_address(host)
        if literal is not None:  # a legacy spelling (0x7f.1): judged, never looked up
            problem = self.guard.address_problem(host, str(literal))
            if problem:
                raise UrlRefusedError(problem)
            return [
                {
                    "hostname": host,
                    "host": str(literal),
                    "port": port,
                    "family": socket.AF_INET6 if literal.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            ]
        results = await self.inner.resolve(host, port, family)
        for result in results:
            problem = self.guard.address_problem(host, result["host"])
            if problem:
                raise UrlRefusedError(problem)
        return results

    async def close(self) -> None:
        await self.inner.close()


def make_session(
    limits: DownloadLimits, *, connections: int, per_host: int, guard: UrlGuard | None = None
) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=limits.connect_timeout_s,
        connect=limits.connect_timeout_s,
        sock_read=limits.read_timeout_s,
    )
    guarded: dict[str, Any] = {}
    if guard is not None:
        guarded = {"resolver": GuardedResolver(guard)}
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=per_host, **guarded)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        middlewares=(guard.middleware,) if guard is not None else (),
        auto_decompress=False,
        # identity: bodies are written as sent (auto_decompress is off), and a CDN's
        # gzipped HLS playlist would otherwise not read as one
        headers={"User-Agent": "runner/0.1 (audio embeddings)", "Accept-Encoding": "identity"},
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
    meanwhile would only earn more 429s and, on some CDNs, a ban.  The claim skips
    the hosts named here (`blocked_hosts`), so their jobs stay pending, untouched.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def blocked_until(self, url: str, *, now: float) -> float | None:
        until = self._until.get(host_of(url))
        if until is None or until <= now:
            return None
        return until

    def blocked_hosts(self, *, now: float) -> list[str]:
        """Hosts in backoff at `now`; expired entries are forgotten."""
        for host in [h for h, until in self._until.items() if until <= now]:
            del self._until[host]
        return sorted(self._until)

    def back_off(self, url: str, *, until: float) -> None:
        host = host_of(url)
        self._until[host] = max(until, self._until.get(host, 0.0))


def _check_content_type(response: aiohttp.ClientResponse, *, sniff_text: bool = False) -> None:
    """Refuses a response whose content type is never media; with `sniff_text`,
    text/plain passes for now, as a misconfigured server's HLS playlist may be sent
    so (the body decides)."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if sniff_text and content_type == "text/plain":
        return
    if content_type.startswith(NON_MEDIA_TYPES):
        raise DownloadError(
            f"not a media file: server sent {content_type}", http_status=response.status
        )


class RateFloor:
    """Cuts a body whose average rate over the last `window_s` seconds is under `min_bytes_per_s`.

    Keeps (time, bytes received so far) samples at least window/16 apart, so memory
    stays bounded however many chunks arrive; the last sample is always the newest
    chunk.  The bytes in the window are counted from the newest sample at or before
    the window's start: never fewer than really arrived, so a transfer that keeps
    up with the floor is never cut, and a slow one is cut at most window/16 late.
    """

    def __init__(self, min_bytes_per_s: float, window_s: float, *, now: float) -> None:
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self.started = now
        self._spacing = window_s / 16
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])
        self.total = 0

    @property
    def enabled(self) -> bool:
        return self.min_bytes_per_s > 0 and self.window_s > 0

    def add(self, now: float, n: int) -> None:
        self.total += n
        sample = (now, self.total)
        if len(self._samples) >= 2 and now - self._samples[-2][0] < self._spacing:
            self._samples[-1] = sample  # coalesce: the older point is within the spacing
        else:
            self._samples.append(sample)
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Drop samples the window has passed, keeping one at or before its start."""
        start = now - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()

    def in_window(self, now: float) -> int | None:
        """Bytes received in the window ending at `now`; None until a full window has passed."""
        if now - self.started < self.window_s:
            return None
        self._prune(now)
        return self.total - self._samples[0][1]

    def too_slow(self, now: float) -> str | None:
        """A message for the job record if the floor is broken at `now`, else None."""
        if not self.enabled:
            return None
        got = self.in_window(now)
        if got is None or got >= self.min_bytes_per_s * self.window_s:
            return None
        return (
            f"too slow: {got / self.window_s:.0f} bytes/s averaged over the last "
            f"{self.window_s:g} s, under the floor of {self.min_bytes_per_s:g} bytes/s "
            "(see --min-bytes-per-s and --stall-window-s)"
        )

    def deadline(self) -> float | None:
        """When the floor breaks if no more bytes come: the time to wake up and check,
        since a server that sends nothing never wakes the reader itself."""
        if not self.enabled:
            return None
        need = self.min_bytes_per_s * self.window_s
        for at, received in self._samples:
            if self.total - received < need:
                return max(at, self.started) + self.window_s
        return None  # unreachable: the newest sample leaves 0 bytes < need


async def _read_chunk(response: aiohttp.ClientResponse, floor: RateFloor, now: float) -> bytes:
    """The next chunk (b"" at the end); raises DownloadTimeoutError once the rate floor breaks.

    The read is interrupted at the floor's deadline even while the server stays
    silent.  Interrupting is safe: aiohttp's StreamReader only takes bytes from
    its buffer after the wait, so none are lost, and its sock_read timer follows
    the socket, not our reads, so it still bounds each silence as before.
    """
    loop = asyncio.get_running_loop()
    while True:
        message = floor.too_slow(now)
        if message is not None:
            raise DownloadTimeoutError(message, http_status=response.status)
        deadline = floor.deadline()
        if deadline is None:
            return await response.content.read(CHUNK_BYTES)
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await response.content.read(CHUNK_BYTES)
        except TimeoutError:
            if not timeout.expired():
                raise  # aiohttp's own sock_read timeout
        now = loop.time()


class Transfer:
    """One job's download, however many requests it takes.

    A whole file is one request; an HLS stream (runner/hls.py) is playlists, keys and
    segments.  Every request goes through the one session (so the one URL guard) and
    counts against one byte cap and one rate floor: a playlist must not be a way
    around any of them, nor a way to fetch a thousand files each just under the cap.
    """

    def __init__(self, session: aiohttp.ClientSession, limits: DownloadLimits) -> None:
        self.session, self.limits = session, limits
        #: body bytes of every response so far, against `limits.max_bytes`
        self.received_bytes = 0
        #: requests made so far
        self.requests = 0
        #: the status of the current request once its server answered (failure records)
        self.status: int | None = None
        #: which part of the transfer is running ("HLS segment 3 of 10"), for messages;
        #: empty for the first request, so a whole file's messages say nothing extra
        self.part = ""
        #: started by the first body and shared by every later request
        self.floor: RateFloor | None = None

    def cap_error(self) -> DownloadError:
        max_bytes = self.limits.max_bytes
        if self.requests > 1:
            return DownloadError(
                f"the stream exceeds the {max_bytes}-byte cap (playlists, keys and segments "
                "together)",
                http_status=self.status,
            )
        return DownloadError(f"body exceeds the {max_bytes}-byte cap", http_status=self.status)

    @contextlib.asynccontextmanager
    async def get(
        self,
        url: str | URL,
        *,
        part: str = "",
        ok_statuses: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `url` following redirects; yields the response once its status is one of
        `ok_statuses` (others raise the classified error).

        The wait for headers is bounded by the connect and read timeouts and, once a
        body has been read, by the rate floor too: a server that answers each segment
        of a playlist just inside the read timeout is still too slow.
        """
        self.part, self.status = part, None
        self.requests += 1
        loop = asyncio.get_running_loop()
        if self.floor is not None and (message := self.floor.too_slow(loop.time())):
            raise DownloadTimeoutError(message)
        headers_by = loop.time() + self.limits.connect_timeout_s + self.limits.read_timeout_s
        floor_by = None if self.floor is None else self.floor.deadline()
        deadline = headers_by if floor_by is None else min(floor_by, headers_by)
        by_floor = deadline != headers_by
        # aiohttp's sock_read never fires while a server that sent a 1xx stalls
        # (aio-libs/aiohttp#2926): bound the wait for the final headers ourselves.
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
        # lands with the headers, and a dropped or stopping transfer would go on.
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                response = await self.session.get(
                    url, allow_redirects=True, max_redirects=10, headers=headers
                )
        except TimeoutError:
            if by_floor and timeout.expired() and self.floor is not None:  # the floor's, not ours
                message = self.floor.too_slow(loop.time()) or "too slow (see --min-bytes-per-s)"
                raise DownloadTimeoutError(message) from None
            raise
        async with response:
            self.status = response.status
            if response.status not in ok_statuses:
                raise _status_error(response)
            yield response

    def body(self, response: aiohttp.ClientResponse) -> Body:
        return Body(self, response)


class Body:
    """The body of one response of a `Transfer`, read chunk by chunk under its cap and floor."""

    def __init__(self, transfer: Transfer, response: aiohttp.ClientResponse) -> None:
        self.transfer, self.response = transfer, response
        self.declared = response.content_length
        self.size_bytes = 0
        left_bytes = transfer.limits.max_bytes - transfer.received_bytes
        if self.declared is not None and self.declared > left_bytes:
            max_bytes = transfer.limits.max_bytes
            if transfer.requests > 1:
                raise DownloadError(
                    f"{self.declared} more bytes would pass the {max_bytes}-byte cap "
                    "(playlists, keys and segments together)",
                    http_status=response.status,
                )
            raise DownloadError(
                f"file is {self.declared} bytes, over the {max_bytes}-byte cap",
                http_status=response.status,
            )
        if transfer.floor is None:
            limits = transfer.limits
            now = asyncio.get_running_loop().time()
            transfer.floor = RateFloor(limits.min_bytes_per_s, limits.stall_window_s, now=now)
        self.floor = transfer.floor

    async def read(self) -> bytes:
        """The next chunk, b"" at the end; raises once a cap, the floor or the
        announced length is broken."""
        loop = asyncio.get_running_loop()
        chunk = await _read_chunk(self.response, self.floor, loop.time())
        if not chunk:
            if self.declared is not None and self.size_bytes < self.declared:
                raise TransientDownloadError(
                    f"body ended after {self.size_bytes} of {self.declared} bytes",
                    http_status=self.response.status,
                )
            return b""
        self.floor.add(loop.time(), len(chunk))
        self.size_bytes += len(chunk)
        self.transfer.received_bytes += len(chunk)
        if self.transfer.received_bytes > self.transfer.limits.max_bytes:
            raise self.transfer.cap_error()
        return chunk

    async def head(self, n_bytes: int) -> bytes:
        """At least the first `n_bytes` (fewer only if the body is shorter), in whole chunks."""
        got = b""
        while len(got) < n_bytes and (chunk := await self.read()):
            got += chunk
        return got

    async def read_all(self, max_bytes: int, start: bytes = b"") -> bytes | None:
        """The rest of the body after `start` (already read), or None once it passes
        `max_bytes`: for small things held in memory (playlists, keys)."""
        data = bytearray(start)
        while len(data) <= max_bytes and (chunk := await self.read()):
            data += chunk
        return None if len(data) > max_bytes else bytes(data)


async def _write_body(body: Body, head: bytes, dest: Path) -> int:
    with dest.open("wb") as out:
        out.write(head)
        while chunk := await body.read():
            out.write(chunk)
    return body.size_bytes


async def _fetch(transfer: Transfer, url: str, dest: Path) -> int:
    """A whole file into `dest`, or, when the URL serves an HLS playlist, its segments."""
    async with transfer.get(url) as response:
        declared_hls = hls.declared(response)
        if not declared_hls:
            _check_content_type(response, sniff_text=True)
        body = transfer.body(response)
        head = await body.head(hls.SNIFF_BYTES)
        if not declared_hls and not hls.looks_like_playlist(head):
            _check_content_type(response)
            return await _write_body(body, head, dest)
        text = await hls.read_playlist(body, head, transfer.limits)
        playlist_url = response.url
    return await hls.fetch(transfer, playlist_url, text, dest)


def _in_context(exc: JobError, part: str) -> JobError:
    """`exc` with the part of a multi-request transfer it happened in named first."""
    if not part:
        return exc
    error = type(exc)(
        f"{part}: {exc}", http_status=exc.http_status, retry_after_s=exc.retry_after_s
    )
    return error


async def download(
    session: aiohttp.ClientSession, url: str, dest: Path, limits: DownloadLimits
) -> Downloaded:
    """Fetch `url` into `dest` (an HLS playlist: its segments, in order, into the one
    file); on any error `dest` may be partial and the caller removes it."""
    transfer = Transfer(session, limits)
    try:
        size = await _fetch(transfer, url, dest)
    except JobError as exc:
        raise _in_context(exc, transfer.part) from None
    except TimeoutError:
        error: JobError = DownloadTimeoutError(
            f"timed out (connect {limits.connect_timeout_s:g} s, read {limits.read_timeout_s:g} s)",
            http_status=transfer.status,
        )
        raise _in_context(error, transfer.part) from None
    except aiohttp.TooManyRedirects:
        error = DownloadError("too many redirects")
        raise _in_context(error, transfer.part) from None
    except aiohttp.RedirectClientError as exc:
        error = DownloadError(f"redirect to a non-http or invalid url: {exc}")
        raise _in_context(error, transfer.part) from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        error = DownloadError(f"invalid or non-http url: {exc}")
        raise _in_context(error, transfer.part) from None
    except aiohttp.ClientPayloadError as exc:
        error = TransientDownloadError(f"body cut short: {exc}", http_status=transfer.status)
        raise _in_context(error, transfer.part) from None
    except aiohttp.ClientConnectorError as exc:
        error = TransientDownloadError(f"cannot connect: {exc.os_error or exc}")
        raise _in_context(error, transfer.part) from None
    except aiohttp.ClientError as exc:
        error = TransientDownloadError(
            f"connection error: {type(exc).__name__}: {exc}", http_status=transfer.status
        )
        raise _in_context(error, transfer.part) from None
    except ValueError as exc:  # e.g. the resolver's idna codec on 'a..b': one bad url, not a bug
        error = DownloadError(f"invalid url: {exc}")
        raise _in_context(error, transfer.part) from None
    return Downloaded(path=dest, size_bytes=size)

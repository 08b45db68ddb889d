"""The URL guard's decisions on addresses that hide what they point at (issue 12).

Numeric hosts that `inet_aton` reads as IPv4 (``127.1``, ``2130706433``) and IPv6
addresses that carry an IPv4 address for a transition mechanism (NAT64, 6to4,
Teredo, IPv4-compatible) must be judged by the address they really reach.  The
decisions are tested as pure functions; the only traffic goes to a real server on
127.0.0.1, to show a refused URL never reaches it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from runner.download import DownloadLimits, GuardedResolver, UrlGuard, legacy_ipv4, make_session
from runner.errors import UrlRefusedError
from tests.threaded_server import serve_in_thread

GUARD = UrlGuard()


def refusal(url: str, guard: UrlGuard = GUARD) -> str | None:
    try:
        guard.check_url(url)
    except UrlRefusedError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("host", "meant"),
    [
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("127.0.0.1.", "127.0.0.1"),
        ("134744072", "8.8.8.8"),
    ],
)
def test_legacy_numeric_hosts_mean_addresses(host: str, meant: str) -> None:
    assert legacy_ipv4(host) == ipaddress.IPv4Address(meant)


@pytest.mark.parametrize("host", ["example.com", "1e100.net", "0xdead.example", "1.2.3.4.5", "a1"])
def test_names_are_not_numeric(host: str) -> None:
    assert legacy_ipv4(host) is None


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://2130706433/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://0177.0.0.1/", "loopback"),
        ("http://0x7f.1/", "loopback"),
        ("http://0X7F.1/", "loopback"),
        ("http://127.0.0.1./", "loopback"),
        ("https://10.1:8443/", "private"),
        ("http://0xa9fea9fe/latest/meta-data/", "link-local"),
        ("http://0/", "private"),  # 0.0.0.0: Linux connects it to this machine
    ],
)
def test_numeric_spellings_are_refused_as_what_they_mean(url: str, kind: str) -> None:
    problem = refusal(url)
    assert problem is not None and problem.endswith(f"is a {kind} address"), problem


def test_numeric_host_that_is_no_address_is_refused_not_resolved() -> None:
    problem = refusal("http://4294967296/")
    assert problem == "refused: 4294967296 is not a valid IPv4 address"


@pytest.mark.parametrize("url", ["http://134744072/", "http://0x8.8.8.8/", "http://example.com/"])
def test_public_numeric_spellings_and_names_pass(url: str) -> None:
    assert refusal(url) is None


@pytest.mark.parametrize(
    ("url", "embedded", "kind"),
    [
        ("http://[64:ff9b::7f00:1]/", "NAT64 of 127.0.0.1", "loopback"),
        ("http://[64:ff9b::10.0.0.1]/", "NAT64 of 10.0.0.1", "private"),
        ("http://[2002:7f00:1::]/", "6to4 of 127.0.0.1", "loopback"),
        ("http://[2002:c0a8:101::1]/", "6to4 of 192.168.1.1", "private"),
        ("http://[2002:a9fe:a9fe::]/", "6to4 of 169.254.169.254", "link-local"),
        # Teredo: client 127.0.0.1 is stored bit-inverted (0x80ff:fffe)
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "Teredo of 127.0.0.1", "loopback"),
        ("http://[::127.0.0.1]/", "IPv4-compatible of 127.0.0.1", "loopback"),
        ("http://[::10.0.0.1]/", "IPv4-compatible of 10.0.0.1", "private"),
    ],
)
def test_embedded_ipv4_is_judged(url: str, embedded: str, kind: str) -> None:
    problem = refusal(url)
    assert problem is not None, url
    assert f"({embedded}) is a {kind} address" in problem, problem


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:192.168.0.1]/", "private"),
        ("http://[fec0::1]/", "site-local"),
        ("http://[feff:ffff::1]/", "site-local"),
        ("http://[64:ff9b:1::808:808]/", "local-use NAT64"),
        ("http://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/", "private"),  # Teredo, 8.8.8.8
        ("http://[::1]/", "loopback"),
        ("http://[fe80::1%25eth0]/", "link-local"),
    ],
)
def test_other_non_public_ipv6_is_refused(url: str, kind: str) -> None:
    problem = refusal(url)
    assert problem is not None and problem.endswith(f"is a {kind} address"), problem


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::808:808]/",  # NAT64 of a public address
        "http://[2002:808:808::1]/",  # 6to4 of a public address
        "http://[2606:4700:4700::1111]/",
        "http://8.8.8.8/",
    ],
)
def test_public_addresses_pass(url: str) -> None:
    assert refusal(url) is None


def test_exempt_network_covers_numeric_spellings() -> None:
    """Tests serve from 127.0.0.1; its legacy spellings mean the same address."""
    guard = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.0/8"),))
    assert refusal("http://127.1:9/", guard) is None
    assert refusal("http://10.1/", guard) is not None


def test_resolver_judges_numeric_hosts_without_looking_them_up() -> None:
    """aiohttp hands hex spellings to the resolver as names; ours judges them."""

    async def resolve(guard: UrlGuard, host: str) -> list[str]:
        resolver = GuardedResolver(guard)
        try:
            return [r["host"] for r in await resolver.resolve(host, 80)]
        finally:
            await resolver.close()

    with pytest.raises(UrlRefusedError, match=r"0x7f\.1 \(127\.0\.0\.1\) is a loopback"):
        asyncio.run(resolve(UrlGuard(), "0x7f.1"))
    exempt = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.0/8"),))
    assert asyncio.run(resolve(exempt, "0x7f.1")) == ["127.0.0.1"]


@pytest.fixture
def loopback_server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"x", content_type="audio/mpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    with serve_in_thread(app, name="guard-target") as base:
        # One request first: the server's loop is then surely in run_forever, so the
        # stop on exit is not lost to serve_in_thread's start-up race (a 10 s join).
        with urllib.request.urlopen(f"{base}/ready", timeout=10) as reply:
            assert reply.status == 200
        hits.clear()
        yield base, hits


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.1", "0177.0.0.1", "[::ffff:7f00:1]"])
def test_guarded_session_never_reaches_loopback(
    loopback_server: tuple[str, list[str]], host: str
) -> None:
    """Through a real guarded session, every spelling of 127.0.0.1 is refused before
    a connection is made: the server on 127.0.0.1 sees no request."""
    base, hits = loopback_server
    port = base.rsplit(":", 1)[1]

    async def fetch() -> None:
        session = make_session(DownloadLimits(), connections=2, per_host=2, guard=GUARD)
        async with session, session.get(f"http://{host}:{port}/target"):
            pass

    with pytest.raises((UrlRefusedError, aiohttp.InvalidURL)):
        asyncio.run(fetch())
    assert hits == []


def test_guarded_session_with_exemption_reaches_loopback(
    loopback_server: tuple[str, list[str]],
) -> None:
    """The control: the same server is reachable when 127.0.0.0/8 is exempt, so the
    refusals above are the guard's and not a broken server."""
    base, hits = loopback_server
    guard = UrlGuard(exempt=(ipaddress.ip_network("127.0.0.0/8"),))

    async def fetch(url: str) -> int:
        session = make_session(DownloadLimits(), connections=2, per_host=2, guard=guard)
        async with session, session.get(url) as response:
            return response.status

    port = base.rsplit(":", 1)[1]
    assert asyncio.run(fetch(f"{base}/plain")) == 200
    assert asyncio.run(fetch(f"http://0x7f.1:{port}/hex")) == 200
    assert hits == ["/plain", "/hex"]

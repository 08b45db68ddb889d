"""HLS: a playlist URL fetched as the one media file its segments make.

ffmpeg could read a playlist itself, but its hls demuxer opens every URL the playlist
names on its own, past the URL guard, the byte cap, the rate floor and the retry
classification of our downloads (which is why the decoder allows ffmpeg only the
downloaded file).  So the downloader reads the playlist (`m3u8`, globocom's parser),
picks what to fetch, and fetches every child playlist, key and segment through the
same `Transfer` as a whole file, appending the segments in order to one temp file.
That file is ordinary media to the decoder: MPEG-TS segments concatenate into one
transport stream, fMP4 segments after their init section (EXT-X-MAP) into one
fragmented MP4, packed audio (ADTS, MP3) into one elementary stream.

Only VOD playlists are fetched (a live one never ends), and only clear or AES-128
segments (decrypted here); SAMPLE-AES and DRM key systems fail with a message.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import m3u8
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from yarl import URL

from runner.errors import DownloadError, UrlRefusedError

if TYPE_CHECKING:
    from runner.download import Body, DownloadLimits, Transfer

log = logging.getLogger(__name__)

#: Content types servers give HLS playlists (RFC 8216, and the older audio/ ones).
CONTENT_TYPES = frozenset(
    {
        "application/vnd.apple.mpegurl",
        "application/x-mpegurl",
        "audio/mpegurl",
        "audio/x-mpegurl",
    }
)
MAGIC = b"#EXTM3U"
_BOM = b"\xef\xbb\xbf"
#: enough of a body to tell a playlist: a BOM, some blank lines, the magic
SNIFF_BYTES = 32
#: An AES-128 key is 16 bytes; a key URL that serves more is not one.
KEY_BYTES = 16
#: CODECS prefixes of audio formats (RFC 6381 names as HLS uses them).
_AUDIO_CODECS = ("mp4a", "ac-3", "ec-3", "ac-4", "opus", "flac", "alac", "mp3", "dts")


def declared(response: aiohttp.ClientResponse) -> bool:
    """The server says this is a playlist: by content type, or a `.m3u8` path."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return content_type in CONTENT_TYPES or response.url.path.lower().endswith(".m3u8")


def looks_like_playlist(head: bytes) -> bool:
    """The body starts like a playlist, whatever the server called it."""
    return head.removeprefix(_BOM).lstrip().startswith(MAGIC)


async def read_playlist(body: Body, head: bytes, limits: DownloadLimits) -> str:
    """The whole playlist as text, `head` being its first bytes already read.

    Held in memory to be parsed, so it has a cap of its own (`max_playlist_bytes`)
    besides counting against the transfer's byte cap."""
    data = await body.read_all(limits.max_playlist_bytes, head)
    if data is None:
        raise DownloadError(f"HLS playlist is over the {limits.max_playlist_bytes}-byte limit")
    if not looks_like_playlist(data[: len(_BOM) + SNIFF_BYTES]):
        raise DownloadError("not an HLS playlist: the body does not start with #EXTM3U")
    try:
        return data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError:
        raise DownloadError("HLS playlist is not UTF-8 text") from None


def _parse(text: str) -> m3u8.M3U8:
    try:
        return m3u8.loads(text)
    except Exception as exc:  # the parser's errors are not all ParseError: any is the body's
        raise DownloadError(f"unreadable HLS playlist: {type(exc).__name__}") from None


async def parse(text: str, limits: DownloadLimits) -> m3u8.M3U8:
    """Parsed off the event loop: a playlist of tens of thousands of segments takes
    long enough to stall every other download.

    Entries are counted first, in C: the parser spends about a kilobyte on each,
    so a 4 MiB playlist of one-line segments would cost a few hundred MB before
    its length could be refused.
    """
    entries = text.count("#EXTINF") + text.count("#EXT-X-STREAM-INF")
    if entries > limits.max_segments:
        raise DownloadError(
            f"HLS playlist lists {entries} segments, over the limit of {limits.max_segments}"
        )
    return await asyncio.to_thread(_parse, text)


def resolve(base: URL, uri: str) -> URL:
    """`uri` as the playlist names it, resolved against the playlist's final URL
    (after redirects), as RFC 8216 says.  Only http and https: a playlist naming
    ``file:///etc/passwd`` or ``data:`` must not read anything of this machine."""
    if not uri or not uri.strip():
        raise DownloadError("HLS playlist names an empty url")
    try:
        url = base.join(URL(uri.strip()))
    except (ValueError, TypeError):
        raise DownloadError("HLS playlist names an invalid url") from None
    if url.scheme not in ("http", "https"):
        scheme = url.scheme or "none"
        raise UrlRefusedError(f"refused: HLS playlist names a {scheme!r} url; only http and https")
    return url


# -- master playlists -------------------------------------------------------------------


def _codecs(playlist: Any) -> list[str] | None:
    codecs = playlist.stream_info.codecs
    if not codecs:
        return None
    return [codec.strip().lower() for codec in codecs.split(",") if codec.strip()]


def _carries_audio(playlist: Any) -> bool | None:
    """Whether a variant stream carries audio by its CODECS; None when it names none."""
    codecs = _codecs(playlist)
    if codecs is None:
        return None
    return any(codec.startswith(_AUDIO_CODECS) for codec in codecs)


def choose(master: m3u8.M3U8, master_url: URL) -> URL:
    """The media playlist to fetch from a master playlist.

    An audio rendition (EXT-X-MEDIA TYPE=AUDIO with a URI) first: it is the audio
    alone, the fewest bytes, and the stream every variant plays (DEFAULT=YES, then
    AUTOSELECT=YES, then the first listed).  Otherwise the lowest-bandwidth variant
    whose CODECS name an audio codec, or, when no variant names its codecs, the
    lowest-bandwidth variant: audio is the same in every variant, video is not.
    """
    renditions = [m for m in master.media if (m.type or "").upper() == "AUDIO" and m.uri]
    if renditions:
        order = {id(m): i for i, m in enumerate(renditions)}
        best = min(
            renditions,
            key=lambda m: (m.default != "YES", m.autoselect != "YES", order[id(m)]),
        )
        return resolve(master_url, best.uri)
    variants = [p for p in master.playlists if p.uri]
    pool = [p for p in variants if _carries_audio(p)] or [
        p for p in variants if _carries_audio(p) is None
    ]
    if not pool:
        raise DownloadError("HLS master playlist has no audio rendition and no variant with audio")
    best = min(pool, key=lambda p: p.stream_info.bandwidth or math.inf)
    return resolve(master_url, best.uri)


# -- media playlists --------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One thing to fetch: a URL, and a byte range of it (offset, length) or None."""

    url: URL
    byte_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class Segment:
    resource: Resource
    #: the init section (EXT-X-MAP) it needs before it, if any
    init: Resource | None
    #: AES-128: (key URL, IV); None when in the clear
    aes: tuple[URL, bytes] | None


def _byte_range(spec: str | None, url: URL, next_offsets: dict[URL, int]) -> tuple[int, int] | None:
    """EXT-X-BYTERANGE ``n[@o]`` as (offset, length); with no ``@o`` the range starts
    where the previous range of the same resource ended."""
    if spec is None:
        return None
    length_text, _, offset_text = str(spec).partition("@")
    try:
        length = int(length_text)
        offset = int(offset_text) if offset_text else next_offsets[url]
    except (ValueError, KeyError):
        raise DownloadError(f"HLS playlist has an unusable byte range: {spec!r}") from None
    if length <= 0 or offset < 0:
        raise DownloadError(f"HLS playlist has an unusable byte range: {spec!r}")
    next_offsets[url] = offset + length
    return offset, length


def _iv(key: Any, media_sequence: int) -> bytes:
    """The key's IV attribute, or the segment's media sequence number as a 16-byte
    big-endian integer (RFC 8216 5.2)."""
    if not key.iv:
        if not 0 <= media_sequence < 1 << 128:
            raise DownloadError(f"HLS playlist has an unusable media sequence: {media_sequence}")
        return media_sequence.to_bytes(16, "big")
    text = str(key.iv)
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        if len(digits) > 32:
            raise ValueError
        return bytes.fromhex(digits.rjust(32, "0"))
    except ValueError:
        raise DownloadError(f"HLS key has an unusable IV: {text[:40]!r}") from None


def _aes(segment: Any, base: URL) -> tuple[URL, bytes] | None:
    key = segment.key
    method = (key.method or "NONE").upper() if key is not None else "NONE"
    if method == "NONE":
        return None
    if method != "AES-128":
        raise DownloadError(
            f"HLS segments are encrypted with {method}: only AES-128 can be decrypted"
        )
    if key.keyformat and key.keyformat.lower() != "identity":
        raise DownloadError(f"HLS segments use the key system {key.keyformat!r}: not supported")
    if not key.uri:
        raise DownloadError("HLS AES-128 key has no URI")
    return resolve(base, key.uri), _iv(key, segment.media_sequence or 0)


def plan(playlist: m3u8.M3U8, playlist_url: URL, limits: DownloadLimits) -> list[Segment]:
    """What to fetch, in order; every reason to refuse the playlist is found here,
    before a single segment is fetched."""
    if playlist.is_variant:
        raise DownloadError("HLS master playlist names another master playlist")
    if not playlist.is_endlist:
        raise DownloadError(
            "live HLS playlist (no #EXT-X-ENDLIST): only VOD playlists can be fetched"
        )
    if not playlist.segments:
        raise DownloadError("HLS playlist lists no segments")
    if len(playlist.segments) > limits.max_segments:
        raise DownloadError(
            f"HLS playlist lists {len(playlist.segments)} segments, over the limit of "
            f"{limits.max_segments}"
        )
    next_offsets: dict[URL, int] = {}
    init_offsets: dict[URL, int] = {}
    planned: list[Segment] = []
    inits: set[Resource] = set()
    for segment in playlist.segments:
        url = resolve(playlist_url, segment.uri)
        resource = Resource(url, _byte_range(segment.byterange, url, next_offsets))
        init = None
        if segment.init_section is not None:
            init_url = resolve(playlist_url, segment.init_section.uri)
            init_offsets.setdefault(init_url, 0)  # EXT-X-MAP's BYTERANGE offset defaults to 0
            init = Resource(
                init_url, _byte_range(segment.init_section.byterange, init_url, init_offsets)
            )
            inits.add(init)
        planned.append(Segment(resource, init, _aes(segment, playlist_url)))
    if len(inits) > 1:
        raise DownloadError(
            "HLS playlist changes its init section (EXT-X-MAP) mid-stream: not supported"
        )
    return planned


# -- fetching ---------------------------------------------------------------------------


class _Decrypting:
    """AES-128-CBC with PKCS7 padding, streamed: a segment never has to fit in memory."""

    def __init__(self, out: Callable[[bytes], object], key: bytes, iv: bytes) -> None:
        self.out = out
        self.decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        self.unpadder = padding.PKCS7(128).unpadder()

    def write(self, chunk: bytes) -> None:
        self.out(self.unpadder.update(self.decryptor.update(chunk)))

    def close(self) -> None:
        try:
            tail = self.unpadder.update(self.decryptor.finalize())
            self.out(tail + self.unpadder.finalize())
        except ValueError:  # not whole blocks, or padding that is no padding
            raise DownloadError("does not decrypt with its AES-128 key") from None


def _check_range(response: aiohttp.ClientResponse, byte_range: tuple[int, int]) -> None:
    offset, length = byte_range
    if response.status != 206:
        raise DownloadError(
            f"the server ignored the byte range (HTTP {response.status}, not 206)",
            http_status=response.status,
        )
    content_range = response.headers.get("Content-Range", "")
    expected = f"bytes {offset}-{offset + length - 1}/"
    if not content_range.startswith(expected):
        raise DownloadError(
            f"the server sent another byte range ({content_range[:60]!r})",
            http_status=response.status,
        )


async def _fetch_into(
    transfer: Transfer, resource: Resource, part: str, write: Callable[[bytes], object]
) -> None:
    headers = None
    ok_statuses: tuple[int, ...] = (200,)
    if resource.byte_range is not None:
        offset, length = resource.byte_range
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        ok_statuses = (200, 206)
    async with transfer.get(
        resource.url, part=part, ok_statuses=ok_statuses, headers=headers
    ) as response:
        if resource.byte_range is not None:
            _check_range(response, resource.byte_range)
        body = transfer.body(response)
        while chunk := await body.read():
            write(chunk)


async def _fetch_key(transfer: Transfer, url: URL, part: str) -> bytes:
    async with transfer.get(url, part=part) as response:
        key = await transfer.body(response).read_all(KEY_BYTES)
    if key is None or len(key) != KEY_BYTES:
        raise DownloadError(f"the AES-128 key is not {KEY_BYTES} bytes")
    return key


async def _fetch_media_playlist(transfer: Transfer, url: URL) -> tuple[m3u8.M3U8, URL]:
    async with transfer.get(url, part="HLS media playlist") as response:
        body = transfer.body(response)
        text = await read_playlist(body, b"", transfer.limits)
        final_url = response.url
    return await parse(text, transfer.limits), final_url


async def fetch(transfer: Transfer, playlist_url: URL, text: str, dest: Path) -> int:
    """The stream a playlist (`text`, served at `playlist_url` after redirects) names,
    into `dest`; returns the bytes written.  A master playlist is followed to one
    media playlist, chosen by `choose`."""
    transfer.part = ""  # messages about a playlist's content say "HLS" themselves
    playlist = await parse(text, transfer.limits)
    if playlist.is_variant:
        media_url = choose(playlist, playlist_url)
        playlist, playlist_url = await _fetch_media_playlist(transfer, media_url)
        transfer.part = ""
    segments = plan(playlist, playlist_url, transfer.limits)
    keys: dict[URL, bytes] = {}
    written_init: Resource | None = None
    written_bytes = 0
    with dest.open("wb") as out:

        def write(data: bytes) -> None:
            nonlocal written_bytes
            written_bytes += len(data)
            out.write(data)

        for number, segment in enumerate(segments, 1):
            part = f"HLS segment {number} of {len(segments)}"
            if segment.init is not None and segment.init != written_init:
                await _fetch_into(transfer, segment.init, "HLS init section (EXT-X-MAP)", write)
                written_init = segment.init
            if segment.aes is None:
                await _fetch_into(transfer, segment.resource, part, write)
                continue
            key_url, iv = segment.aes
            if key_url not in keys:
                keys[key_url] = await _fetch_key(transfer, key_url, f"HLS key of segment {number}")
            decrypting = _Decrypting(write, keys[key_url], iv)
            await _fetch_into(transfer, segment.resource, part, decrypting.write)
            transfer.part = part
            decrypting.close()
    log.debug("HLS: %d segments, %d bytes", len(segments), written_bytes)
    return written_bytes

"""Images from request bodies: data URLs always, http(s) URLs only when the operator allows them.

Limits are checked before any pixel is decoded: the encoded size against ``max_bytes``, the
header's width x height against ``max_pixels`` (so a decompression bomb is refused from its header).
Fetched URLs must resolve to public addresses: private, loopback, link-local, shared and other
non-global ranges are refused, also where an IPv6 address embeds an IPv4 one (the server must not
become a way into its own network); the connection goes to the address that was checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import APIError


@dataclass
class ImageLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    max_images: int = 8
    allow_urls: bool = False
    url_timeout_s: float = 10.0


def _bad(message: str, param: str, code: str = "invalid_image", status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


def decode_image(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise _bad(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", param, "image_too_large")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        # Pillow's own limit (twice MAX_IMAGE_PIXELS) refuses some headers before ours is asked
        raise _bad(f"image is too large to decode ({e})", param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        # ValueError: a PNG text chunk that inflates past Pillow's limit, among others
        raise _bad(f"image could not be decoded ({type(e).__name__})", param) from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise _bad(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}", param,
                   "image_too_large")
    if w == 0 or h == 0:
        raise _bad("image has no pixels", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise _bad(f"image could not be decoded ({type(e).__name__}: {e})", param) from None


def decode_data_url(url: str, param: str, limits: ImageLimits) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise _bad("expected a data URL of the form data:image/<type>;base64,<data>", param)
    if not header[5:].startswith("image/"):
        raise _bad(f"data URL media type {header[5:-7]!r} is not an image type", param)
    if len(payload) * 3 // 4 > limits.max_bytes + 3:  # refuse before decoding
        raise _bad(f"image is about {len(payload) * 3 // 4} bytes, over the limit of {limits.max_bytes}", param,
                   "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("data URL payload is not valid base64", param) from None
    return decode_image(data, param, limits)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _public(address: str) -> bool:
    """Whether ``address`` is globally routable, including every IPv4 address an IPv6 one embeds
    (mapped, 6to4, Teredo, NAT64): ``is_global`` leaves out 100.64.0.0/10 and the other shared and
    reserved ranges that ``is_private`` misses."""
    ip = ipaddress.ip_address(address.split("%")[0])
    embedded: list[ipaddress._BaseAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour:
            embedded.append(ip.sixtofour)
        if ip.teredo:
            embedded.extend(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(a.is_global and not a.is_multicast for a in embedded)


def _parse_url(url: str, param: str):
    """The URL as it will be fetched: one parse (httpx's), used both to check the host and to
    connect, so the host checked is the host reached."""
    import httpx

    if "\\" in url or any(ord(c) < 0x21 for c in url):
        raise _bad("image URL contains a backslash, space or control character", param)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise _bad(f"image URL is not a valid URL ({e})", param) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _bad("image URL must be http(s)://host/...", param)
    if parsed.userinfo:
        raise _bad("image URL must not carry credentials (user@host)", param)
    return parsed


async def fetch_image(url: str, param: str, limits: ImageLimits) -> Image.Image:
    import httpx

    if not limits.allow_urls:
        raise _bad("image URLs are disabled on this server (send a data: URL, or start it with "
                   "--allow-image-urls)", param, "image_urls_disabled")
    parsed = _parse_url(url, param)
    host, port = parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), limits.url_timeout_s)
    except (OSError, TimeoutError, UnicodeError):
        raise _bad(f"image URL host {host!r} could not be resolved", param, "image_fetch_failed") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not all(_public(a) for a in addresses):
        raise _bad(f"image URL host {host!r} resolves to a private, loopback or reserved address",
                   param, "image_url_forbidden")
    # Connect to the address just checked, not to a second lookup of the name (DNS rebinding);
    # the Host header and TLS server name keep the original host.
    pinned = parsed.copy_with(host=addresses[0])
    headers = {"Host": parsed.netloc.decode("ascii")}
    try:
        async with httpx.AsyncClient(timeout=limits.url_timeout_s, follow_redirects=False) as client:
            request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": host})
            resp = await client.send(request, stream=True)
            try:
                if resp.status_code != 200:
                    raise _bad(f"image URL answered HTTP {resp.status_code}", param, "image_fetch_failed")
                chunks, total = [], 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise _bad(f"image at URL is over the limit of {limits.max_bytes} bytes", param,
                                   "image_too_large")
                    chunks.append(chunk)
            finally:
                await resp.aclose()
    except httpx.HTTPError as e:
        raise _bad(f"image URL could not be fetched ({type(e).__name__})", param, "image_fetch_failed") from None
    return decode_image(b"".join(chunks), param, limits)


async def load_image(url: str, param: str, limits: ImageLimits) -> Image.Image:
    if url.startswith("data:"):
        return await asyncio.get_running_loop().run_in_executor(None, decode_data_url, url, param, limits)
    return await fetch_image(url, param, limits)

"""Images in chat requests, loaded in the API process before any runner sees them, safely.

`data:image/...;base64,` URLs are decoded. `http(s)://` URLs are fetched under hearth/net.py's rules (public
addresses only unless `image_fetch_allow` names them, the connection pinned to the checked address, every redirect
checked, at most 3), each refusal a 400 that names its rule; the body is capped while it is read; the whole fetch
has a timeout; and what arrives must decode as an image (Pillow), within a pixel limit read from its header before
anything is decoded, and under one memory budget for all decodes at once. Fetching can be turned off.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from hearth.errors import InvalidRequest
from hearth.net import AddressPolicy, FetchRefused, open_checked
from hearth.settings import Settings

MAX_REDIRECTS = 3
DATA_URL = re.compile(r"data:([^;,]*)(;[^,]*)?,(.*)", re.S)


@dataclass
class ImagePolicy:
    enabled: bool
    addresses: AddressPolicy
    max_bytes: int
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        return cls(settings.image_fetch, AddressPolicy.from_list(settings.image_fetch_allow), settings.image_max_bytes,
                   settings.image_fetch_timeout)


def _refuse(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"image refused: {why}", param=param, code="invalid_image_url")


class DecodeBudget:
    """Bytes that image decoding may hold at once in this process; a decode waits until its share is free (one
    larger than the whole budget waits until it is alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        with self._free:
            self._free.wait_for(lambda: self.used == 0 or self.used + amount <= self.limit)
            self.used += amount
        try:
            yield
        finally:
            with self._free:
                self.used -= amount
                self._free.notify_all()


@dataclass
class ImageLimits:
    max_pixels: int
    budget: DecodeBudget


_limits = ImageLimits(max_pixels=50_000_000, budget=DecodeBudget(1024 * 2**20))
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2}  # others are held as 4 bytes a pixel by Pillow
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
DECODE_SIDE = 2048


def configure_image_limits(settings: Settings) -> None:
    """The process's image limits, from the settings (set once, when the app is made)."""
    from PIL import Image

    global _limits
    _limits = ImageLimits(max_pixels=int(settings.image_max_megapixels * 1_000_000),
                          budget=DecodeBudget(settings.image_decode_memory_mb * 2**20))
    Image.MAX_IMAGE_PIXELS = _limits.max_pixels  # Pillow's own bomb guard, from the same number
    _return_large_blocks()


def _return_large_blocks() -> None:
    """Make glibc give every block of 1 MiB or more straight back to the system when it is freed. By default it
    raises that threshold after the first large free (up to 32 MiB), so Pillow's 16 MiB image blocks then come from
    heaps it keeps: eight large decodes left the API process 250 MB larger for good."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _decode(data: bytes) -> None:
    """Decode the whole image (so a broken one is found here, not in the runner), keeping nothing of it; a JPEG is
    decoded at a reduced scale no smaller than DECODE_SIDE, which no vision model's input exceeds."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (DECODE_SIDE, DECODE_SIDE))  # (a no-op for formats without reduced decoding)
        image.load()


def check_image(data: bytes, param: str) -> bytes:
    """The bytes, if Pillow reads them as an image within the pixel limit; else a 400. Its size is read from the
    header before anything is decoded, and the decode waits for its share of the memory budget."""
    from PIL import Image, UnidentifiedImageError

    limits = _limits
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            mode, fmt = image.mode, image.format
            image.verify()
        pixels = width * height
        if pixels > limits.max_pixels:
            raise _refuse(param, f"the image is {width}x{height}, {pixels / 1e6:.1f} megapixels; the limit is "
                                 f"{limits.max_pixels / 1e6:g} (the server's image_max_megapixels setting)")
        if fmt == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale down to DECODE_SIDE (Pillow's draft)
            scale = 1
            while scale < 8 and min(width, height) // (scale * 2) >= DECODE_SIDE:
                scale *= 2
            pixels //= scale * scale
        with limits.budget.reserve(pixels * BYTES_PER_PIXEL.get(mode, 4)):
            _decode(data)
    except Image.DecompressionBombError:  # Pillow's guard, at twice the limit, fires as the header is read
        raise _refuse(param, f"the image is more than twice the limit of {limits.max_pixels / 1e6:g} megapixels "
                             "(the server's image_max_megapixels setting)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _refuse(param, f"the data is not an image Hearth can read ({exc})") from None
    return data


async def check_image_async(data: bytes, param: str) -> bytes:
    """check_image off the event loop: decoding a large image takes a while."""
    return await asyncio.to_thread(check_image, data, param)


def decode_data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if not match:
        raise _refuse(param, "a data: URL must look like data:image/png;base64,...")
    if not match.group(1).lower().startswith("image/"):
        raise _refuse(param, f"the data: URL is not an image (data:{match.group(1) or '?'}, not data:image/...)")
    if ";base64" not in (match.group(2) or ""):
        raise _refuse(param, "the data: URL must be base64-encoded (data:image/...;base64,...)")
    payload = match.group(3)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _refuse(param, f"the image is larger than the limit of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(param, "the data: URL is not valid base64") from None
    return check_image(data, param)


async def fetch_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    """An http(s) image, fetched under the rules in hearth/net.py, with a size cap and a timeout."""
    if not policy.enabled:
        raise _refuse(param, "fetching image URLs is turned off on this server; send the image as a data: URL")
    try:
        async with asyncio.timeout(policy.timeout):
            return await _fetch(url, policy, param)
    except TimeoutError:
        raise _refuse(param, f"fetching it took longer than {policy.timeout:g} s") from None
    except FetchRefused as exc:
        raise _refuse(param, str(exc)) from None


async def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout) as client:
        response = await open_checked(client, url, policy.addresses, headers={"Accept": "image/*"},
                                      max_redirects=MAX_REDIRECTS)
        try:
            if response.status_code != 200:
                raise _refuse(param, f"the server answered {response.status_code}")
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _refuse(param, f"the image is larger than the limit of {policy.max_bytes} bytes")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise _refuse(param, f"the image is larger than the limit of {policy.max_bytes} bytes")
            return await check_image_async(bytes(body), param)
        finally:
            await response.aclose()


async def load_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    if url.startswith("data:"):
        return await asyncio.to_thread(decode_data_url, url, policy, param)
    return await fetch_image(url, policy, param)

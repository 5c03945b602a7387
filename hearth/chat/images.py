"""Images in chat requests, loaded in the API process before any runner sees them, safely.

`data:image/...;base64,` URLs are decoded. `http(s)://` URLs are fetched under hearth/net.py's rules (public
addresses only unless `image_fetch_allow` names them, the connection pinned to the checked address, every redirect
checked, at most 3), each refusal a 400 that names its rule; the body is capped while it is read; the whole fetch
has a timeout; and what arrives must decode as an image (Pillow). Fetching can be turned off.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
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


def check_image(data: bytes, param: str) -> bytes:
    """The bytes, if Pillow reads them as an image; else a 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
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

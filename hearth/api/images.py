"""Images in chat requests, loaded in the API process before any runner sees them, safely.

`data:image/...;base64,` URLs are decoded. `http(s)://` URLs are fetched under these rules, each refusal a 400
that names its rule: http and https only; the host is resolved once and every address it gives must be public
(loopback, private, link-local, multicast, reserved and other non-global ranges are refused unless the
`image_fetch_allow` setting names the host, the address or a range holding it); the connection goes to the
checked address (no second DNS lookup: the name travels in the Host header and TLS SNI, and certificates are still
checked against it); every redirect (at most 3) is checked the same way; the body is capped while it is read; the
whole fetch has a timeout; and what arrives must decode as an image (Pillow). Fetching can be turned off.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from hearth.errors import InvalidRequest
from hearth.settings import Settings

MAX_REDIRECTS = 3
DATA_URL = re.compile(r"data:([^;,]*)(;[^,]*)?,(.*)", re.S)


@dataclass
class ImagePolicy:
    enabled: bool
    allow_hosts: set[str]
    allow_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    max_bytes: int
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        hosts, networks = set(), []
        for item in settings.image_fetch_allow:
            item = item.strip().lower()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.rstrip("."))
        return cls(settings.image_fetch, hosts, networks, settings.image_max_bytes, settings.image_fetch_timeout)

    def address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.allow_networks)


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


async def _resolve(host: str, port: int, policy: ImagePolicy, param: str) -> str:
    """The one address to connect to: every address the name has must pass, or the host is allowed by name."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        addresses = []
    if not addresses:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _refuse(param, f"the host {host} could not be resolved ({exc})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise _refuse(param, f"the host {host} has no address")
    by_name = host.lower().rstrip(".") in policy.allow_hosts
    for address in addresses:
        mapped = getattr(address, "ipv4_mapped", None) or address
        if by_name or policy.address_allowed(mapped) or policy.address_allowed(address):
            continue
        if not mapped.is_global or mapped.is_multicast:
            kind = ("loopback" if mapped.is_loopback else "private" if mapped.is_private else
                    "link-local" if mapped.is_link_local else "multicast" if mapped.is_multicast else
                    "reserved" if mapped.is_reserved else "non-public")
            raise _refuse(param, f"{host} resolves to {address}, a {kind} address; only public addresses are "
                                 f"fetched unless the image_fetch_allow setting names it")
    return str(addresses[0])


async def fetch_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    """An http(s) image, fetched under the rules in this module's docstring."""
    if not policy.enabled:
        raise _refuse(param, "fetching image URLs is turned off on this server; send the image as a data: URL")
    try:
        async with asyncio.timeout(policy.timeout):
            return await _fetch(url, policy, param)
    except TimeoutError:
        raise _refuse(param, f"fetching it took longer than {policy.timeout:g} s") from None


async def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise _refuse(param, f"only http and https URLs are fetched, not {parts.scheme or 'this'}:")
            if not parts.hostname:
                raise _refuse(param, "the URL has no host")
            if parts.username or parts.password:
                raise _refuse(param, "URLs with credentials are not fetched")
            host = parts.hostname
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise _refuse(param, "the URL's port is not valid") from None
            address = await _resolve(host, port, policy, param)
            netloc = f"[{address}]" if ":" in address else address
            target = parts._replace(netloc=f"{netloc}:{port}").geturl()
            host_header = host if port in (80, 443) else f"{host}:{port}"
            if ":" in host and not host.startswith("["):
                host_header = f"[{host}]" if port in (80, 443) else f"[{host}]:{port}"
            request = client.build_request("GET", target, headers={"Host": host_header, "Accept": "image/*"},
                                           extensions={"sni_hostname": host})
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _refuse(param, f"fetching it failed: {exc.__class__.__name__}: {exc}") from None
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _refuse(param, "a redirect without a Location")
                    url = urljoin(url, location)
                    continue
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
                return check_image(bytes(body), param)
            finally:
                await response.aclose()
    raise _refuse(param, f"more than {MAX_REDIRECTS} redirects")


async def load_image(url: str, policy: ImagePolicy, param: str) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, policy, param)
    return await fetch_image(url, policy, param)

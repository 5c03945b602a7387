"""Fetching URLs on a user's behalf, safely: the rules image URLs and model downloads share.

http and https only; the host is resolved once and every address it gives must be public (loopback, private,
link-local, multicast, reserved and other non-global ranges are refused unless the allow-list names the host, the
address or a range holding it); the connection goes to the checked address (no second DNS lookup: the name
travels in the Host header and TLS SNI, and certificates are still checked against it); every redirect is checked
the same way, up to a limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchRefused(Exception):
    """A URL that may not be fetched, or a fetch that failed; the message says which rule or what happened."""


@dataclass
class AddressPolicy:
    allow_hosts: set[str] = field(default_factory=set)
    allow_networks: list[Network] = field(default_factory=list)

    @classmethod
    def from_list(cls, items: Iterable[str]) -> AddressPolicy:
        policy = cls()
        for item in items:
            item = item.strip().lower()
            if not item:
                continue
            try:
                policy.allow_networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                policy.allow_hosts.add(item.rstrip("."))
        return policy

    def allowed(self, address: Address) -> bool:
        return any(address in network for network in self.allow_networks)


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))  # RFC 6052, RFC 8215


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and may reach: IPv4-mapped, IPv4-compatible, NAT64 (which a network
    with a NAT64 gateway routes to that IPv4 address), 6to4 and Teredo's client."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _kind(address: Address) -> str | None:
    """Why an address is not fetched by default, or None for a public one."""
    if address.is_global and not address.is_multicast:
        return None
    return ("loopback" if address.is_loopback else "private" if address.is_private else
            "link-local" if address.is_link_local else "multicast" if address.is_multicast else
            "reserved" if address.is_reserved else "non-public")


async def resolve_checked(host: str, port: int, policy: AddressPolicy) -> str:
    """The one address to connect to: every address the name has must pass, or the host is allowed by name."""
    try:
        addresses: list[Address] = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        addresses = []
    if not addresses:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchRefused(f"the host {host} could not be resolved ({exc})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise FetchRefused(f"the host {host} has no address")
    by_name = host.lower().rstrip(".") in policy.allow_hosts
    for address in addresses:
        inner = embedded_ipv4(address)
        if by_name or policy.allowed(address) or (inner is not None and policy.allowed(inner)):
            continue
        # An address that carries an IPv4 one is judged by it too: ::7f00:1 or 64:ff9b::a00:1 reach 127.0.0.1 and
        # 10.0.0.1 as surely as those addresses do.
        for judged in (address, inner) if inner is not None else (address,):
            kind = _kind(judged)
            if kind is not None:
                carried = f" (it carries {judged})" if judged is not address else ""
                raise FetchRefused(f"{host} resolves to {address}, a {kind} address{carried}; only public addresses "
                                   f"are fetched unless the allow-list setting names it")
    return str(addresses[0])


async def open_checked(client: httpx.AsyncClient, url: str, policy: AddressPolicy, *,
                       headers: dict[str, str] | None = None, max_redirects: int = 3) -> httpx.Response:
    """A streaming GET of `url` under the rules above; the caller reads the body and closes the response.

    `headers` go with every hop, except Authorization, which stays with the first host.
    """
    first_host = None
    for _hop in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchRefused(f"only http and https URLs are fetched, not {parts.scheme or 'this'}:")
        if not parts.hostname:
            raise FetchRefused("the URL has no host")
        if parts.username or parts.password:
            raise FetchRefused("URLs with credentials are not fetched")
        host = parts.hostname
        first_host = first_host or host
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchRefused("the URL's port is not valid") from None
        address = await resolve_checked(host, port, policy)
        netloc = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        shown = f"[{host}]" if ":" in host else host
        hop_headers = {"Host": shown if port in (80, 443) else f"{shown}:{port}"}
        for key, value in (headers or {}).items():
            if key.lower() != "authorization" or host == first_host:
                hop_headers[key] = value
        request = client.build_request("GET", target, headers=hop_headers, extensions={"sni_hostname": host})
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise FetchRefused(f"fetching {host} failed: {exc.__class__.__name__}: {exc}") from None
        if not response.is_redirect:
            return response
        location = response.headers.get("location")
        await response.aclose()
        if not location:
            raise FetchRefused("a redirect without a Location")
        url = urljoin(url, location)
    raise FetchRefused(f"more than {max_redirects} redirects")

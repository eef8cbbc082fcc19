"""Where a webhook may go. A tenant's callback_url must not turn a worker into its way
into this host, the local network, a cloud's metadata service or the stack's own
Postgres, Redis and object store: a URL whose host resolves to any such address is
refused unless HEPATO_WEBHOOK_ALLOWED_HOSTS names it. Checked at submission, and again
before every attempt against a fresh resolution (DNS can change in between); the attempt
then connects to the very address checked, so a name that changes between the check and
the connect gains nothing."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from hepato.common.exceptions import CallbackRefused
from hepato.common.settings import Settings

# Far beyond any real receiver's URL; httpx refuses past 64 KiB, and each row keeps it.
MAX_URL_CHARS = 2048
ALLOW_SETTING = "HEPATO_WEBHOOK_ALLOWED_HOSTS"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Target:
    """A checked callback: connect to ``address``, name ``host`` (Host header, TLS)."""

    url: str
    host: str
    port: int
    address: str


def resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives ``host`` (an IP literal is itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check(url: str, settings: Settings) -> Target:
    """The address to connect to for ``url``; CallbackRefused naming why there is none."""
    if len(url) > MAX_URL_CHARS:
        raise CallbackRefused(f"the URL is longer than {MAX_URL_CHARS:,} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CallbackRefused(f"not a valid URL ({exc})") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise CallbackRefused("not an http or https URL with a host")
    try:
        addresses = [_address(found) for found in resolve(host, port)]
    except (OSError, UnicodeError, ValueError) as exc:
        raise CallbackRefused(f"host {host!r} could not be resolved ({exc})") from None
    if not addresses:
        raise CallbackRefused(f"host {host!r} has no address")
    names, networks = _allowed(settings.webhook_allowed_hosts)
    if host not in names:
        services: dict[Address, str] | None = None
        for address in addresses:
            if any(address in network for network in networks):
                continue
            why = _class_of(address)
            if why is None:
                services = _services(settings) if services is None else services
                why = services.get(address)
            if why is not None:
                where = (
                    f"{address} is" if host == str(address) else f"{host} resolves to {address},"
                )
                raise CallbackRefused(f"{where} {why}; {ALLOW_SETTING} can allow it")
    return Target(url=url, host=host, port=port, address=str(addresses[0]))


def _address(text: str) -> Address:
    address = ipaddress.ip_address(text)
    # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel; judge what it reaches.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _class_of(address: Address) -> str | None:
    """Why an address is off limits by its class alone; None for a public one."""
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "the unspecified address (this host)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global:
        return "not a public address"
    return None


def _allowed(entries: list[str]) -> tuple[set[str], list[Network]]:
    names: set[str] = set()
    networks: list[Network] = []
    for entry in entries:
        bare = entry.strip().strip("[]").lower()
        try:
            networks.append(ipaddress.ip_network(bare, strict=False))
        except ValueError:
            names.add(bare)
    return names, networks


def _services(settings: Settings) -> dict[Address, str]:
    """The addresses of the stack's own services (a public one, as a cloud's is, has no
    class that would refuse it)."""
    hosts = {
        "Postgres": make_url(settings.database_url).host,
        "Redis": urlsplit(settings.redis_url).hostname,
        "object store": urlsplit(f"//{settings.s3_endpoint}").hostname,
    }
    found: dict[Address, str] = {}
    for name, host in hosts.items():
        if not host or host.startswith("/"):  # a Unix socket
            continue
        try:
            for address in resolve(host, 0):
                found.setdefault(_address(address), f"the address of the stack's {name}")
        except (OSError, UnicodeError, ValueError):
            continue  # a service this process cannot resolve is not one it can reach
    return found

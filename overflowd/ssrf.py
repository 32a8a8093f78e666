"""Where a node may send HTTP requests: refuse internal addresses (SSRF), pure policy.

Webhook URLs come from config now and from DNS records of strangers later (the registry issue),
so a URL is attacker input: ``http://127.0.0.1:5432/`` or ``http://169.254.169.254/`` must never
be fetched because some zone published it. The rule: every address a URL's host resolves to
must be *global*; loopback, private (RFC 1918, ULA), link-local, shared (RFC 6598), multicast,
reserved, unspecified and documentation ranges are refused unless an operator-configured
``allow_prefixes`` entry covers the address (tests allow 127.0.0.0/8 explicitly).

Sans-IO: the caller resolves the name and passes the addresses in; this module never touches
the network. Checking *every* resolved address, then connecting to one of the checked ones (not
resolving again), is what closes the DNS-rebinding gap; :mod:`overflowd.services.webhook` does
the connecting.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from overflowd.errors import DeliveryError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(DeliveryError):
    """A target address that policy refuses (internal, reserved, or not allowed)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL split for connecting: scheme, host as written, port, and whether host is an IP."""

    scheme: str
    host: str
    port: int
    literal: Address | None


def parse_prefixes(texts: Iterable[str]) -> tuple[Network, ...]:
    """``["127.0.0.0/8", "::1/128"]`` → networks; ValueError names the bad entry."""
    out: list[Network] = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP prefix") from None
    return tuple(out)


#: Longest webhook URL accepted (the outbox column holds 2048 characters).
MAX_URL_CHARS = 2048


def parse_target(url: str, *, require_https: bool = True) -> Target:
    """Check a URL's form: http(s), a host, no credentials; DeliveryError otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise DeliveryError(f"webhook URL is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise DeliveryError("webhook URL holds white space or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DeliveryError(f"webhook URL is malformed: {exc}") from None
    allowed = ("https",) if require_https else ("https", "http")
    if parts.scheme not in allowed:
        raise DeliveryError(f"webhook URL scheme must be {' or '.join(allowed)}")
    if parts.username is not None or parts.password is not None:
        raise DeliveryError("webhook URL must not carry credentials")
    host = parts.hostname
    if not host:
        raise DeliveryError("webhook URL has no host")
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None:
        try:
            host.encode("idna")
        except UnicodeError as exc:
            raise DeliveryError(f"webhook URL host is not a valid name: {exc}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Target(scheme=parts.scheme, host=host, port=port, literal=literal)


def is_internal(address: Address) -> bool:
    """True for anything that is not a plain global unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
            return is_internal(mapped)
        # 6to4 (2002::/16) and Teredo embed an IPv4 address a relay would deliver to.
        if address.sixtofour is not None and is_internal(address.sixtofour):
            return True
        if address.teredo is not None and is_internal(address.teredo[1]):
            return True
    return (
        not address.is_global
        or address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_address(address: Address, allow_prefixes: Sequence[Network] = ()) -> None:
    """Raise :class:`AddressRefused` unless ``address`` is global or explicitly allowed."""
    for net in allow_prefixes:
        if address.version == net.version and address in net:
            return
    if is_internal(address):
        raise AddressRefused(f"refusing to connect to internal address {address}")


def check_addresses(addresses: Iterable[Address], allow_prefixes: Sequence[Network] = ()) -> None:
    """Every resolved address must pass: one internal answer taints the name."""
    seen = False
    for address in addresses:
        seen = True
        check_address(address, allow_prefixes)
    if not seen:
        raise DeliveryError("the webhook host has no address")

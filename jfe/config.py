"""jfe's settings: the ``[jfe]`` section of the node home's overflowd.toml (S5-DESIGN.md).

Parsed as strictly as the node parses its own sections (`overflowd.config.load_section`): an
unknown key or a wrong type names the file, line and key. ``[jfe.certificates]`` belongs to
jfe.certconfig (the certificate side); `load_jfe` reads both.

Every limit here bounds what one attacker's connection may cost; the reason sits beside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jfe.certconfig import CertificateSettings
from overflowd.config import load_section

BackendMode = Literal["transparent", "proxy_v2"]


@dataclass(frozen=True)
class JfeSettings:
    #: TCP ports whose connections to this host's own addresses jfe intercepts. Empty: none
    #: (jfe then only reports that nothing is configured).
    ports: tuple[int, ...] = ()
    #: Ports never intercepted, even if listed in ``ports`` (a safety net for ssh, say).
    excluded_ports: tuple[int, ...] = (22,)
    #: Destination addresses or prefixes to intercept; empty means every local, non-loopback
    #: address (the nft ``fib daddr type local`` match).
    addresses: tuple[str, ...] = ()
    #: cgroup v2 paths (relative to the cgroup root, e.g. ``system.slice/nginx.service``): when
    #: given, only connections to sockets in these cgroups are intercepted (nft
    #: ``socket cgroupv2``). The paths must exist when the rules are applied.
    cgroups: tuple[str, ...] = ()
    #: Ports whose backends get a PROXY v2 header instead of a transparent bind. A PROXY v2
    #: backend waits for the header, so on these ports jfe waits for the client's first bytes
    #: up to ``handshake_timeout_s`` before sending an address-only header: use it for
    #: client-speaks-first protocols (HTTP), or accept that delay on a server's banner.
    proxy_v2_ports: tuple[int, ...] = ()
    #: The transparent listener TPROXY delivers to; 127.0.0.1 is never reachable from outside.
    listen_address: str = "127.0.0.1"
    listen_port: int = 8443
    #: Packet and connection mark jfe's rules and upstream sockets use, and the policy-routing
    #: table and rule priority: pick values nothing else on the host uses.
    fwmark: int = 0x6A66
    route_table: int = 27238
    rule_priority: int = 27238
    #: jfe's own nftables table (family inet); jfe never touches any other.
    nft_table: str = "jfe"
    #: All connections at once: each costs two sockets and up to two pipes (file descriptors).
    #: Memory beyond the kernel's socket buffers: an idle TLS connection ~40 KiB (its
    #: SSLObject); while a peer reads slower than the other side sends, up to ~0.5 MiB of TLS
    #: bytes waiting (256 KiB per direction), or the pipes' pages on a pass-through.
    max_connections: int = 10000
    #: Per client address, so one host cannot take the whole budget.
    max_connections_per_client: int = 200
    #: Time for the ClientHello and the TLS handshake together; slow-loris clients are cut.
    handshake_timeout_s: float = 10.0
    #: Connecting to the original destination.
    connect_timeout_s: float = 5.0
    #: A connection where NEITHER side says anything for this long is closed (one quiet
    #: direction is normal: a download with a silent client).
    idle_timeout_s: float = 600.0
    #: The status file and Prometheus textfile are rewritten this often.
    status_interval_s: float = 1.0

    def problems(self) -> Iterable[tuple[str, str]]:
        for key in ("ports", "excluded_ports", "proxy_v2_ports"):
            for port in getattr(self, key):
                if not 1 <= port <= 65535:
                    yield key, f"port {port} is not in 1..65535"
        if not 1 <= self.listen_port <= 65535:
            yield "listen_port", "must be in 1..65535"
        if self.listen_port in self.ports:
            yield "listen_port", "must not be one of the intercepted ports"
        # A PROXY v2 port that is not intercepted would silently do nothing (review-jfe).
        for port in self.proxy_v2_ports:
            if port not in self.ports or port in self.excluded_ports:
                yield "proxy_v2_ports", f"port {port} is not an intercepted port ('jfe.ports')"
        for address in self.addresses:
            try:
                net = ipaddress.ip_network(address, strict=False)
            except ValueError:
                yield "addresses", f"{address!r} is not an address or prefix"
                continue
            if net.version != 4:
                yield "addresses", f"{address}: jfe intercepts IPv4 only so far"
        try:
            listen = ipaddress.ip_address(self.listen_address)
        except ValueError:
            yield "listen_address", f"{self.listen_address!r} is not an IP address"
        else:
            if listen.version != 4:
                yield "listen_address", "must be an IPv4 address"
        for cgroup in self.cgroups:
            if not cgroup or cgroup.startswith("/") or ".." in cgroup.split("/") or '"' in cgroup:
                yield "cgroups", f"{cgroup!r}: a path relative to the cgroup v2 root"
        if not self.nft_table.isidentifier():
            yield "nft_table", "letters, digits and _ only"
        for key in ("fwmark", "route_table", "rule_priority"):
            if not 1 <= getattr(self, key) < 2**31:
                yield key, "must be in 1..2**31-1"
        if self.route_table in (253, 254, 255):
            yield "route_table", "must not be the default, main or local table"
        for key in ("max_connections", "max_connections_per_client"):
            if getattr(self, key) < 1:
                yield key, "must be at least 1"
        for key in (
            "handshake_timeout_s",
            "connect_timeout_s",
            "idle_timeout_s",
            "status_interval_s",
        ):
            if not getattr(self, key) > 0:
                yield key, "must be positive"

    def mode(self, port: int) -> BackendMode:
        return "proxy_v2" if port in self.proxy_v2_ports else "transparent"


@dataclass(frozen=True)
class JfeConfig:
    proxy: JfeSettings
    certificates: CertificateSettings


def load_jfe(home: Path) -> JfeConfig:
    """``[jfe]`` and ``[jfe.certificates]`` of ``home``'s overflowd.toml (defaults if absent)."""
    return JfeConfig(
        proxy=load_section(home, "jfe", JfeSettings, subtables=("certificates",)),
        certificates=load_section(home, "jfe.certificates", CertificateSettings),
    )

"""``[jfe.certificates]``: where jfe's certificates come from and who may make it issue one.

Parsed by jfe's config (``overflowd.config.parse_section(text, "jfe.certificates",
CertificateSettings)``) as strictly as the node parses its own sections: unknown keys and wrong
types name the file, line and key; :meth:`CertificateSettings.problems` gives the cross-key
checks. Every limit is here with its default and its reason (docs/jfe-certificates.md).

Names come from attackers (the SNI of any client), so the defaults issue for nothing until the
operator says which names are theirs: an allow-list, an ``ask`` URL, or the DNS check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from jfe.gate import Budget, check_pattern

DAY_S = 86_400.0
HOUR_S = 3_600.0

MODES = ("local", "acme")


@dataclass(frozen=True)
class CertificateSettings:
    #: "local": leaves from the node's own CA (rooted in the node identity); "acme": from an
    #: RFC 8555 server (``acme_directory_url``), with the local CA only for the fallback.
    mode: str = "local"
    #: Where certificates are cached, relative to the node home unless absolute.
    cache_dir: str = "jfe/certs"

    # -- the gate: who may make jfe issue --------------------------------------------------
    #: Names jfe may issue for: "host.example.com" exactly, "*.example.com" one label under it.
    #: Every configured check must pass (allow-list, ask, DNS); with none configured nothing is
    #: issued (every name gets the fallback certificate).
    allow_names: tuple[str, ...] = ()
    #: Caddy's model: GET ask_url?domain=NAME&client=ADDR; a 200 answer allows NAME.
    ask_url: str = ""
    #: One ask answer within this time, or the name is refused for now (counted ask_failed).
    ask_timeout_s: float = 2.0
    #: Issue only for names whose A and AAAA records all point at this host.
    dns_check: bool = False
    #: Resolvers for the DNS check ("ADDR", "ADDR:PORT"); empty: /etc/resolv.conf.
    dns_nameservers: tuple[str, ...] = ()
    #: One DNS check (A and AAAA) within this time.
    dns_timeout_s: float = 2.0
    #: Prefixes that count as "this host" besides the addresses it can bind (a router that
    #: intercepts with TPROXY answers for addresses that are not on its interfaces).
    local_addresses: tuple[str, ...] = ()
    #: A name refused by ask or DNS (or whose issuance failed) is not asked again for this long,
    #: so one hostile client repeating a name costs one check, not one per connection.
    refused_cache_s: float = 300.0

    # -- budgets (token buckets: a burst, refilled at a rate) --------------------------------
    #: Attempts per client (IPv4 address, IPv6 /64): charged before ask/DNS and issuance, so a
    #: client cannot make jfe ask about or issue for more names than this.
    per_client_burst: int = 5
    per_client_per_hour: float = 5.0
    #: Issuances per registered domain (public suffix list): Let's Encrypt allows 50 a week.
    per_domain_burst: int = 20
    per_domain_per_hour: float = 2.0
    #: Issuances in total (Let's Encrypt: 300 new orders per 3 hours per account).
    total_burst: int = 100
    total_per_hour: float = 100.0
    #: Client and domain buckets tracked at once (least recently used forgotten first); the
    #: total bucket still caps what forgotten buckets could add.
    max_tracked_buckets: int = 65_536

    # -- certificates -----------------------------------------------------------------------
    #: Names with a certificate held in memory (each an SSLContext, ~30 KiB measured, so the
    #: default is ~60 MB); past it no new name is issued (refused "full") until one expires.
    max_names: int = 2_000
    #: Local leaves are valid this long (browsers cap publicly trusted ones at 398 days).
    leaf_lifetime_days: float = 90.0
    #: Renew a certificate this long before it expires (ACME ones too).
    renew_before_days: float = 30.0
    #: A handshake waits this long for its name's first issuance, then gets the fallback
    #: certificate while the issuance goes on (a client retrying later gets the real one).
    wait_for_issue_s: float = 10.0
    #: Issuances running at once (local signing in threads, ACME orders in threads).
    max_concurrent_issues: int = 16

    # -- ACME -------------------------------------------------------------------------------
    #: The ACME server's directory, e.g. https://acme-v02.api.letsencrypt.org/directory.
    acme_directory_url: str = ""
    #: PEM bundle to verify the ACME server's TLS certificate; empty: the system's.
    acme_ca_bundle_file: str = ""
    #: Contact for the ACME account ("mailto:..."); empty: none.
    acme_contact: str = ""
    #: One order (new-order to certificate, challenge validation included) within this time.
    acme_order_timeout_s: float = 120.0
    #: One HTTP request to the ACME server within this time.
    acme_request_timeout_s: float = 30.0

    def budget_client(self) -> Budget:
        return Budget(self.per_client_burst, self.per_client_per_hour / HOUR_S)

    def budget_domain(self) -> Budget:
        return Budget(self.per_domain_burst, self.per_domain_per_hour / HOUR_S)

    def budget_total(self) -> Budget:
        return Budget(self.total_burst, self.total_per_hour / HOUR_S)

    def problems(self) -> Iterable[tuple[str, str]]:
        if self.mode not in MODES:
            yield "mode", f"has {self.mode!r}: give one of {', '.join(MODES)}"
        if self.mode == "acme":
            url = urlsplit(self.acme_directory_url)
            if url.scheme != "https" or not url.hostname:
                yield "acme_directory_url", 'must be an https:// URL in mode = "acme"'
        for pattern in self.allow_names:
            why = check_pattern(pattern)
            if why:
                yield "allow_names", f"has {pattern!r}: {why}"
        if self.ask_url:
            url = urlsplit(self.ask_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                yield "ask_url", f"has {self.ask_url!r}, which is not an http(s):// URL"
        for prefix in self.local_addresses:
            try:
                ipaddress.ip_network(prefix, strict=True)
            except ValueError as exc:
                yield "local_addresses", f"has {prefix!r}, which is not a prefix: {exc}"
        for ns in self.dns_nameservers:
            if not _nameserver_ok(ns):
                yield "dns_nameservers", f"has {ns!r}, which is not ADDR or ADDR:PORT"
        for key in ("ask_timeout_s", "dns_timeout_s", "acme_request_timeout_s"):
            if not 0 < getattr(self, key) <= 60:
                yield key, "must be in (0, 60]"
        if not 0 < self.acme_order_timeout_s <= 3600:
            yield "acme_order_timeout_s", "must be in (0, 3600]"
        if not 0 <= self.wait_for_issue_s <= 60:
            yield "wait_for_issue_s", "must be in [0, 60]"
        if self.refused_cache_s < 0:
            yield "refused_cache_s", "must be >= 0"
        for key in ("per_client_burst", "per_domain_burst", "total_burst"):
            if getattr(self, key) < 0:
                yield key, "must be >= 0"
        for key in ("per_client_per_hour", "per_domain_per_hour", "total_per_hour"):
            if getattr(self, key) < 0:
                yield key, "must be >= 0"
        if not 1 <= self.max_tracked_buckets <= 10_000_000:
            yield "max_tracked_buckets", "must be between 1 and 10000000"
        if not 1 <= self.max_names <= 1_000_000:
            yield "max_names", "must be between 1 and 1000000"
        if not 1 <= self.max_concurrent_issues <= 256:
            yield "max_concurrent_issues", "must be between 1 and 256"
        if not 1 <= self.leaf_lifetime_days <= 398:
            yield "leaf_lifetime_days", "must be between 1 and 398 (the browsers' cap)"
        if not 0 <= self.renew_before_days < self.leaf_lifetime_days:
            yield "renew_before_days", "must be >= 0 and below leaf_lifetime_days"
        if not self.cache_dir:
            yield "cache_dir", "must not be empty"


def _nameserver_ok(text: str) -> bool:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return not port or (port.isdigit() and 0 < int(port) < 65536)

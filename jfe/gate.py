"""The certificate gate's policy: which names jfe may issue for, and how many, sans-IO.

Every name reaching this module came from an attacker (the SNI of any client). The gate decides
with values only: a name is normalised (LDH labels, no IP literals, no bare public suffix),
matched against the allow-list, and charged against token buckets (per client, per registered
domain, in total) at a ``now`` the caller gives. Refusals are :class:`Reason` values, counted by
the caller, never exceptions. The checks that need the network (the ``ask`` URL, DNS) live in
:mod:`jfe.certs`; this module never does I/O and never reads a clock.

The charge order is the abuse bound: the client's bucket is taken before any check that costs
us work (ask, DNS, issuance), so one client can make jfe do at most its budget of anything; the
domain and total buckets are taken only right before an issuance, so a flood of refused names
cannot spend the budget honest names need.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

#: RFC 1035 §2.3.4: 253 characters in presentation form without the root dot.
MAX_NAME_CHARS = 253
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Reason(enum.Enum):
    """Why a name got the fallback certificate (a metric label: keep them stable)."""

    NO_SNI = "no_sni"
    INVALID_NAME = "invalid_name"
    NO_POLICY = "no_policy"
    NOT_ALLOWED = "not_allowed"
    PUBLIC_SUFFIX = "public_suffix"
    CLIENT_BUDGET = "client_budget"
    DOMAIN_BUDGET = "domain_budget"
    TOTAL_BUDGET = "total_budget"
    ASK_REFUSED = "ask_refused"
    ASK_FAILED = "ask_failed"
    DNS_ELSEWHERE = "dns_elsewhere"
    DNS_FAILED = "dns_failed"
    RECENTLY_REFUSED = "recently_refused"
    ISSUE_FAILED = "issue_failed"
    ISSUE_PENDING = "issue_pending"
    FULL = "full"


def normalize_name(raw: str | None) -> str | None:
    """The SNI as a lower-case LDH name without the root dot, or None if it is not one.

    SNI carries A-labels (RFC 6066 §3), never an IP literal; a name that is not LDH is not a
    name we could get a certificate for, and must never reach a file name or an ACME order.
    """
    if not raw:
        return None
    name = raw.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME_CHARS or not name.isascii():
        return None
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # 192.0.2.1 and other numeric "names"
        return None
    return name


def check_pattern(pattern: str) -> str:
    """Why an allow-list pattern is unusable, or "" when it is fine (for config problems())."""
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if "*" in body:
        return 'a wildcard is only "*." followed by a name'
    name = normalize_name(body)
    if name is None:
        return "not a DNS name"
    if name != body:
        return "write it in lower case without a trailing dot"
    if pattern.startswith("*.") and registered_domain(name) is None:
        return "a wildcard directly under a public suffix would allow anybody's names"
    return ""


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # The list bundled with the package: never fetched at run time (an attacker-reachable
    # daemon must not depend on, or be steered by, a download).
    return PublicSuffixList()


def registered_domain(name: str) -> str | None:
    """The registrable domain of ``name`` ("a.b.example.co.uk" -> "example.co.uk"), or None
    for a public suffix itself ("co.uk"), which nobody can own a certificate budget for."""
    domain: str | None = _psl().privatesuffix(name)
    return domain


class AllowList:
    """Exact names and one-label wildcards ("*.example.com" matches "a.example.com" only, as a
    wildcard certificate would: RFC 6125 §6.4.3)."""

    def __init__(self, patterns: tuple[str, ...] | list[str]) -> None:
        self.exact: frozenset[str] = frozenset(p for p in patterns if not p.startswith("*."))
        self.parents: frozenset[str] = frozenset(p[2:] for p in patterns if p.startswith("*."))

    def __bool__(self) -> bool:
        return bool(self.exact or self.parents)

    def allows(self, name: str) -> bool:
        if name in self.exact:
            return True
        _, _, parent = name.partition(".")
        return parent in self.parents


@dataclass(frozen=True)
class Budget:
    """A token bucket's shape: ``burst`` tokens, refilled at ``rate_per_s``."""

    burst: int
    rate_per_s: float


class TokenBucket:
    __slots__ = ("budget", "tokens", "updated")

    def __init__(self, budget: Budget, now: float) -> None:
        self.budget = budget
        self.tokens = float(budget.burst)
        self.updated = now

    def level(self, now: float) -> float:
        if now > self.updated:
            self.tokens = min(
                float(self.budget.burst),
                self.tokens + (now - self.updated) * self.budget.rate_per_s,
            )
            self.updated = now
        return self.tokens

    def has(self, now: float) -> bool:
        return self.level(now) >= 1.0

    def take(self, now: float) -> bool:
        if self.level(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class BucketTable:
    """Buckets by key, at most ``max_entries``, least recently used forgotten first.

    Forgetting a bucket gives its key a full one later, so a client cycling through more keys
    than the table holds gets more than its share; the total bucket still bounds everything.
    """

    def __init__(self, budget: Budget, max_entries: int) -> None:
        self.budget = budget
        self.max_entries = max_entries
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.budget, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_entries:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            self._buckets.move_to_end(key)
        return bucket


def client_key(client: Address, ipv6_prefix: int = 64) -> str:
    """IPv4 per address, IPv6 per /64: one subscriber's IPv6 addresses are one client."""
    if isinstance(client, ipaddress.IPv6Address):
        mapped = client.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((client, ipv6_prefix), strict=False))
    return str(client)


@dataclass(frozen=True)
class Admitted:
    """A name the gate lets through to its network checks (``ask``, ``dns``) and issuance."""

    name: str
    domain: str
    client: str


class Gate:
    """Allow-list and budgets. All methods take ``now`` (seconds, any monotonic origin)."""

    def __init__(
        self,
        allow: AllowList,
        *,
        client_budget: Budget,
        domain_budget: Budget,
        total_budget: Budget,
        has_other_checks: bool,
        max_tracked: int = 65_536,
        now: float = 0.0,
    ) -> None:
        self.allow = allow
        self.has_other_checks = has_other_checks
        self.clients = BucketTable(client_budget, max_tracked)
        self.domains = BucketTable(domain_budget, max_tracked)
        self.total = TokenBucket(total_budget, now)

    def screen(self, server_name: str | None, client: Address, now: float) -> Admitted | Reason:
        """The checks that cost nothing, then the client's token (taken here, see module doc).

        The domain and total buckets are only looked at here (not taken), so a name that will
        be refused for budget does not cost an ``ask`` call.
        """
        if server_name is None:
            return Reason.NO_SNI
        name = normalize_name(server_name)
        if name is None:
            return Reason.INVALID_NAME
        refusal = self.policy_refuses(name)
        if refusal is not None:
            return refusal
        domain = registered_domain(name)
        if domain is None:  # policy_refuses checked it already; kept for the type
            return Reason.PUBLIC_SUFFIX
        if not self.total.has(now):
            return Reason.TOTAL_BUDGET
        if not self.domains.get(domain, now).has(now):
            return Reason.DOMAIN_BUDGET
        key = client_key(client)
        if not self.clients.get(key, now).take(now):
            return Reason.CLIENT_BUDGET
        return Admitted(name=name, domain=domain, client=key)

    def policy_refuses(self, name: str) -> Reason | None:
        """The static policy alone (no budget) for a normalised name: also what a certificate
        cached by an earlier run must still pass before it is served or renewed."""
        if not self.allow and not self.has_other_checks:
            return Reason.NO_POLICY
        if self.allow and not self.allow.allows(name):
            return Reason.NOT_ALLOWED
        if registered_domain(name) is None:
            return Reason.PUBLIC_SUFFIX
        return None

    def charge(self, admitted: Admitted, now: float) -> Reason | None:
        """Take the domain and total tokens right before issuing; None when both were taken."""
        domain = self.domains.get(admitted.domain, now)
        if not self.total.has(now):
            return Reason.TOTAL_BUDGET
        if not domain.take(now):
            return Reason.DOMAIN_BUDGET
        self.total.take(now)
        return None

    def total_left(self, now: float) -> float:
        return self.total.level(now)


class RefusalMemory:
    """Names recently refused by a check or failed, so repeats cost nothing (bounded LRU)."""

    def __init__(self, hold_s: float, max_entries: int) -> None:
        self.hold_s = hold_s
        self.max_entries = max_entries
        self._until: OrderedDict[str, tuple[float, Reason]] = OrderedDict()

    def remember(self, name: str, reason: Reason, now: float) -> None:
        if self.hold_s <= 0:
            return
        self._until[name] = (now + self.hold_s, reason)
        self._until.move_to_end(name)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def recalls(self, name: str, now: float) -> Reason | None:
        entry = self._until.get(name)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._until[name]
            return None
        return entry[1]

    def forget(self, name: str) -> None:
        self._until.pop(name, None)

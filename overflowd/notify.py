"""Budgets and delivery plans: how many messages this node may send, and to whom (sans-IO).

A node sends datagrams to addresses it reads from flow records, and flow records name
addresses that anyone can spoof. So every output is bounded here, whatever the input:

* a **global** budget (messages per second, with a burst),
* a **per-target-prefix** budget (/24 for IPv4, /48 for IPv6: what one network usually is),
* **de-duplication**: the same flow (src, dst, proto, sport, dport) is sent to the same target
  at most once per window,
* **confinement**: targets outside the operator's allowed prefixes are never sent to, and
  addresses no datagram should go to (multicast, broadcast, unspecified, reserved; loopback and
  link-local unless a prefix inside them is allowed explicitly) never are.

Each budget is a GCRA (the virtual-scheduling form of a token bucket, RFC 2475's "token
bucket" as ATM's I.371 writes it) on integer microseconds. With emission interval ``T`` (the
rate's inverse, rounded *up* to a microsecond so the real rate is never above the configured
one) and tolerance ``(burst - 1) × T``, any window of length ``W`` admits at most
``burst + W / T`` messages — a bound exact in integers, with no float drift to slip one more
through. A bucket is one integer, the "theoretical arrival time" (TAT); a TAT at or before
``now`` means a full bucket, which carries no information.

Memory is bounded, and the bounds never buy an attacker more messages:

* The prefix table holds at most ``max_prefixes`` buckets. Full buckets are forgotten first
  (a forgotten full bucket comes back full: nothing changes). If every bucket is still
  refilling, the one closest to full is evicted and its TAT raised into ``unknown_tat``: any
  prefix not in the table is then treated as *at least that empty*. An evicted prefix can thus
  never come back with more tokens than it had; at worst new prefixes get fewer.
* The de-duplication table holds at most ``max_dedup_entries``; when full, the oldest entry
  goes early (counted). That can only let a *duplicate* through earlier, and it still pays
  both budgets. Sizing ``max_dedup_entries ≥ burst + global_per_s × dedup_window_s`` makes
  de-duplication exact (see :meth:`BudgetSettings.warnings`).

Time is injected (``now``, seconds on any monotonic clock, e.g. ``trio.current_time()``). It
never goes backwards here: an earlier ``now`` than one already seen is taken as the latest seen.

This module must never do I/O, read a clock, or keep state outside the objects it returns.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from overflowd import ssrf
from overflowd.errors import ConfigError, DeliveryError

__all__ = [
    "DROP_REASONS",
    "V4_PREFIX_LEN",
    "V6_PREFIX_LEN",
    "WEBHOOK_DROP_REASONS",
    "Budget",
    "BudgetSettings",
    "BudgetStatistics",
    "Confinement",
    "FlowKey",
    "WebhookBudget",
    "WebhookBudgetStatistics",
    "WebhookEndpoint",
    "flow_key",
    "normalize",
    "parse_endpoints",
    "parse_secret",
    "plan_inband",
    "prefix_of",
    "url_key",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: One budget bucket per target network of this size: an IPv4 /24 and an IPv6 /48 are what
#: one site usually holds, so a site under attack hears from us at the per-prefix rate however
#: many of its addresses the attacker spreads the flood (or the spoofed sources) over.
V4_PREFIX_LEN = 24
V6_PREFIX_LEN = 48

#: Every reason a message is not sent; statistics count each one.
DROP_REASONS = (
    "not_allowed",  # target outside the allowed prefixes (confinement)
    "special",  # multicast, broadcast, unspecified, reserved, loopback/link-local not allowed
    "duplicate",  # same flow to the same target within dedup_window_s
    "prefix_budget",  # the target's /24 or /48 is out of tokens
    "global_budget",  # the node is out of tokens
)

_US = 1_000_000  # microseconds per second
_V4_SHIFT, _V6_SHIFT = 32 - V4_PREFIX_LEN, 128 - V6_PREFIX_LEN


@dataclass(frozen=True)
class BudgetSettings:
    """Limits on messages sent; TOML ``[budget]`` (names carry their units).

    Defaults: 100 messages/s of ≤ 1200 bytes is under 1 Mbit/s, a rounding error on any link
    a flow exporter watches, yet far above what sampling at 1e-6 produces (a router at 10 Mpps
    yields about 10 reports/s, 20 datagrams). One message per second to a /24 or /48 (burst
    10) is enough for a victim to learn of an attack within seconds and too little to matter
    as traffic. Ten minutes of de-duplication covers the usual active-flow export timeouts
    (1–5 min on routers, 60 s in softflowd), so a long flow exported again and again is
    reported once per target per window. 65,536 entries per table hold the whole working set
    at the default rates (see :meth:`warnings`) in a few MiB.
    """

    global_per_s: float = 100.0
    burst: int = 200
    per_prefix_per_s: float = 1.0
    per_prefix_burst: int = 10
    dedup_window_s: float = 600.0
    max_prefixes: int = 65_536
    max_dedup_entries: int = 65_536

    def __post_init__(self) -> None:
        for name in ("global_per_s", "per_prefix_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of messages per second")
            if value > _US:
                raise ValueError(f"{name} must be at most {_US} messages per second")
        for name in ("burst", "per_prefix_burst", "max_prefixes", "max_dedup_entries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1")
        window = self.dedup_window_s
        if not (isinstance(window, int | float) and math.isfinite(window) and window >= 0):
            raise ValueError("dedup_window_s must be a number of seconds ≥ 0")

    def warnings(self) -> list[str]:
        """Settings that are safe (budgets always hold) but make a table weaker than exact."""
        out = []
        live_prefixes = (
            self.burst + self.global_per_s * self.per_prefix_burst / self.per_prefix_per_s
        )
        if self.max_prefixes < live_prefixes:
            out.append(
                f"budget.max_prefixes={self.max_prefixes} is below the {math.ceil(live_prefixes)} "
                "prefixes that can be refilling at once: under load new prefixes get fewer "
                "messages than per_prefix_burst"
            )
        live_flows = self.burst + self.global_per_s * self.dedup_window_s
        if self.max_dedup_entries < live_flows:
            out.append(
                f"budget.max_dedup_entries={self.max_dedup_entries} is below the "
                f"{math.ceil(live_flows)} messages one window can hold: under load a flow may "
                "be sent again before dedup_window_s"
            )
        return out


class FlowKey(NamedTuple):
    """What makes two reports "the same flow" for de-duplication."""

    src: Address
    dst: Address
    proto: int
    sport: int
    dport: int


class _HasFiveTuple(Protocol):
    @property
    def src(self) -> Address: ...
    @property
    def dst(self) -> Address: ...
    @property
    def proto(self) -> int: ...
    @property
    def sport(self) -> int: ...
    @property
    def dport(self) -> int: ...


def flow_key(flow: _HasFiveTuple) -> FlowKey:
    """The key of a :class:`overflowd.report.Flow` or :class:`overflowd.flows.FlowRecord`."""
    return FlowKey(flow.src, flow.dst, flow.proto, flow.sport, flow.dport)


def normalize(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is the IPv4 address it maps.

    A datagram sent to one from a dual-stack socket goes out as IPv4, so it must meet the IPv4
    confinement and budget, not slip past them as "IPv6".
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def prefix_of(address: Address) -> tuple[int, int]:
    """The budget bucket of ``address``: (IP version, network number of its /24 or /48)."""
    address = normalize(address)
    if address.version == 4:
        return 4, int(address) >> (32 - V4_PREFIX_LEN)
    return 6, int(address) >> (128 - V6_PREFIX_LEN)


_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_LOOPBACK_OR_LINK = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),
)


def _within(inner: Network, outer: Network) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


#: Addresses whose confinement verdict a :class:`Confinement` remembers (~200 bytes each
#: with the address object: about 1 MiB). A spoofed-source flood naming a new address per
#: flow only empties the table once per this many; the verdicts never change.
CONFINEMENT_VERDICTS = 4_096


@dataclass(frozen=True)
class Confinement:
    """The prefixes a node may send to. Empty (the default) means: send to no one.

    Operators allow ``0.0.0.0/0`` and ``::/0`` to reach the whole Internet; tests allow only
    their own TEST-NET prefixes or loopback. Loopback and link-local targets need a prefix
    *inside* them (``127.0.0.0/8``, ``::1/128``...): a flow record naming 127.0.0.1 is spoofed
    or broken, and ``0.0.0.0/0`` must not make the node send datagrams to itself.
    """

    allowed: tuple[Network, ...] = ()
    #: Verdicts of :meth:`refuse` by address, at most :data:`CONFINEMENT_VERDICTS`. Part of
    #: this object, not of the settings: a verdict is a pure function of ``allowed`` (frozen)
    #: and the address, so it cannot outlive the prefixes it was decided under; new settings
    #: make a new Confinement, whose table starts empty.
    _verdicts: dict[Address, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        # verdicts are cached on the promise that ``allowed`` cannot change: a list given by
        # hand could be changed under them, so it is kept as a tuple
        if not isinstance(self.allowed, tuple):
            object.__setattr__(self, "allowed", tuple(self.allowed))

    @classmethod
    def from_strings(cls, prefixes: Iterable[str]) -> Confinement:
        """Parse "192.0.2.0/24"-style prefixes; ValueError naming the one that is not."""
        nets = []
        for text in prefixes:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"allowed prefix {text!r}: {exc}") from None
        return cls(tuple(nets))

    def refuse(self, address: Address) -> str | None:
        """None if ``address`` may be sent to, else why not (``special``, ``not_allowed``).

        Remembered per address (a report's two ends are often the same few hosts); the table
        is bounded whatever the flows name: when full it starts again empty, so spoofed
        addresses cost at most :data:`CONFINEMENT_VERDICTS` entries and a fresh decision each.
        """
        verdicts = self._verdicts
        try:
            return verdicts[address]
        except KeyError:
            pass
        except TypeError:  # not hashable: not an address; decide it the long way
            return self._decide(address)
        verdict = self._decide(address)
        if len(verdicts) >= CONFINEMENT_VERDICTS:
            verdicts.clear()
        verdicts[address] = verdict
        return verdict

    def _decide(self, address: Address) -> str | None:
        address = normalize(address)
        loopback_or_link = address.is_loopback or address.is_link_local
        if (
            address.is_multicast
            or address.is_unspecified
            or (address.is_reserved and not loopback_or_link)  # IPv6 ::/8 holds ::1
            or address == _LIMITED_BROADCAST
        ):
            return "special"
        covering = [n for n in self.allowed if n.version == address.version and address in n]
        if not covering:
            return "not_allowed"
        # Loopback and link-local only when a prefix within that block allows them.
        for special in _LOOPBACK_OR_LINK:
            if (
                special.version == address.version
                and address in special
                and not any(_within(n, special) for n in covering)
            ):
                return "special"
        return None


@dataclass(frozen=True)
class BudgetStatistics:
    """A snapshot: messages allowed, drops by reason, table sizes and evictions."""

    allowed: int
    dropped: Mapping[str, int]
    prefixes: int
    dedup_entries: int
    prefix_evictions: int
    dedup_evictions: int
    settings: BudgetSettings = field(repr=False)


def _advance(current_us: int, now: float) -> int:
    """The clock in integer microseconds after seeing ``now``: never backwards."""
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds")
    return max(current_us, round(now * _US))


class _Gcra:
    """Emission interval and tolerance of one budget, in integer microseconds."""

    __slots__ = ("interval", "tolerance")

    def __init__(self, per_s: float, burst: int) -> None:
        # Rounded up: the real rate is never above the configured one.
        self.interval = max(1, math.ceil(_US / per_s))
        self.tolerance = (burst - 1) * self.interval

    def conforms(self, tat: int, t: int) -> bool:
        return max(tat, t) - t <= self.tolerance

    def next_tat(self, tat: int, t: int) -> int:
        return max(tat, t) + self.interval


class Budget:
    """The mutable state of the budgets (pure: no clock, no I/O).

    One instance per budget: outputs that share one (in-band and webhooks, to bound the node
    as a whole) pass their ``channel`` so that their de-duplication stays apart.

    :meth:`allow` decides one message and records it; :meth:`drop` counts a message refused
    elsewhere (confinement) so that every drop shows up in one :meth:`statistics`.
    """

    def __init__(self, settings: BudgetSettings | None = None) -> None:
        self.settings = s = settings or BudgetSettings()
        self._global = _Gcra(s.global_per_s, s.burst)
        self._prefix = _Gcra(s.per_prefix_per_s, s.per_prefix_burst)
        self._window_us = math.ceil(s.dedup_window_s * _US)
        self._now = -(2**62)  # latest time seen (µs); time never goes backwards here
        self._global_tat = self._now
        # prefix → TAT; plus a min-heap of (TAT, prefix) with lazy deletion to find the fullest.
        self._tats: dict[tuple[int, int], int] = {}
        self._heap: list[tuple[int, tuple[int, int]]] = []
        # A prefix not in the table has a TAT of at most this (see module docstring).
        self._unknown_tat = self._now
        # (channel, target, flow) → expiry (µs). Expiries are inserted in time order, so the oldest
        # entry is always first and pruning pops from the front.
        self._dedup: OrderedDict[tuple[str, Address, FlowKey], int] = OrderedDict()
        self._allowed = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._prefix_evictions = 0
        self._dedup_evictions = 0

    # -- time ---------------------------------------------------------------------------------

    def _tick(self, now: float) -> int:
        self._now = _advance(self._now, now)
        return self._now

    # -- decisions ----------------------------------------------------------------------------

    def drop(self, reason: str) -> None:
        """Count a message refused before the budget (``not_allowed``, ``special``)."""
        if reason not in self._dropped:
            raise ValueError(f"unknown drop reason {reason!r}")
        self._dropped[reason] += 1

    def allow(self, target: Address, flow: FlowKey, now: float, *, channel: str = "") -> bool:
        """Whether one message about ``flow`` may go to ``target`` at ``now``; records it if so.

        ``channel`` ("inband", "webhook"...) keeps de-duplication apart when several outputs
        share one budget: a webhook about a flow is not a duplicate of its datagram.
        """
        # Written out (tick, prune, both GCRA tests and updates inline): it runs per message.
        if not math.isfinite(now):
            raise ValueError("now must be a finite number of seconds")
        t = round(now * _US)
        if t < self._now:
            t = self._now
        self._now = t
        target = normalize(target)
        dedup = self._dedup
        if dedup:
            self._prune_dedup(t)
        key = (channel, target, flow)
        if dedup and key in dedup:  # (an empty table: no need to hash the key)
            self._dropped["duplicate"] += 1
            return False
        if target.version == 4:  # prefix_of(target), already normalized
            prefix = (4, int(target) >> _V4_SHIFT)
        else:
            prefix = (6, int(target) >> _V6_SHIFT)
        heap = self._heap
        if heap and heap[0][0] <= t:  # a full bucket to forget (stale entries go later)
            self._prune_prefixes(t)
        prefix_tat = self._tats.get(prefix, self._unknown_tat)
        gp = self._prefix
        if (prefix_tat if prefix_tat > t else t) - t > gp.tolerance:
            self._dropped["prefix_budget"] += 1
            return False
        gg = self._global
        global_tat = self._global_tat
        if global_tat < t:
            global_tat = t
        if global_tat - t > gg.tolerance:
            self._dropped["global_budget"] += 1
            return False
        # Both conform: spend from both, then remember the flow.
        self._global_tat = global_tat + gg.interval
        self._set_prefix(prefix, (prefix_tat if prefix_tat > t else t) + gp.interval)
        if self._window_us > 0:
            if len(dedup) >= self.settings.max_dedup_entries:
                dedup.popitem(last=False)
                self._dedup_evictions += 1
            dedup[key] = t + self._window_us
        self._allowed += 1
        return True

    # -- tables -------------------------------------------------------------------------------

    def _prune_dedup(self, t: int) -> None:
        dedup = self._dedup
        while dedup:
            key, expiry = next(iter(dedup.items()))
            if expiry > t:
                break
            del dedup[key]

    def _prune_prefixes(self, t: int) -> None:
        """Forget full buckets (TAT ≤ t): a bucket created afresh is identical."""
        heap, tats = self._heap, self._tats
        while heap:
            tat, prefix = heap[0]
            if tats.get(prefix) != tat:  # stale heap entry
                heapq.heappop(heap)
            elif tat <= t:
                heapq.heappop(heap)
                del tats[prefix]
            else:
                break

    def _set_prefix(self, prefix: tuple[int, int], tat: int) -> None:
        tats = self._tats
        if prefix not in tats and len(tats) >= self.settings.max_prefixes:
            self._evict_one()
        tats[prefix] = tat
        heapq.heappush(self._heap, (tat, prefix))
        # Lazy deletion leaves one stale heap entry per update; rebuild before it doubles.
        if len(self._heap) > 2 * len(tats) + 64:
            self._heap = [(v, k) for k, v in tats.items()]
            heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        """Evict the fullest bucket; unknown prefixes are from now on at least as empty."""
        heap, tats = self._heap, self._tats
        while heap:
            tat, prefix = heapq.heappop(heap)
            if tats.get(prefix) == tat:
                del tats[prefix]
                self._unknown_tat = max(self._unknown_tat, tat)
                self._prefix_evictions += 1
                return

    def drop_counts(self) -> tuple[int, ...]:
        """The drop counters in :data:`DROP_REASONS` order: a cheap snapshot for a caller that
        wants the difference across a call (what *its* plan refused of a shared budget)."""
        return tuple(self._dropped.values())

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            allowed=self._allowed,
            dropped=MappingProxyType(dict(self._dropped)),
            prefixes=len(self._tats),
            dedup_entries=len(self._dedup),
            prefix_evictions=self._prefix_evictions,
            dedup_evictions=self._dedup_evictions,
            settings=self.settings,
        )


class _HasFlow(Protocol):
    @property
    def flow(self) -> _HasFiveTuple: ...


class _HasPayload(Protocol):
    @property
    def payload(self) -> _HasFlow: ...


def plan_inband(
    report: _HasPayload, policy_state: Budget, now: float, confinement: Confinement
) -> list[Address]:
    """The targets (of the flow's source and destination) that get this report's datagram.

    Confinement first (a target outside it is never sent to, and costs no budget), then the
    budgets. A flow from an address to itself gets one datagram. Every refusal is counted in
    ``policy_state``.
    """
    flow = report.payload.flow
    key = FlowKey(flow.src, flow.dst, flow.proto, flow.sport, flow.dport)
    src, dst = normalize(flow.src), normalize(flow.dst)
    candidates = [src] if dst == src else [src, dst]
    targets: list[Address] = []
    for address in candidates:
        reason = confinement.refuse(address)
        if reason is not None:
            policy_state.drop(reason)
            continue
        if policy_state.allow(address, key, now, channel="inband"):
            targets.append(address)
    return targets


#: Seconds, for defaults written with their unit.
SECONDS = 1.0
#: Where in-band datagrams go, and where a node listens for them.
DEFAULT_PORT = 65535


@dataclass(frozen=True)
class InbandSettings:
    """TOML ``[inband]``. Units are in the names; see docs/notify.md for the reasons."""

    #: Whether the daemon starts the listener and the sender at all.
    enabled: bool = True
    #: Where the listener binds; "[::]:65535" is dual-stack (IPv4 too).
    listen: str = "[::]:65535"
    #: Destination port of the datagrams this node sends.
    port: int = DEFAULT_PORT
    #: Prefixes datagrams may be sent to. Empty: none (nothing is ever sent).
    allowed_prefixes: tuple[str, ...] = ()
    #: Reports waiting to be sent, and verified reports waiting for the store; beyond this,
    #: the newest is dropped and counted.
    queue_reports: int = 1_000
    #: Reports written per store transaction at most.
    store_batch: int = 200
    #: Report ids remembered for de-duplication (about 100 bytes each).
    seen_ids: int = 65_536
    #: Reports older than this are refused as stale: a replay after the id cache forgot it.
    max_age_s: float = 3600 * SECONDS
    #: Reports dated further ahead than this (observer clock skew) are refused.
    max_future_s: float = 300 * SECONDS
    #: On shutdown, how long queued reports may take to reach the store.
    drain_timeout_s: float = 5 * SECONDS

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("inband.port must be 0-65535")
        for name in ("queue_reports", "store_batch", "seen_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"inband.{name} must be at least 1")
        for name in ("max_age_s", "max_future_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"inband.{name} must not be negative")

    def confinement(self) -> Confinement:
        return Confinement.from_strings(self.allowed_prefixes)

    def listen_address(self) -> tuple[str, int]:
        from overflowd.config import parse_listen

        return parse_listen(self.listen)


#: Every reason the webhook plan does not enqueue a delivery it selected; counted each.
WEBHOOK_DROP_REASONS = (
    "duplicate",  # the same flow to the same URL within webhook.dedup_window_s
    "prefix_backlog",  # the target prefix's bucket would defer it beyond webhook.max_defer_s
    "outbox_full",  # max_pending_per_url (or max_pending in all) rows already wait
    "not_allowed",  # a DNS (u=) URL of a flow end outside the confinement
    "special",  # ... of a flow end no message should go to (multicast, loopback...)
    "ssrf",  # a DNS URL whose literal address is internal (not in webhook.allow_prefixes)
    "bad_url",  # a DNS URL that does not parse, is not https, or is too long
)

#: A secret_file holding more than this is not a secret (read no further).
MAX_SECRET_FILE_BYTES = 4096


def parse_secret(text: str, where: str = "secret") -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (:func:`overflowd.wire.webhook.parse_secret`
    decides the form); ValueError naming ``where``, never echoing the secret."""
    from overflowd.wire import webhook as wh

    try:
        return wh.parse_secret(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class WebhookEndpoint:
    """One ``[[webhook.endpoints]]`` table: the operator's own receiver for some prefixes.

    Reports whose source or destination is in one of ``prefixes`` go to ``url``. ``secret``
    (``whsec_...``) adds a ``v1`` HMAC signature beside ``v1a`` for receivers built on the
    Standard Webhooks libraries; ``secret_file`` names a file holding it (relative to the node
    home), read once at start by :meth:`WebhookSettings.with_secrets_from`, so the secret need
    not sit in overflowd.toml. Static endpoints are not governed by ``[send]``: they are the
    operator's own recipients.
    """

    url: str
    prefixes: tuple[str, ...]
    secret: str | None = field(default=None, repr=False)
    secret_file: str | None = None

    @classmethod
    def from_toml(cls, item: Any, where: str) -> WebhookEndpoint:
        """One table of the array; ConfigError (prefixed with ``where``) naming the bad key."""
        keys = {"url", "prefixes", "secret", "secret_file"}
        if not isinstance(item, dict):
            raise ConfigError(where + "each [[webhook.endpoints]] entry must be a table")
        for key in item:
            if key not in keys:
                raise ConfigError(where + f"unknown key 'webhook.endpoints.{key}'")
        url, prefixes = item.get("url"), item.get("prefixes")
        if not isinstance(url, str):
            raise ConfigError(where + "'webhook.endpoints.url' must be a string")
        if not (
            isinstance(prefixes, list) and prefixes and all(isinstance(p, str) for p in prefixes)
        ):
            raise ConfigError(
                where + "'webhook.endpoints.prefixes' must be a non-empty list of strings"
            )
        secret, secret_file = item.get("secret"), item.get("secret_file")
        for name, value in (("secret", secret), ("secret_file", secret_file)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(where + f"'webhook.endpoints.{name}' must be a string")
        if secret is not None and secret_file is not None:
            raise ConfigError(
                where + "a [[webhook.endpoints]] entry takes secret or secret_file, not both"
            )
        return cls(url=url, prefixes=tuple(prefixes), secret=secret, secret_file=secret_file)


@dataclass(frozen=True)
class WebhookSettings:
    """``[webhook]`` in overflowd.toml. Every limit is written with its unit."""

    #: (prefix, URL): reports whose src or dst is in the prefix go to the URL. The short form
    #: of ``endpoints``: one prefix each, no secret.
    targets: tuple[tuple[str, str], ...] = ()
    #: ``[[webhook.endpoints]]``: URL, prefixes, optional secret (see WebhookEndpoint).
    endpoints: tuple[WebhookEndpoint, ...] = ()
    #: Prefixes that may be delivered to although internal (loopback, private...). Default none.
    allow_prefixes: tuple[str, ...] = ()
    #: Refuse plain-http URLs. Tests and lab set-ups turn it off.
    require_https: bool = True
    #: TCP + TLS connection set-up.
    connect_timeout_s: float = 5 * SECONDS
    #: Each read and write of a request.
    io_timeout_s: float = 10 * SECONDS
    #: The whole request, however slowly the receiver drips its answer.
    total_timeout_s: float = 30 * SECONDS
    #: Attempts per delivery before it becomes a dead letter (12 ≈ a day with the defaults).
    max_attempts: int = 12
    #: First retry after about this long; doubles per attempt, with jitter, up to the cap.
    backoff_base_s: float = 10 * SECONDS
    backoff_cap_s: float = 6 * 3600 * SECONDS
    #: The longest Retry-After we honour; a larger one is cut to this.
    retry_after_cap_s: float = 6 * 3600 * SECONDS
    #: A claimed delivery not marked within this time is claimed again (crash recovery).
    #: Must exceed total_timeout_s, or slow deliveries are sent twice.
    lease_s: float = 60 * SECONDS
    #: Requests in flight at once, across all endpoints.
    max_concurrency: int = 8
    #: ... and to one server (host name and port) at once: one that never answers holds this
    #: many of the max_concurrency slots at most (each up to total_timeout_s), never all,
    #: so it cannot hold up deliveries to other hosts (anyone can publish a ``u=`` URL).
    max_concurrency_per_host: int = 2
    #: Endpoints (URLs) claimed at most by one look at the outbox (claims top up free slots).
    batch_size: int = 64
    #: How often to look at the outbox when nobody calls wake().
    poll_interval_s: float = 1 * SECONDS
    #: Delivered rows are deleted after this long.
    keep_delivered_s: float = 7 * 86400 * SECONDS
    #: Dead letters are kept this long for the operator (`overflowd-query outbox --dead`,
    #: `overflowd outbox retry`), then deleted: they count against the outbox caps meanwhile.
    keep_dead_s: float = 30 * 86400 * SECONDS
    #: Retries (not first attempts) per second and burst, per URL and per host name: a
    #: receiver that answers 500 to everything gets at most burst + rate × T retries in T s
    #: (services/webhook.py RetryLimits; over budget a row waits, it is never dropped).
    retry_per_url_per_s: float = 1.0
    retry_per_url_burst: int = 30
    retry_per_host_per_s: float = 2.0
    retry_per_host_burst: int = 60
    #: Reports one POST carries at most ({"reports": [...]}); what waits beyond goes next.
    #: 50 reports of ~1.4 KiB of JSON fit max_batch_bytes; more are cut by the byte cap.
    max_batch_reports: int = 50
    #: Body bytes of one POST at most (at least one report always goes): below the 64 KiB a
    #: receiver accepts by default (overflowd.receiver.MAX_BODY_BYTES), headers aside.
    max_batch_bytes: int = 60 * 1024
    #: POSTs per second and burst to one endpoint (URL), at delivery: what the budget does not
    #: let through waits in the outbox and goes in the next POST (batching). 1/s with a burst
    #: of 5 is nothing to any HTTP server, and with max_batch_reports 50 reports a second.
    endpoint_posts_per_s: float = 1.0
    endpoint_posts_burst: int = 5
    #: Reports per second and burst about one target prefix (/24, /48 of the flow end the URL
    #: was chosen for) to one URL, at enqueue: over it, the first attempt is deferred until
    #: the bucket allows (batched later), never refused. A spoofed flood toward one network
    #: fills at most burst + rate × max_defer_s rows per URL, and a real attack is told
    #: within seconds: 60 at once covers a burst of distinct flows toward one site.
    prefix_reports_per_s: float = 2.0
    prefix_reports_burst: int = 60
    #: A deferral longer than this sheds the report, counted ``prefix_backlog``: ten minutes
    #: of backlog about one prefix is as late as a report is still worth hearing.
    max_defer_s: float = 600 * SECONDS
    #: The same flow (src, dst, proto, ports) to the same URL once per window (``duplicate``):
    #: routers export a long flow every 1-5 min; ten minutes covers that, as [budget] does.
    dedup_window_s: float = 600 * SECONDS
    #: Table sizes of the prefix buckets and of de-duplication (full: see notify.Budget).
    max_prefixes: int = 65_536
    max_dedup_entries: int = 65_536
    #: Pending rows per URL, and in all, beyond which new deliveries are shed (``outbox_full``,
    #: a warning): a flood of spoofed flows cannot swell the store. 10 000 rows is hours of
    #: reports at the prefix budget; 100 000 rows of ~1.3 KiB are ~130 MB.
    max_pending_per_url: int = 10_000
    max_pending: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "retry_per_url_per_s",
            "retry_per_host_per_s",
            "endpoint_posts_per_s",
            "prefix_reports_per_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number per second")
            if value > _US:
                raise ValueError(f"{name} must be at most {_US} per second")
        for name in (
            "connect_timeout_s",
            "io_timeout_s",
            "total_timeout_s",
            "backoff_base_s",
            "backoff_cap_s",
            "retry_after_cap_s",
            "lease_s",
            "poll_interval_s",
            "keep_delivered_s",
            "keep_dead_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in ("max_defer_s", "dedup_window_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds ≥ 0")
        for name in (
            "max_attempts",
            "max_concurrency",
            "max_concurrency_per_host",
            "batch_size",
            "retry_per_url_burst",
            "retry_per_host_burst",
            "max_batch_reports",
            "endpoint_posts_burst",
            "prefix_reports_burst",
            "max_prefixes",
            "max_dedup_entries",
            "max_pending_per_url",
            "max_pending",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1")
        if isinstance(self.max_batch_bytes, bool) or not isinstance(self.max_batch_bytes, int):
            raise ValueError("max_batch_bytes must be an integer")
        if self.max_batch_bytes < 4096:
            raise ValueError("max_batch_bytes must be at least 4096 (one report's JSON)")
        ssrf.parse_prefixes(self.allow_prefixes)
        for prefix, url in self.targets:
            ssrf.parse_prefixes([prefix])
            try:
                ssrf.parse_target(url, require_https=self.require_https)
            except DeliveryError as exc:
                raise ValueError(f"target {url!r}: {exc}") from None
        for endpoint in self.endpoints:
            try:
                ssrf.parse_prefixes(endpoint.prefixes)
                ssrf.parse_target(endpoint.url, require_https=self.require_https)
            except (DeliveryError, ValueError) as exc:
                raise ValueError(f"endpoint {endpoint.url!r}: {exc}") from None
            if endpoint.secret is not None:
                parse_secret(endpoint.secret, f"endpoint {endpoint.url!r} secret")

    @property
    def allowed_networks(self) -> tuple[ssrf.Network, ...]:
        return ssrf.parse_prefixes(self.allow_prefixes)

    def all_endpoints(self) -> tuple[WebhookEndpoint, ...]:
        """``targets`` (one prefix each, no secret) and ``endpoints``, in that order."""
        short = tuple(WebhookEndpoint(url=url, prefixes=(prefix,)) for prefix, url in self.targets)
        return short + self.endpoints

    def secrets(self) -> dict[str, tuple[bytes, ...]]:
        """The ``v1`` keys of each URL that has any (an endpoint's secret_file already read
        into ``secret`` by the configuration loader)."""
        out: dict[str, tuple[bytes, ...]] = {}
        for e in self.endpoints:
            if e.secret is not None:
                key = parse_secret(e.secret, f"endpoint {e.url!r} secret")
                if key not in out.get(e.url, ()):
                    out[e.url] = (*out.get(e.url, ()), key)
        return out

    @classmethod
    def from_toml(cls, table: Mapping[str, Any], source: str = "<config>") -> WebhookSettings:
        """Build from the ``[webhook]`` TOML table; ConfigError names the bad key.

        ``targets`` is an array of tables ``{prefix = "...", url = "..."}``, ``endpoints`` an
        array of tables (WebhookEndpoint); every other key is a field of this class with the
        same name and type.
        """
        known = {f.name for f in fields(cls)}
        ints = {f.name for f in fields(cls) if f.type in ("int", int)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key 'webhook.{key}'")
            if key == "targets":
                if not isinstance(value, list):
                    raise ConfigError(f"{source}: 'webhook.targets' must be an array of tables")
                pairs = []
                for item in value:
                    if (
                        not isinstance(item, dict)
                        or set(item) != {"prefix", "url"}
                        or not all(isinstance(v, str) for v in item.values())
                    ):
                        raise ConfigError(
                            f"{source}: each 'webhook.targets' entry needs exactly "
                            'prefix = "..." and url = "..."'
                        )
                    pairs.append((item["prefix"], item["url"]))
                values[key] = tuple(pairs)
            elif key == "endpoints":
                values[key] = parse_endpoints(value, f"{source}: ")
            elif key == "allow_prefixes":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: 'webhook.allow_prefixes' must be strings")
                values[key] = tuple(value)
            elif key == "require_https":
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: 'webhook.require_https' must be true or false")
                values[key] = value
            elif key in ints:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"{source}: 'webhook.{key}' must be an integer")
                values[key] = value
            else:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ConfigError(f"{source}: 'webhook.{key}' must be a number")
                values[key] = float(value)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"{source}: [webhook] {exc}") from None


def parse_endpoints(value: Any, where: str) -> tuple[WebhookEndpoint, ...]:
    """``[[webhook.endpoints]]`` (a TOML array of tables); ConfigError prefixed by ``where``."""
    if not isinstance(value, list):
        raise ConfigError(where + "'webhook.endpoints' must be an array of tables")
    return tuple(WebhookEndpoint.from_toml(item, where) for item in value)


# -- webhook budgets: sans-IO, apart from the in-band Budget --------------------------------------


@dataclass(frozen=True)
class WebhookBudgetStatistics:
    """A snapshot of the webhook plan: drops by reason, deferrals, table sizes."""

    dropped: Mapping[str, int]
    #: deliveries whose first attempt the prefix bucket deferred (enqueued, sent later)
    deferred: int
    prefixes: int
    dedup_entries: int
    prefix_evictions: int
    dedup_evictions: int


class _TatTable:
    """GCRA buckets by key, bounded as :class:`Budget`'s prefix table (module docstring):
    full buckets are forgotten first; else the fullest is evicted and ``unknown_tat`` raised
    to its TAT, so a key never comes back with more tokens than it had."""

    def __init__(self, max_keys: int, start: int) -> None:
        self._max_keys = max_keys
        self._tats: dict[Any, int] = {}
        self._heap: list[tuple[int, Any]] = []
        self.unknown_tat = start
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._tats)

    def get(self, key: Any) -> int:
        return self._tats.get(key, self.unknown_tat)

    def prune(self, t: int) -> None:
        heap, tats = self._heap, self._tats
        while heap:
            tat, key = heap[0]
            if tats.get(key) != tat:
                heapq.heappop(heap)
            elif tat <= t:
                heapq.heappop(heap)
                del tats[key]
            else:
                break

    def set(self, key: Any, tat: int) -> None:
        tats = self._tats
        if key not in tats and len(tats) >= self._max_keys:
            while self._heap:
                old, victim = heapq.heappop(self._heap)
                if tats.get(victim) == old:
                    del tats[victim]
                    self.unknown_tat = max(self.unknown_tat, old)
                    self.evictions += 1
                    break
        tats[key] = tat
        heapq.heappush(self._heap, (tat, key))
        if len(self._heap) > 2 * len(tats) + 64:
            self._heap = [(v, k) for k, v in tats.items()]
            heapq.heapify(self._heap)


def url_key(url: str) -> bytes:
    """A short digest standing for a URL in the tables (URLs are up to 2 KiB, anyone's)."""
    return hashlib.blake2b(url.encode("utf-8", "surrogateescape"), digest_size=8).digest()


class WebhookBudget:
    """What the node enqueues for webhooks: de-duplication and the per-prefix deferral (pure).

    Apart from the in-band :class:`Budget`: a webhook goes to a receiver that asked for it
    (the operator's endpoint, or a ``u=`` the flow end published), over a durable outbox, so
    nothing over budget is refused. :meth:`plan` answers, for one (URL, flow end, flow), the
    seconds its first attempt waits for the (URL, /24 or /48) bucket, or None when it is
    dropped by policy: ``duplicate`` (same flow to the same URL within ``dedup_window_s``)
    or ``prefix_backlog`` (the wait would exceed ``max_defer_s``). The bucket is charged at
    the deferred time, so in any window of W seconds a URL is scheduled at most
    ``burst + W × rate`` reports about one prefix. Time is injected, as in :class:`Budget`.
    """

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = s = settings
        self._gcra = _Gcra(s.prefix_reports_per_s, s.prefix_reports_burst)
        self._window_us = math.ceil(s.dedup_window_s * _US)
        self._max_defer_us = math.ceil(s.max_defer_s * _US)
        self._now = -(2**62)
        self._prefixes = _TatTable(s.max_prefixes, self._now)
        self._dedup: OrderedDict[tuple[bytes, FlowKey], int] = OrderedDict()
        self._dropped = dict.fromkeys(WEBHOOK_DROP_REASONS, 0)
        self._deferred = 0
        self._dedup_evictions = 0

    def _tick(self, now: float) -> int:
        self._now = _advance(self._now, now)
        return self._now

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` deliveries refused elsewhere (confinement, SSRF, a full outbox)."""
        if reason not in self._dropped:
            raise ValueError(f"unknown drop reason {reason!r}")
        self._dropped[reason] += n

    def plan(self, url: str, target: Address, flow: FlowKey, now: float) -> float | None:
        """Seconds until the first attempt of ``flow``'s report to ``url`` (0: now), or None
        when dropped (counted). ``target`` is the flow end the URL was chosen for."""
        t = self._tick(now)
        ukey = url_key(url)
        dedup = self._dedup
        while dedup:
            first, expiry = next(iter(dedup.items()))
            if expiry > t:
                break
            del dedup[first]
        key = (ukey, flow)
        if key in dedup:
            self._dropped["duplicate"] += 1
            return None
        bucket = (ukey, prefix_of(target))
        self._prefixes.prune(t)
        tat = self._prefixes.get(bucket)
        # GCRA: conforming at t_a once TAT - tolerance <= t_a; the earliest such t_a >= t.
        at = max(t, tat - self._gcra.tolerance)
        if at - t > self._max_defer_us:
            self._dropped["prefix_backlog"] += 1
            return None
        self._prefixes.set(bucket, self._gcra.next_tat(tat, at))
        if self._window_us > 0:
            if len(dedup) >= self.settings.max_dedup_entries:
                dedup.popitem(last=False)
                self._dedup_evictions += 1
            dedup[key] = t + self._window_us
        if at > t:
            self._deferred += 1
        return (at - t) / _US

    def statistics(self) -> WebhookBudgetStatistics:
        return WebhookBudgetStatistics(
            dropped=MappingProxyType(dict(self._dropped)),
            deferred=self._deferred,
            prefixes=len(self._prefixes),
            dedup_entries=len(self._dedup),
            prefix_evictions=self._prefixes.evictions,
            dedup_evictions=self._dedup_evictions,
        )

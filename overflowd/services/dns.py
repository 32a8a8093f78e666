"""DNS lookups for keys and abuse contacts: dnspython's async resolver on trio.

This is the one module that talks to dnspython. What it raises leaves here either as a value
(NXDOMAIN and NODATA are answers: "nothing published here", cached like answers) or as
:class:`~overflowd.errors.DiscoveryError` (timeouts, SERVFAIL, REFUSED, network errors: "we
could not find out", cached briefly so a dead resolver costs one timeout per name, not one per
report). The names asked, the parsing and the cache policy are sans-IO, in
:mod:`overflowd.registry`.

Limits, each per lookup (one call of :meth:`DnsRegistry.lookup_address` and friends):

* one question takes at most ``timeout_s`` (all nameservers and retries included), with a trio
  deadline one second later as a safety net around dnspython's own lifetime;
* at most ``max_queries`` questions reach the network; answers from the cache are free. An
  address walk asks at most 4 names, so the default of 8 leaves room for abuse zones.

and, for the whole registry, memory: the cache is bounded in entries and in bytes
(:class:`overflowd.registry.TxtCache`); records over ``registry.MAX_RECORD_BYTES`` are
dropped before they are cached (neither an OVF1 record nor a contact list can be that long);
at most :data:`MAX_INFLIGHT_NAMES` names are being asked at once; the hints table is bounded
in entries and in bytes (:data:`HINT_MAX_BYTES`).

So a lookup against resolvers that never answer returns within ``max_queries × timeout_s``
and, once the failure is cached, at once. It must never log record contents beyond names.

dnspython (~2 MB of an idle daemon, issue #16) is imported and the resolver built with the
first question, in a worker thread; what building it would refuse (nameservers that do not
parse, an /etc/resolv.conf that cannot be read or names no nameserver) is still refused when
the registry is made, as before, without it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import trio

from overflowd import registry as reg
from overflowd.errors import DecodeError, DiscoveryError
from overflowd.registry import CachedTxt, Found, Outcome, RegistrySettings, parse_nameserver
from overflowd.trust import Trust, TrustBook, TrustLevel

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.message

__all__ = [
    "AbuseFound",
    "Discovery",
    "DnsRegistry",
    "DnsStatistics",
    "Hint",
    "HintStatistics",
    "RegistryHints",
    "RegistrySettings",
    "observer_trust",
    "parse_nameserver",
]

log = logging.getLogger(__name__)

#: TXT records kept from one answer; a name with more is not a key publication (counted).
MAX_TXT_RECORDS = 32
#: Names being asked at once (sent, or waiting for a free slot of max_concurrent_queries),
#: all lookups together. Callers are a few bounded pools (hint workers, labellers), so this
#: only binds if one misbehaves; beyond it a question fails at once (counted
#: ``inflight_refused``) rather than growing the in-flight map and the limiter's queue.
MAX_INFLIGHT_NAMES = 4096
#: Where the resolvers are when ``registry.nameservers`` is empty (read as dnspython reads it).
RESOLV_CONF = "/etc/resolv.conf"


class AbuseFound(NamedTuple):
    """Contacts an abuse zone gave for an address, and the name that answered."""

    name: str
    contacts: tuple[str, ...]


@dataclass(frozen=True)
class Discovery:
    """Everything DNS says about one address or name. ``error`` when a lookup failed."""

    query: str
    records: tuple[Found, ...] = ()
    abuse: tuple[AbuseFound, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def keys(self) -> list[bytes]:
        return reg.valid_keys(self.records)

    @property
    def contacts(self) -> tuple[str, ...]:
        """Contacts from _overflowd records first, then from abuse zones; no duplicates."""
        out: list[str] = []
        for found in self.records:
            out.extend(c for c in found.record.contacts if c not in out)
        for item in self.abuse:
            out.extend(c for c in item.contacts if c not in out)
        return tuple(out)

    @property
    def webhook_url(self) -> str | None:
        return next((f.record.webhook_url for f in self.records if f.record.webhook_url), None)

    @property
    def boost(self) -> float | None:
        return max((f.record.boost for f in self.records if f.record.boost), default=None)


@dataclass(frozen=True)
class DnsStatistics:
    lookups: int
    #: questions sent to the resolvers (cache misses within budget)
    queries: int
    cache_hits: int
    answers: int
    nxdomain: int
    nodata: int
    failures: int
    timeouts: int
    #: lookups stopped because they had used max_queries
    budget_exhausted: int
    #: questions not sent because the same name was already being asked
    coalesced: int
    #: TXT records at an _overflowd name that are not OVF1 (SPF and the like)
    records_foreign: int
    #: OVF1 records that do not parse
    records_malformed: int
    #: records longer than registry.MAX_RECORD_BYTES
    records_oversized: int
    #: records beyond the per-name limits
    records_excess: int
    #: questions refused because MAX_INFLIGHT_NAMES names were being asked already
    inflight_refused: int
    #: abuse-zone TXT records that are not contact lists
    abuse_malformed: int
    cache: reg.CacheStatistics


@dataclass
class _Budget:
    left: int
    exhausted: bool = False


@dataclass
class _Counters:
    lookups: int = 0
    queries: int = 0
    cache_hits: int = 0
    answers: int = 0
    nxdomain: int = 0
    nodata: int = 0
    failures: int = 0
    timeouts: int = 0
    budget_exhausted: int = 0
    coalesced: int = 0
    records_foreign: int = 0
    records_malformed: int = 0
    records_oversized: int = 0
    records_excess: int = 0
    inflight_refused: int = 0
    abuse_malformed: int = 0


class DnsRegistry:
    """Looks up ``_overflowd`` records and abuse contacts, through a bounded cache.

    ``clock`` gives the cache's notion of now in seconds (default ``trio.current_time``);
    tests pass their own to live through TTLs. Network timeouts always use trio's clock.
    """

    def __init__(
        self,
        settings: RegistrySettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings or RegistrySettings()
        self._clock = clock or trio.current_time
        self.cache = reg.TxtCache(self.settings.cache_policy())
        self._check_resolvers()
        #: built with the first question (:meth:`_resolver_now`)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._building = trio.Lock()
        self._c = _Counters()
        # One question per name on the wire at a time: concurrent lookups of the same name
        # (a flood's reports all go to one /24) wait for the first and read the cache.
        self._inflight: dict[str, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(self.settings.max_concurrent_queries)

    def _check_resolvers(self) -> None:
        """Refuse now what :meth:`_make_resolver` would refuse, without dnspython: a nameserver
        that does not parse (ValueError), or without nameservers an /etc/resolv.conf that cannot
        be read, has no ``nameserver`` line or one dnspython does not take (DiscoveryError,
        dnspython's words)."""
        if self.settings.nameservers:
            for text in self.settings.nameservers:
                parse_nameserver(text)
            return
        try:
            with open(RESOLV_CONF, encoding="utf-8") as f:
                # the lines read_resolv_conf reads: not starting with # or ;, two tokens or more
                lines = [
                    tokens
                    for line in f
                    if line[:1] not in ("#", ";") and len(tokens := line.split()) >= 2
                ]
        except (OSError, UnicodeDecodeError):
            why = f"cannot open {RESOLV_CONF}"
        else:
            named = [tokens[1] for tokens in lines if tokens[0] == "nameserver"]
            # a domain or search name that dnspython refuses stops it at its line, first
            names = [
                text
                for tokens in lines
                if tokens[0] in ("domain", "search")
                for text in tokens[1 : 2 if tokens[0] == "domain" else None]
            ]
            refused = next(filter(None, map(_resolv_conf_name, names)), None)
            why = refused or ("" if named else "no nameservers")
            # and then its nameservers setter's: an IP address (a scope allowed) or an https URL
            bad = next((text for text in named if not _resolv_conf_server(text)), None)
            if not why and bad is not None:
                why = (
                    f"nameserver {bad} is not a dns.nameserver.Nameserver instance or text form, "
                    "IP address, nor a valid https URL"
                )
        if why:
            raise DiscoveryError(
                f"no registry.nameservers configured and {RESOLV_CONF} unusable: {why}"
            )

    async def _resolver_now(self) -> dns.asyncresolver.Resolver:
        """The resolver, built by the first question (dnspython imported in a worker thread:
        the event loop goes on receiving flows); concurrent first questions wait for it."""
        if self._resolver is None:
            async with self._building:
                if self._resolver is None:
                    self._resolver = await trio.to_thread.run_sync(self._make_resolver)
        return self._resolver

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver
        import dns.exception
        import dns.nameserver

        resolver = dns.asyncresolver.Resolver(configure=False)
        if self.settings.nameservers:
            servers: list[dns.nameserver.Nameserver | str] = []
            for text in self.settings.nameservers:
                host, port = parse_nameserver(text)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            resolver.nameservers = servers
        else:
            try:
                resolver.read_resolv_conf(RESOLV_CONF)
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                raise DiscoveryError(
                    f"no registry.nameservers configured and {RESOLV_CONF} unusable: {exc}"
                ) from None
        resolver.cache = None  # ours is bounded and knows negative answers; dnspython's isn't
        resolver.timeout = self.settings.timeout_s
        resolver.lifetime = self.settings.timeout_s
        resolver.retry_servfail = False
        resolver.use_edns(0, 0, 1232)  # the DNS Flag Day 2020 size; larger answers go to TCP
        return resolver

    # -- lookups --------------------------------------------------------------------------

    async def lookup_address(self, addr: str | reg.Address) -> list[Found]:
        """Records for ``addr``, from the longest reverse-zone prefix that has any, upwards.

        The first name in the walk that holds OVF1 records answers (a more specific record
        wins); several records there are rotation, a ``p=`` empty one a revocation (returned;
        :func:`overflowd.registry.valid_keys` leaves it out). Empty list: nothing published.
        DiscoveryError when a name in the walk could not be resolved or the budget ran out
        before an answer, since a more specific record might exist that we did not see.
        """
        address = reg.as_address(addr)
        self._c.lookups += 1
        budget = _Budget(self.settings.max_queries)
        for _plen, name in reg.address_record_names(address):
            found = await self._records_at(name, budget)
            if found:
                return found
        return []

    async def lookup_prefix(
        self, net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> list[Found]:
        """Records for a whole prefix: the walk-up of its first address from the prefix's own
        length upwards (a record for one host inside it never speaks for all of it). Empty:
        nothing published; DiscoveryError as :meth:`lookup_address`."""
        self._c.lookups += 1
        budget = _Budget(self.settings.max_queries)
        for plen, name in reg.address_record_names(net.network_address):
            if plen > net.prefixlen:
                continue
            found = await self._records_at(name, budget)
            if found:
                return found
        return []

    async def lookup_name(self, domain: str) -> list[Found]:
        """Records at ``_overflowd.<domain>``; ValueError if ``domain`` is not a domain name."""
        name = reg.domain_record_name(domain)
        self._c.lookups += 1
        return await self._records_at(name, _Budget(self.settings.max_queries))

    async def abuse_contacts(self, addr: str | reg.Address) -> list[AbuseFound]:
        """Contacts for ``addr`` from the configured abuse zones, asked in order.

        The first zone with contacts answers. A zone that fails is skipped (logged, counted);
        DiscoveryError only if every zone failed.
        """
        address = reg.as_address(addr)
        self._c.lookups += 1
        return await self._abuse(address, _Budget(self.settings.max_queries))

    async def discover(self, target: str, *, abuse: bool = True) -> Discovery:
        """Everything about an address or a domain name; failures become ``errors``.

        For an address, ``_overflowd`` records come first; the abuse zones are consulted after
        them (always when ``abuse``, else only when the records gave no contact).
        """
        try:
            address: reg.Address | None = reg.as_address(target)
        except ValueError:
            address = None
        errors: list[str] = []
        records: list[Found] = []
        abuse_found: list[AbuseFound] = []
        try:
            if address is None:
                records = await self.lookup_name(target)
            else:
                records = await self.lookup_address(address)
        except DiscoveryError as exc:
            errors.append(str(exc))
        has_contacts = any(f.record.contacts for f in records)
        if address is not None and self.settings.abuse_zones and (abuse or not has_contacts):
            try:
                abuse_found = await self.abuse_contacts(address)
            except DiscoveryError as exc:
                errors.append(str(exc))
        return Discovery(target, tuple(records), tuple(abuse_found), tuple(errors))

    # -- statistics -----------------------------------------------------------------------

    def statistics(self) -> DnsStatistics:
        c = self._c
        return DnsStatistics(
            lookups=c.lookups,
            queries=c.queries,
            cache_hits=c.cache_hits,
            answers=c.answers,
            nxdomain=c.nxdomain,
            nodata=c.nodata,
            failures=c.failures,
            timeouts=c.timeouts,
            budget_exhausted=c.budget_exhausted,
            coalesced=c.coalesced,
            records_foreign=c.records_foreign,
            records_malformed=c.records_malformed,
            records_oversized=c.records_oversized,
            records_excess=c.records_excess,
            inflight_refused=c.inflight_refused,
            abuse_malformed=c.abuse_malformed,
            cache=self.cache.statistics(),
        )

    # -- internals ------------------------------------------------------------------------

    async def _records_at(self, name: str, budget: _Budget) -> list[Found]:
        entry, fresh = await self._txt(name, budget)
        if entry.outcome is Outcome.FAILURE:
            raise DiscoveryError(f"{name}: {entry.reason}")
        if entry.outcome is not Outcome.ANSWER:
            return []
        parsed = reg.parse_answer(entry.records)
        if fresh:  # count each record once, when it arrives, not on every cache hit
            self._c.records_foreign += parsed.foreign
            self._c.records_malformed += parsed.malformed
            self._c.records_oversized += parsed.oversized
            self._c.records_excess += parsed.excess
            if parsed.malformed or parsed.oversized:
                log.warning(
                    "dns.records_ignored name=%s malformed=%d oversized=%d",
                    name,
                    parsed.malformed,
                    parsed.oversized,
                )
        return [Found(name, record) for record in parsed.records]

    async def _abuse(self, address: reg.Address, budget: _Budget) -> list[AbuseFound]:
        failures: list[str] = []
        for zone in self.settings.abuse_zones:
            name = reg.abuse_zone_name(address, zone)
            try:
                entry, fresh = await self._txt(name, budget)
            except DiscoveryError as exc:  # budget exhausted
                failures.append(str(exc))
                break
            if entry.outcome is Outcome.FAILURE:
                failures.append(f"{name}: {entry.reason}")
                continue
            contacts: list[str] = []
            for raw in entry.records:
                try:
                    contacts.extend(c for c in reg.parse_abuse_txt(raw) if c not in contacts)
                except DecodeError:
                    if fresh:
                        self._c.abuse_malformed += 1
            if contacts:
                return [AbuseFound(name, tuple(contacts[: reg.MAX_ABUSE_CONTACTS]))]
        if failures and len(failures) >= len(self.settings.abuse_zones):
            raise DiscoveryError("; ".join(failures))
        return []

    async def _txt(self, name: str, budget: _Budget) -> tuple[CachedTxt, bool]:
        """The cached or fresh outcome of one TXT question; True if it came from the network."""
        key = name.rstrip(".").lower()
        cached = self.cache.get(name, self._clock())
        while cached is None and (pending := self._inflight.get(key)) is not None:
            self._c.coalesced += 1
            await pending.wait()
            cached = self.cache.get(name, self._clock())  # None if it was not cacheable
        if cached is not None:
            self._c.cache_hits += 1
            return cached, False
        if budget.left <= 0:
            if not budget.exhausted:
                budget.exhausted = True
                self._c.budget_exhausted += 1
            raise DiscoveryError(
                f"{name}: query budget of {self.settings.max_queries} per lookup used up"
            )
        if len(self._inflight) >= MAX_INFLIGHT_NAMES:
            self._c.inflight_refused += 1
            raise DiscoveryError(f"{name}: {MAX_INFLIGHT_NAMES} names are being asked already")
        budget.left -= 1
        done = self._inflight[key] = trio.Event()
        try:
            async with self._limiter:
                return await self._query(name), True
        finally:
            del self._inflight[key]
            done.set()

    async def _query(self, name: str) -> CachedTxt:
        try:
            resolver = await self._resolver_now()
        except DiscoveryError as exc:  # /etc/resolv.conf changed since start: said per name
            return self._failure(name, str(exc))
        import dns.exception
        import dns.rdatatype
        import dns.rdtypes.ANY.TXT
        import dns.resolver

        self._c.queries += 1
        timeout = self.settings.timeout_s
        try:
            # dnspython's lifetime bounds the question; the trio deadline is a safety net.
            with trio.fail_after(timeout + 1.0):
                answer = await resolver.resolve(
                    name, dns.rdatatype.TXT, raise_on_no_answer=False, lifetime=timeout
                )
        except dns.resolver.NXDOMAIN as exc:
            self._c.nxdomain += 1
            responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
            ttl = _negative_ttl(responses[0]) if responses else None
            return self.cache.put_negative(name, Outcome.NXDOMAIN, ttl, self._clock())
        except (dns.exception.Timeout, trio.TooSlowError):
            self._c.failures += 1
            self._c.timeouts += 1
            log.debug("dns.timeout name=%s after=%.1fs", name, timeout)
            return self.cache.put_failure(name, f"no answer within {timeout:g}s", self._clock())
        except dns.resolver.NoNameservers as exc:
            return self._failure(name, f"every nameserver failed: {_one_line(exc)}")
        except dns.exception.DNSException as exc:
            return self._failure(name, _one_line(exc))
        except OSError as exc:
            return self._failure(name, f"network error: {exc.strerror or exc}")
        now = self._clock()
        if answer.rrset is None:
            self._c.nodata += 1
            return self.cache.put_negative(
                name, Outcome.NODATA, _negative_ttl(answer.response), now
            )
        self._c.answers += 1
        records: list[bytes] = []
        for rdata in answer.rrset:
            if not isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
                continue
            if sum(len(s) for s in rdata.strings) > reg.MAX_RECORD_BYTES:
                # neither parse_record nor parse_abuse_txt reads one this long: not cached
                self._c.records_oversized += 1
                continue
            if len(records) >= MAX_TXT_RECORDS:
                self._c.records_excess += 1
                continue
            records.append(b"".join(rdata.strings))
        entry = self.cache.put_answer(name, tuple(records), float(answer.rrset.ttl), now)
        if entry.outcome is Outcome.FAILURE:
            log.debug("dns.answer_too_large name=%s records=%d", name, len(records))
        return entry

    def _failure(self, name: str, reason: str) -> CachedTxt:
        self._c.failures += 1
        log.debug("dns.failure name=%s reason=%s", name, reason)
        return self.cache.put_failure(name, reason, self._clock())


async def observer_trust(
    registry: DnsRegistry,
    book: TrustBook,
    key: bytes,
    *,
    now_ms: int,
    address: str | reg.Address | None = None,
    domain: str | None = None,
) -> Trust:
    """The trust of a report's ``key``, asking DNS only when a pin does not already decide.

    ``address`` is where the observer's report came from (the in-band sender, the webhook
    client), ``domain`` a name it claims; records found at either can vouch for the key. A
    failed lookup is no evidence (logged at DEBUG, counted by the registry), never an error:
    a report is not refused because DNS is down.
    """
    pinned = book.assess(key, now_ms=now_ms)
    if pinned.level is TrustLevel.PINNED:
        return pinned
    found: list[Found] = []
    try:
        if address is not None:
            found += await registry.lookup_address(address)
        if domain is not None and not any(f.record.public_key == key for f in found):
            found += await registry.lookup_name(domain)
    except (DiscoveryError, ValueError) as exc:
        log.debug("dns.trust_lookup_failed error=%s", exc)
    return book.assess(key, dns=found, now_ms=now_ms)


# ---------------------------------------------------------------------------------------------
# Hints for the hot path: asked boosts and webhook URLs, read without waiting

#: Addresses whose hints are held (least recently warmed forgotten first), about 500 B each
#: (HINT_OVERHEAD_BYTES) plus the URL and name they hold.
HINT_ENTRIES = 65_536
#: Estimated bytes of the hints table: a webhook URL (u=) is up to a record's 4096 bytes,
#: so the entry bound alone would allow ~270 MiB; typical hints (no URL) fit 65 536 times.
HINT_MAX_BYTES = 32 * 1024 * 1024
#: Bytes a hint costs beyond its strings: the Hint object and its __dict__, the address key,
#: the OrderedDict slot (CPython 3.11, tracemalloc, rounded up; a unit test checks).
HINT_OVERHEAD_BYTES = 512
#: Addresses waiting to be looked up; beyond this, warm() drops and counts.
HINT_QUEUE = 1_024
#: Lookups at once (each bounded by the registry's own limits).
HINT_WORKERS = 4
#: A hint is looked up again when warmed after this long (the registry's cache still saves
#: the question while the record's TTL runs).
HINT_REFRESH_S = 300.0


@dataclass(frozen=True)
class Hint:
    """What the ``_overflowd`` records for an address ask: a boost (``r=``), a webhook (``u=``)."""

    boost: float | None
    webhook_url: str | None
    #: the DNS name that answered, "" when nothing is published or the lookup failed
    source: str
    at: float

    @property
    def footprint(self) -> int:
        """Estimated bytes this hint holds in the table (an upper bound)."""
        return HINT_OVERHEAD_BYTES + len(self.webhook_url or "") + len(self.source)


@dataclass(frozen=True)
class HintStatistics:
    entries: int
    bytes: int  # estimated, Hint.footprint summed
    warmed: int  # lookups queued
    queue_dropped: int  # warm() with a full queue
    lookups: int  # lookups done
    failures: int  # lookups that failed (no hint; asked again after HINT_REFRESH_S)
    boosts: int  # hints found asking for a boost (r= above 1)
    #: lookups that raised an exception nothing expected, by type (counted in failures too)
    errors: Mapping[str, int] = field(default_factory=dict)


class RegistryHints:
    """Asked boosts and webhook URLs per address, from a bounded table filled in the background.

    The sampler asks for a boost per record, synchronously, on the hot path: :meth:`boost` only
    reads the table (a dict look-up), never DNS. :meth:`warm` queues an address to be looked up
    (never blocks; full queue: dropped and counted) and :meth:`run` does the lookups. So the
    first reports toward a new address use no asked boost and no DNS webhook: the lookup their
    report triggers serves the ones after it. Callers warm only addresses they may notify, at
    report rate (never per record), so a flood of spoofed sources cannot become a flood of
    DNS questions.
    """

    def __init__(
        self,
        registry: DnsRegistry,
        *,
        max_entries: int = HINT_ENTRIES,
        max_bytes: int = HINT_MAX_BYTES,
        queue: int = HINT_QUEUE,
        workers: int = HINT_WORKERS,
        refresh_s: float = HINT_REFRESH_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or queue < 1 or workers < 1 or refresh_s < 0:
            raise ValueError("max_entries, max_bytes, queue and workers >= 1, refresh_s >= 0")
        self.registry = registry
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._workers = workers
        self._refresh_s = refresh_s
        self._clock = clock or trio.current_time
        self._hints: OrderedDict[reg.Address, Hint] = OrderedDict()
        self._pending: set[reg.Address] = set()
        self._send, self._recv = trio.open_memory_channel[reg.Address](queue)
        self._warmed = self._dropped = self._lookups = self._failures = self._boosts = 0
        self._errors: Counter[str] = Counter()

    @property
    def boosts_seen(self) -> bool:
        """True once any address asked for a boost: until then the sampler need not ask."""
        return self._boosts > 0

    # Addresses are keyed as reg.as_address gives them, so ::ffff:192.0.2.7 and 192.0.2.7
    # are one entry (and one lookup, in in-addr.arpa) whichever form the flow carried.

    def peek(self, address: reg.Address) -> Hint | None:
        return self._hints.get(reg.as_address(address))

    def boost(self, address: reg.Address) -> float | None:
        """The boost asked for ``address`` (``AskedBoost`` for the sampler); None if unknown."""
        hint = self._hints.get(reg.as_address(address))
        return None if hint is None else hint.boost

    def webhook_url(self, address: reg.Address) -> str | None:
        hint = self._hints.get(reg.as_address(address))
        return None if hint is None else hint.webhook_url

    def warm(self, address: reg.Address) -> bool:
        """Queue a lookup for ``address`` unless a fresh hint or a lookup is there already."""
        address = reg.as_address(address)
        hint = self._hints.get(address)
        if hint is not None and self._clock() - hint.at < self._refresh_s:
            return False
        if address in self._pending:
            return False
        try:
            self._send.send_nowait(address)
        except trio.WouldBlock:
            self._dropped += 1
            return False
        self._pending.add(address)
        self._warmed += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            address = await self._recv.receive()
            try:
                found = await self.registry.lookup_address(address)
            except DiscoveryError as exc:
                self._failures += 1
                log.debug("dns.hint_failed address=%s error=%s", address, exc)
                found = []
            except Exception as exc:  # the per-answer boundary: a DNS answer reaching a bug
                self._failures += 1  # costs its hint, never the node (the daemon's nursery)
                self._errors[type(exc).__name__[:40]] += 1
                log.warning("dns.hint_error address=%s error=%s", address, _one_line(exc))
                found = []
            finally:
                self._pending.discard(address)
            self._lookups += 1
            boost = max((f.record.boost for f in found if f.record.boost), default=None)
            url = next((f.record.webhook_url for f in found if f.record.webhook_url), None)
            source = found[0].name if found else ""
            if boost is not None and boost > 1.0:
                self._boosts += 1
            old = self._hints.pop(address, None)
            if old is not None:
                self._bytes -= old.footprint
            hint = self._hints[address] = Hint(boost, url, source, self._clock())
            self._bytes += hint.footprint
            while len(self._hints) > self._max or self._bytes > self._max_bytes:
                _address, gone = self._hints.popitem(last=False)
                self._bytes -= gone.footprint

    def statistics(self) -> HintStatistics:
        return HintStatistics(
            entries=len(self._hints),
            bytes=self._bytes,
            warmed=self._warmed,
            queue_dropped=self._dropped,
            lookups=self._lookups,
            failures=self._failures,
            boosts=self._boosts,
            errors=dict(self._errors),
        )


def _resolv_conf_name(text: str) -> str:
    """What dns.name.from_text says of a plain ASCII name it refuses ("": it takes it, or the
    name has escapes or other characters, which dnspython alone judges, at the first
    question): an empty label, one over 63 octets, a name over 255."""
    if text in ("@", ".") or not text.isascii() or "\\" in text:
        return ""
    labels = text.split(".")
    if labels[-1] == "":
        labels.pop()  # absolute
    if "" in labels:
        return "A DNS label is empty."
    if any(len(label) > 63 for label in labels):
        return "A DNS label is > 63 octets long."
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        return "A DNS name is > 255 octets long."
    return ""


def _resolv_conf_server(text: str) -> bool:
    """Whether dnspython takes ``text`` from a ``nameserver`` line (dns.inet.is_address, else
    a URL whose scheme is https)."""
    address, scoped, scope = text.partition("%")  # dnspython drops one IPv6 scope, any
    try:
        if not scoped:
            ipaddress.ip_address(text)
        elif "%" in scope:
            raise ValueError(text)
        else:
            ipaddress.IPv6Address(address)
    except ValueError:
        from urllib.parse import urlparse

        try:
            return urlparse(text).scheme == "https"
        except ValueError:
            return False
    return True


def _negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308 §5: the lower of the SOA record's TTL and its MINIMUM field; None without SOA."""
    import dns.rdatatype
    import dns.rdtypes.ANY.SOA

    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            soa = rrset[0]
            if isinstance(soa, dns.rdtypes.ANY.SOA.SOA):
                return float(min(rrset.ttl, soa.minimum))
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:297] + "..." if len(text) > 300 else text

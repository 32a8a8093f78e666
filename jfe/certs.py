"""Certificates for the names clients ask jfe for: the cache, the gate's edges, issuance.

This is the seam jfe's proxy calls (:class:`CertificateSource`). For every TLS client the proxy
reads the ClientHello itself, then asks :meth:`Certificates.cached` (no I/O: the context for a
name that has a valid certificate now) and, on a miss, awaits :meth:`Certificates.context_for`,
which runs the gate (:mod:`jfe.gate`), the network checks that live here (the ``ask`` URL and
the DNS check) and issues from the local CA or ACME, all within budgets. Policy never raises:
a refused or failed name gets the fallback context, counted by reason.

What must hold, whatever clients send:

* a name that already has a certificate is served from memory, whatever the ``ask`` endpoint,
  the resolvers or the ACME server are doing;
* a name that fails the gate never reaches an issuer (no ACME order, no signing);
* work per client, per registered domain and in total is bounded by the gate's buckets; the
  ``ask`` answer is read raw and capped; every wait has a timeout;
* keys on disk are in files created 0600; nothing here logs a key.

Each returned SSLContext is shared by every connection for its name and must not be mutated by
the caller (ALPN included: the proxy passes ALPN through, it does not negotiate it). The one
exception is :meth:`Certificates.challenge_context`, for ACME tls-alpn-01, which offers only
``acme-tls/1`` (RFC 8737): the proxy completes that handshake and closes, forwarding nothing.

Long-running work (renewals, issuance that outlives a handshake's wait) runs under
:meth:`Certificates.run`, a service the proxy starts in its nursery.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpx
import trio

from jfe import gate as gt
from jfe.ca import FALLBACK_NAME, Leaf, LocalCA, write_private
from jfe.certconfig import DAY_S, CertificateSettings
from jfe.gate import Address, Reason
from overflowd.errors import CertificateError, JfeError
from overflowd.identity import NodeIdentity

if TYPE_CHECKING:
    from jfe.acme import AcmeIssuer

__all__ = [
    "CertificateSource",
    "CertificateStatistics",
    "Certificates",
    "Issuer",
    "LocalIssuer",
    "open_certificate_source",
]

log = logging.getLogger(__name__)

#: The ``ask`` answer's body is read and thrown away up to this many bytes: only the status
#: counts, and a hostile endpoint must not make us buffer a stream.
ASK_MAX_BODY_BYTES = 4096
#: Network checks (ask and DNS) running at once; beyond it a handshake waits for a slot
#: (bounded by ask/DNS timeouts), so a flood cannot open thousands of sockets.
MAX_CONCURRENT_CHECKS = 32
#: Names remembered as refused (LRU), memory for the refusal cache.
MAX_REFUSALS = 65_536
#: How often the renewal loop looks for certificates near their end.
RENEW_CHECK_S = 600.0
#: A failed renewal is retried after this long (the old certificate is served meanwhile).
RENEW_RETRY_S = 3600.0
#: Cached PEM files larger than this are not ours (a key and a few certificates).
MAX_PEM_BYTES = 64 * 1024
#: The ALPN protocol of ACME tls-alpn-01 (RFC 8737 §6.2).
ACME_TLS_ALPN = "acme-tls/1"


class CertificateSource(Protocol):
    """What jfe's proxy needs: see the module docstring."""

    def cached(self, server_name: str | None) -> ssl.SSLContext | None: ...

    async def context_for(self, server_name: str | None, client: Address) -> ssl.SSLContext: ...

    def statistics(self) -> CertificateStatistics: ...


class Issuer(Protocol):
    """Makes one certificate, blocking (called in a worker thread)."""

    #: a directory name under the cache dir, so certificates of another issuer (local CA,
    #: another ACME server) are never served for this one
    label: str

    def issue(self, name: str) -> Leaf: ...


@dataclass(frozen=True)
class CertificateStatistics:
    """An immutable snapshot (trio's ``statistics()`` convention)."""

    names: int
    granted: int
    renewed: int
    served_cached: int
    fallback: int
    refused: dict[str, int] = field(default_factory=dict)
    issue_failures: int = 0
    renew_failures: int = 0
    issuing: int = 0
    ask_calls: int = 0
    dns_checks: int = 0
    challenges_served: int = 0
    budget_left_total: float = 0.0
    tracked_clients: int = 0
    tracked_domains: int = 0


@dataclass
class _Pending:
    """A name being checked or issued: its waiters wake on ``done`` and read ``reason``."""

    done: trio.Event = field(default_factory=trio.Event)
    reason: Reason | None = None


@dataclass
class _Entry:
    context: ssl.SSLContext
    not_after: float
    renew_after: float


def server_context(pem_path: Path) -> ssl.SSLContext:
    """A TLS server context with the key and chain in ``pem_path`` (TLS 1.2 at least)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(pem_path)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"{pem_path}: cannot load key and certificate: {exc}") from None
    return ctx


class LocalIssuer:
    """Leaves from the node's local CA."""

    label = "local"

    def __init__(self, ca: LocalCA, lifetime_s: float, wall: Callable[[], float]) -> None:
        self.ca = ca
        self.lifetime_s = lifetime_s
        self.wall = wall

    def issue(self, name: str) -> Leaf:
        return self.ca.issue(name, self.wall(), self.lifetime_s)


class Certificates:
    """The :class:`CertificateSource` jfe runs (see the module docstring)."""

    def __init__(
        self,
        settings: CertificateSettings,
        *,
        cache_dir: Path,
        ca: LocalCA,
        issuer: Issuer,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ca = ca
        self.issuer = issuer
        self._clock = clock
        self._wall = wall
        self.dir = cache_dir / issuer.label
        self._entries: dict[str, _Entry] = {}
        self._gate = gt.Gate(
            gt.AllowList(settings.allow_names),
            client_budget=settings.budget_client(),
            domain_budget=settings.budget_domain(),
            total_budget=settings.budget_total(),
            has_other_checks=bool(settings.ask_url or settings.dns_check),
            max_tracked=settings.max_tracked_buckets,
            now=clock() if _in_trio() else 0.0,
        )
        self._refusals = gt.RefusalMemory(settings.refused_cache_s, MAX_REFUSALS)
        self._local = [ipaddress.ip_network(p) for p in settings.local_addresses]
        self._inflight: dict[str, _Pending] = {}
        self._issue_limiter = trio.CapacityLimiter(settings.max_concurrent_issues)
        self._check_limiter = trio.CapacityLimiter(MAX_CONCURRENT_CHECKS)
        self._nursery: trio.Nursery | None = None
        self._http: httpx.AsyncClient | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._challenges: dict[str, ssl.SSLContext] = {}
        self._challenges_lock = threading.Lock()
        self._c: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._renew_retry: dict[str, float] = {}
        self.fallback_context = self._load_fallback()
        self._load_cache()

    # -- the seam ---------------------------------------------------------------------------

    def cached(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a name with a certificate valid now; no I/O, no waiting."""
        if not server_name:
            return None
        entry = self._entries.get(server_name.lower().rstrip("."))
        if entry is None or entry.not_after <= self._wall():
            return None
        self._c["served_cached"] += 1
        return entry.context

    async def context_for(self, server_name: str | None, client: Address) -> ssl.SSLContext:
        """The name's context, issuing it if the gate allows; the fallback context otherwise.

        The first handshake for a new name that passes the gate's free checks registers the
        name as pending before any network check, so concurrent handshakes for it wait for that
        one outcome and spend no budget of their own.
        """
        ctx = self.cached(server_name)
        if ctx is not None:
            return ctx
        name = gt.normalize_name(server_name) if server_name else None
        if name is not None:
            if name in self._inflight:
                return await self._await_issue(name)
            if self._refusals.recalls(name, self._clock()) is not None:
                return self._fallback(Reason.RECENTLY_REFUSED)
        screened = self._gate.screen(server_name, client, self._clock())
        if isinstance(screened, Reason):
            return self._fallback(screened)
        if len(self._entries) >= self.settings.max_names:
            return self._fallback(Reason.FULL)
        pending = _Pending()
        self._inflight[screened.name] = pending
        if self._nursery is not None:
            self._nursery.start_soon(self._admit_and_issue, screened, client, pending)
        else:
            with trio.move_on_after(self.settings.wait_for_issue_s):
                await self._admit_and_issue(screened, client, pending)
        return await self._await_issue(screened.name, pending)

    async def _admit_and_issue(
        self, screened: gt.Admitted, client: Address, pending: _Pending
    ) -> None:
        """The network checks, the domain and total tokens, then the issuance; ``pending``
        carries the refusal, if any, to every handshake waiting for the name."""
        name = screened.name
        try:
            refusal = await self._network_checks(name, client)
            if refusal is not None:
                self._refusals.remember(name, refusal, self._clock())
            else:
                refusal = self._gate.charge(screened, self._clock())
            if refusal is not None:
                pending.reason = refusal
                return
            await self._issue_task(name, pending, False)
        finally:
            self._settle(name, pending)

    def challenge_context(
        self, server_name: str | None, alpn: tuple[str, ...]
    ) -> ssl.SSLContext | None:
        """The tls-alpn-01 answer for ``server_name`` while an ACME order for it is pending,
        when the client offers ``acme-tls/1``; None otherwise (then use cached/context_for).

        RFC 8737 §3: the validation server offers only ``acme-tls/1``; the proxy completes the
        handshake with this context and closes the connection, forwarding nothing upstream.
        """
        if ACME_TLS_ALPN not in alpn or not server_name:
            return None
        with self._challenges_lock:
            ctx = self._challenges.get(server_name.lower().rstrip("."))
        if ctx is not None:
            self._c["challenges_served"] += 1
        return ctx

    def statistics(self) -> CertificateStatistics:
        now = self._clock() if _in_trio() else None
        return CertificateStatistics(
            names=len(self._entries),
            granted=self._c["granted"],
            renewed=self._c["renewed"],
            served_cached=self._c["served_cached"],
            fallback=self._c["fallback"],
            refused=dict(self._refused),
            issue_failures=self._c["issue_failures"],
            renew_failures=self._c["renew_failures"],
            issuing=len(self._inflight),
            ask_calls=self._c["ask_calls"],
            dns_checks=self._c["dns_checks"],
            challenges_served=self._c["challenges_served"],
            budget_left_total=(
                self._gate.total_left(now) if now is not None else self._gate.total.tokens
            ),
            tracked_clients=len(self._gate.clients),
            tracked_domains=len(self._gate.domains),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew certificates before they expire and let issuance outlive a handshake's wait."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await self.renew_due()
                    await trio.sleep(RENEW_CHECK_S)
        finally:
            self._nursery = None
            if self._http is not None:
                with trio.CancelScope(shield=True):
                    await self._http.aclose()
                self._http = None

    # -- the ACME issuer's challenge hooks (called from its worker thread) -------------------

    def publish_challenge(self, name: str, pem: bytes) -> None:
        path = self.dir.parent / "challenges" / f"{name}.pem"
        write_private(path, pem)
        try:
            ctx = server_context(path)
        finally:
            path.unlink(missing_ok=True)
        ctx.set_alpn_protocols([ACME_TLS_ALPN])
        with self._challenges_lock:
            self._challenges[name] = ctx

    def withdraw_challenge(self, name: str) -> None:
        with self._challenges_lock:
            self._challenges.pop(name, None)

    # -- issuance ---------------------------------------------------------------------------

    async def _await_issue(self, name: str, pending: _Pending | None = None) -> ssl.SSLContext:
        pending = pending or self._inflight.get(name)
        if pending is not None:
            with trio.move_on_after(self.settings.wait_for_issue_s):
                await pending.done.wait()
        ctx = self.cached(name)
        if ctx is not None:
            return ctx
        if pending is None:  # settled before we looked: its reason is gone with it
            return self._fallback(Reason.ISSUE_FAILED)
        if not pending.done.is_set():
            return self._fallback(Reason.ISSUE_PENDING)
        return self._fallback(pending.reason or Reason.ISSUE_FAILED)

    def _settle(self, name: str, pending: _Pending) -> None:
        if self._inflight.get(name) is pending:
            del self._inflight[name]
        pending.done.set()

    async def _issue_task(self, name: str, pending: _Pending, renewal: bool) -> None:
        try:
            with trio.move_on_after(self._issue_timeout_s()) as scope:
                leaf = await trio.to_thread.run_sync(
                    self.issuer.issue, name, limiter=self._issue_limiter, abandon_on_cancel=True
                )
                ctx = await trio.to_thread.run_sync(self._store, leaf, abandon_on_cancel=False)
                self._entries[name] = self._entry(ctx, leaf.not_after)
            if scope.cancelled_caught:
                raise JfeError(f"issuing for {name} took over {self._issue_timeout_s():.0f} s")
            self._c["renewed" if renewal else "granted"] += 1
            self._renew_retry.pop(name, None)
            log.info(
                "certificate_issued name=%s issuer=%s renewal=%s", name, self.issuer.label, renewal
            )
        except (JfeError, OSError, ValueError) as exc:
            pending.reason = Reason.ISSUE_FAILED
            if renewal:
                self._c["renew_failures"] += 1
                self._renew_retry[name] = self._wall() + RENEW_RETRY_S
            else:
                self._c["issue_failures"] += 1
                self._refusals.remember(name, Reason.ISSUE_FAILED, self._clock())
            log.warning(
                "certificate_failed name=%s issuer=%s error=%s", name, self.issuer.label, exc
            )
        finally:
            if renewal:
                self._settle(name, pending)

    def _issue_timeout_s(self) -> float:
        if self.issuer.label == "local":
            return 30.0  # a signature and a file: only a stalled disk takes this long
        return self.settings.acme_order_timeout_s

    def _store(self, leaf: Leaf) -> ssl.SSLContext:
        """Write the leaf's file (0600: it holds the key) and load it (worker thread)."""
        path = self.dir / f"{leaf.name}.pem"
        write_private(path, leaf.pem)
        return server_context(path)

    def _entry(self, ctx: ssl.SSLContext, not_after: float) -> _Entry:
        return _Entry(ctx, not_after, not_after - self.settings.renew_before_days * DAY_S)

    async def renew_due(self) -> int:
        """Renew every certificate past its renewal time (the old one is served until the new
        one is stored); returns how many renewals were started. Renewals take no budget: they
        are bounded by the names already held, not by what clients ask for."""
        now = self._wall()
        due = [
            name
            for name, entry in self._entries.items()
            if entry.renew_after <= now
            and name not in self._inflight
            and self._renew_retry.get(name, 0.0) <= now
        ]
        async with trio.open_nursery() as nursery:
            for name in due:
                pending = _Pending()
                self._inflight[name] = pending
                nursery.start_soon(self._issue_task, name, pending, True)
        return len(due)

    # -- network checks ---------------------------------------------------------------------

    async def _network_checks(self, name: str, client: Address) -> Reason | None:
        async with self._check_limiter:
            if self.settings.ask_url:
                refusal = await self._ask(name, client)
                if refusal is not None:
                    return refusal
            if self.settings.dns_check:
                return await self._dns_check(name)
        return None

    async def _ask(self, name: str, client: Address) -> Reason | None:
        """Caddy's model plus the client's address: GET ask_url?domain=NAME&client=ADDR."""
        self._c["ask_calls"] += 1
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        timeout = self.settings.ask_timeout_s
        try:
            with trio.fail_after(timeout + 0.5):
                async with self._http.stream(
                    "GET",
                    self.settings.ask_url,
                    params={"domain": name, "client": str(client)},
                    timeout=httpx.Timeout(timeout),
                ) as response:
                    seen = 0
                    async for chunk in response.aiter_raw():
                        seen += len(chunk)
                        if seen > ASK_MAX_BODY_BYTES:
                            break
                    status = response.status_code
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            log.debug("ask_failed name=%s error=%s", name, type(exc).__name__)
            return Reason.ASK_FAILED
        return None if status == 200 else Reason.ASK_REFUSED

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        if self.settings.dns_nameservers:
            servers: list[dns.nameserver.Nameserver | str] = []
            for text in self.settings.dns_nameservers:
                host, port = _split_hostport(text)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            resolver.nameservers = servers
        else:
            resolver.read_resolv_conf("/etc/resolv.conf")
        resolver.cache = None
        resolver.timeout = self.settings.dns_timeout_s
        resolver.lifetime = self.settings.dns_timeout_s
        return resolver

    async def _dns_check(self, name: str) -> Reason | None:
        """Every A and AAAA record of ``name`` (CNAMEs followed) is an address of this host."""
        self._c["dns_checks"] += 1
        try:
            if self._resolver is None:
                self._resolver = self._make_resolver()
            addresses: list[Address] = []
            with trio.fail_after(self.settings.dns_timeout_s + 0.5):
                for rdtype in ("A", "AAAA"):
                    try:
                        answer = await self._resolver.resolve(name, rdtype)
                    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                        continue
                    addresses.extend(ipaddress.ip_address(r.address) for r in answer)
        except (dns.exception.DNSException, trio.TooSlowError, OSError) as exc:
            log.debug("dns_failed name=%s error=%s", name, type(exc).__name__)
            return Reason.DNS_FAILED
        if not addresses or not all(self._is_local(a) for a in addresses):
            return Reason.DNS_ELSEWHERE
        return None

    def _is_local(self, address: Address) -> bool:
        """Configured as ours, or an address this host can bind: the kernel's own answer to
        "is this one of my addresses", without enumerating interfaces.

        Loopback counts only when configured: anybody can point a name at 127.0.0.1 (public
        names like that exist for developers), so it says nothing about whose name it is.
        """
        if any(address in net for net in self._local):
            return True
        # ::ffff:127.0.0.1 and ::ffff:0.0.0.0 are bindable here, and Python 3.11 calls neither
        # loopback nor unspecified: judge a v4-mapped address as the IPv4 address it is.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
            if any(address in net for net in self._local):
                return True
        if address.is_loopback or address.is_unspecified or address.is_multicast:
            return False
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((str(address), 0))
        except OSError as exc:
            # Not bindable is not ours. Any other error (no IPv6 in this kernel, say) is
            # refused too: raising here would end the certificate service, and jfe with it.
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL):
                log.warning("dns_check_probe_failed address=%s error=%s", address, exc)
            return False
        return True

    # -- cache on disk ----------------------------------------------------------------------

    def _fallback(self, reason: Reason) -> ssl.SSLContext:
        self._c["fallback"] += 1
        self._refused[reason.value] += 1
        return self.fallback_context

    def _load_fallback(self) -> ssl.SSLContext:
        path = self.dir.parent / "local" / "_fallback.pem"
        now = self._wall()
        try:
            pem = path.read_bytes()
            fresh = Leaf.not_after_of(
                pem
            ) - now > self.settings.renew_before_days * DAY_S and self.ca.signed(pem)
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            leaf = self.ca.issue(FALLBACK_NAME, now, self.settings.leaf_lifetime_days * DAY_S)
            write_private(path, leaf.pem)
        return server_context(path)

    def _load_cache(self) -> None:
        """Serve what earlier runs issued (valid ones, up to max_names); skip what is not ours."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = self._wall()
        for path in sorted(self.dir.glob("*.pem")):
            name = path.name[: -len(".pem")]
            if gt.normalize_name(name) != name or len(self._entries) >= self.settings.max_names:
                continue
            if self._gate.policy_refuses(name) is not None:
                # Issued under an earlier allow-list: the name is no longer ours to serve, and
                # keeping it would also renew it (ACME orders) for ever.
                continue
            try:
                if path.stat().st_size > MAX_PEM_BYTES:
                    continue
                pem = path.read_bytes()
                not_after = Leaf.not_after_of(pem)
                if not_after <= now:
                    continue
                if self.issuer.label == "local" and not self.ca.signed(pem):
                    continue  # an earlier identity's CA: clients trusting this one reject it
                self._entries[name] = self._entry(server_context(path), not_after)
            except (OSError, ValueError, CertificateError) as exc:
                log.warning("certificate_unreadable path=%s error=%s", path, exc)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _split_hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


def open_certificate_source(
    home: Path,
    settings: CertificateSettings,
    identity: NodeIdentity,
    *,
    clock: Callable[[], float] = trio.current_time,
    wall: Callable[[], float] = time.time,
) -> Certificates:
    """The source jfe runs: the local CA (always: it signs the fallback) and the issuer the
    settings name. Reads and writes files under the node home; no network."""
    cache_dir = Path(settings.cache_dir)
    if not cache_dir.is_absolute():
        cache_dir = home / cache_dir
    ca = LocalCA.open(cache_dir, identity, wall())
    issuer: Issuer
    acme: AcmeIssuer | None
    if settings.mode == "acme":
        from jfe.acme import AcmeIssuer  # the acme library only where it is used

        acme = AcmeIssuer.open(cache_dir, settings)
        issuer = acme
    else:
        acme = None
        issuer = LocalIssuer(ca, settings.leaf_lifetime_days * DAY_S, wall)
    source = Certificates(
        settings, cache_dir=cache_dir, ca=ca, issuer=issuer, clock=clock, wall=wall
    )
    if acme is not None:
        acme.attach(source)
    return source

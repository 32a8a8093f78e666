"""Whom to call, from DNS: the contacts the networks an observer reports from publish.

A report carries its observer's own contacts (``who``'s ``contacts``), not where it came from.
The store does know that: ``observer_networks`` holds the /24 or /48 networks each key's reports
arrived from over a path that proves the source (webhooks, peers: the networks of trust
continuity, :mod:`overflowd.store.continuity`); for a key heard only in band, which has none,
the networks its reports name as sources stand in (:func:`wanted`). For the first
:data:`WHO_DNS_ROWS`
rows of a ``who`` answer, this asks DNS about each key's :data:`WHO_DNS_NETWORKS` most recently
seen networks: (a) the ``_overflowd`` record for the network (the walk-up of
:meth:`DnsRegistry.lookup_prefix`), whose contacts count only if the record names the observer's
key (anyone may publish a record; one for another key says nothing about this observer), and
(b) the abuse-zone contacts of the network (``[registry] abuse_zones``).

All lookups run at once under one deadline, :data:`WHO_DNS_BUDGET_S`; each is further bounded by
the registry's own limits (``timeout_s`` per question, ``max_queries`` per lookup). What did not
answer in time says ``error: "timeout"``; the answer itself is never held up longer.

The CLI (``overflowd-query who``, its own registry from ``[registry]``) and the API
(``/v1/who``, the daemon's registry and its cache) call the same :func:`registry_contacts`, so
they give the same rows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, select

from overflowd import registry as reg
from overflowd.answers import RegistryContacts, who_json
from overflowd.errors import DiscoveryError
from overflowd.registry import RegistrySettings
from overflowd.store.models import Base
from overflowd.store.repository import Store

if TYPE_CHECKING:
    from overflowd.services.dns import DnsRegistry
    from overflowd.store.query import WhoRow

# trio and dnspython (services.dns) are imported where DNS is asked: the CLI without DNS
# configured must not pay their quarter second.

__all__ = [
    "WHO_DNS_BUDGET_S",
    "WHO_DNS_NETWORKS",
    "WHO_DNS_ROWS",
    "dns_configured",
    "recent_networks",
    "registry_contacts",
    "wanted",
    "who_objects",
    "who_registry",
]

log = logging.getLogger(__name__)

#: ``who`` rows whose networks are looked up: the largest observers are the ones to call, and
#: 20 rows x 2 networks x 2 lookups keeps one answer within the registry's 64 concurrent
#: questions.
WHO_DNS_ROWS = 20
#: Networks per row, the most recently seen first: an observer that moved is called where it is.
WHO_DNS_NETWORKS = 2
#: Total time the lookups of one answer may take. Above the registry's default question timeout
#: (2 s), so one lost packet retried still answers; short enough for a person at a prompt.
WHO_DNS_BUDGET_S = 3.0
#: An error reason longer than this is cut (resolver messages can be long; this is a table cell).
MAX_ERROR_CHARS = 200

_NETWORKS: Table = Base.metadata.tables["observer_networks"]


def dns_configured(settings: RegistrySettings) -> bool:
    """Does the operator ask DNS at all? Only with ``[registry] nameservers`` or ``abuse_zones``:
    a node without them never sends a question for ``who``."""
    return bool(settings.nameservers or settings.abuse_zones)


def who_registry(settings: RegistrySettings, existing: DnsRegistry | None) -> DnsRegistry | None:
    """The registry ``who`` asks: the daemon's own (its cache) when it has one, else a new one;
    None when DNS is not configured or no resolver is usable."""
    if not dns_configured(settings):
        return None
    if existing is not None:
        return existing
    from overflowd.services.dns import DnsRegistry

    try:
        return DnsRegistry(settings)
    except DiscoveryError as exc:
        log.warning("who.no_dns error=%s", exc)
        return None


def recent_networks(
    store: Store, keys: Sequence[bytes], *, per_key: int = WHO_DNS_NETWORKS
) -> dict[bytes, list[str]]:
    """The ``per_key`` most recently seen networks of each of ``keys`` (sync: a worker thread)."""
    if not keys:
        return {}
    t = _NETWORKS
    stmt = (
        select(t.c.key, t.c.network)
        .where(t.c.key.in_(list(keys)))
        .order_by(t.c.key, t.c.last_seen_ms.desc(), t.c.network)
    )
    out: dict[bytes, list[str]] = {}
    # At most MAX_NETWORKS_PER_KEY (64) rows per key are stored, so this reads at most 64 x 20.
    with store.transaction("reading observer networks", write=False) as conn:
        for key, network in conn.execute(stmt):
            nets = out.setdefault(bytes(key), [])
            if len(nets) < per_key:
                nets.append(str(network))
    return out


def _reason(exc: Exception) -> str:
    text = str(exc)
    # The registry's own question timeout ("<name>: no answer within 2s") is a timeout too.
    if "no answer within" in text:
        return "timeout"
    text = " ".join(text.split())
    return text[:MAX_ERROR_CHARS]


async def _one(
    registry: DnsRegistry, key: bytes, network: str, out: list[RegistryContacts], i: int
) -> None:
    try:
        net = ipaddress.ip_network(network, strict=False)
    except ValueError:
        out[i] = RegistryContacts(network, (), (), None, "not a network")
        return
    if not registry.settings.nameservers and not net.is_global:
        # As the daemon: the resolvers of /etc/resolv.conf are not asked about private or
        # documentation networks (RFC 6303); only the operator's own nameservers are.
        out[i] = RegistryContacts(network, (), (), None, "not asked: not a global network")
        return
    import trio

    record: RegistryContacts | None = None
    abuse: tuple[str, ...] = ()
    errors: list[str] = []

    async def records() -> None:
        nonlocal record
        try:
            found = await registry.lookup_prefix(net)
        except DiscoveryError as exc:
            errors.insert(0, _reason(exc))
            return
        names_key = key in reg.valid_keys(found)
        contacts: list[str] = []
        for f in found:
            if names_key and f.record.public_key == key:
                contacts.extend(c for c in f.record.contacts if c not in contacts)
        record = RegistryContacts(network, tuple(contacts), abuse, names_key, None)
        out[i] = dataclasses.replace(record, error="timeout")  # kept if abuse_zones runs late

    async def abuse_zones() -> None:
        nonlocal abuse
        if not registry.settings.abuse_zones:
            return
        try:
            found = await registry.abuse_contacts(net.network_address)
        except DiscoveryError as exc:
            errors.append(_reason(exc))
            return
        abuse = tuple(c for item in found for c in item.contacts)
        out[i] = dataclasses.replace(out[i], abuse_contacts=abuse)  # kept if records runs late

    async with trio.open_nursery() as nursery:
        nursery.start_soon(records)
        nursery.start_soon(abuse_zones)
    out[i] = RegistryContacts(
        network,
        record.contacts if record else (),
        abuse,
        record.record_names_key if record else None,
        errors[0] if errors else None,
    )


async def registry_contacts(
    registry: DnsRegistry,
    wanted: Sequence[tuple[bytes, Sequence[str]]],
    *,
    budget_s: float = WHO_DNS_BUDGET_S,
) -> list[list[RegistryContacts]]:
    """For each ``(key, networks)``, what DNS says about each network, within ``budget_s``.

    Every lookup starts as ``error: "timeout"`` and is replaced when it answers, so whatever is
    still asking when the deadline passes is cancelled and reported as such (with what half of
    it, the record or the abuse zones, did answer).
    """
    import trio

    flat = [(key, net) for key, nets in wanted for net in nets]
    out = [RegistryContacts(net, (), (), None, "timeout") for _key, net in flat]
    with trio.move_on_after(budget_s):
        async with trio.open_nursery() as nursery:
            for i, (key, net) in enumerate(flat):
                nursery.start_soon(_one, registry, key, net, out, i)
    answer: list[list[RegistryContacts]] = []
    at = 0
    for _key, nets in wanted:
        answer.append(out[at : at + len(nets)])
        at += len(nets)
    return answer


def wanted(store: Store, rows: Sequence[WhoRow]) -> list[tuple[bytes, list[str]]]:
    """The networks to ask about for the first :data:`WHO_DNS_ROWS` rows (sync: reads the
    store).

    An observer heard only in band has no ``observer_networks`` (a datagram's source address
    proves nothing, so no sighting is recorded for it). Its row then asks about the networks
    its own reports name: its top source prefixes (``row.top_sources``, busiest first), where
    a router that reports a flood usually sits. That is safe for the same reason as above: a
    record's contacts count only when the record names the observer's key, and the report's
    signature proves the key; the signer chooses which networks are asked about, but no more
    of them (:data:`WHO_DNS_NETWORKS`) and within the same deadline as any other row."""
    first = rows[:WHO_DNS_ROWS]
    networks = recent_networks(store, [r.observer_key for r in first])
    return [
        (
            r.observer_key,
            networks.get(r.observer_key)
            or [str(net) for net, _estimate in r.top_sources[:WHO_DNS_NETWORKS]],
        )
        for r in first
    ]


def who_objects(
    rows: Sequence[WhoRow], found: Sequence[Sequence[RegistryContacts]] | None
) -> list[dict[str, Any]]:
    """The ``who`` rows as JSON, each with its ``registry`` (null beyond the rows asked)."""
    return [
        who_json(row, found[i] if found is not None and i < len(found) else None)
        for i, row in enumerate(rows)
    ]

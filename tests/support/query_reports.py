"""A small, varied store for the query tests, and the filter written again in plain Python.

Reports of three observers (one of them this node: via 'local', no trust label) about IPv4 and
IPv6 networks, an IPv6 address inside ::ffff:0:0/96, several protocols, ports, kinds, trust
labels, sampling probabilities (p = 1 included) and exporter intervals; flow times and
arrival times spread over a few hours. Seeded: the same reports' fields on every run.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.store import Store, StoredReport
from overflowd.store.query import TRUST_ORDER, ReportFilter

BASE_MS = 1_700_000_000_000
HOUR_MS = 3_600_000

#: by family (a flow's two ends are of one family); "::ffff:10.9.8." is IPv6 (mapped form)
SRC_NETS = {4: ("192.0.2.", "198.18.7.", "203.0.113."), 6: ("2001:db8:1::", "2001:db8:2:5::")}
DST_NETS = {4: ("198.51.100.", "198.51.101."), 6: ("2001:db8:ff::", "::ffff:10.9.8.")}
PORTS = (53, 80, 123, 443, 40000, 51413)
KINDS = ("flow-seen", "ddos-suspect")


@dataclass
class Seeded:
    store: Store
    identities: tuple[NodeIdentity, ...]
    #: every stored report, as the store returns it (seq included)
    reports: list[StoredReport]


#: the params of a module-scoped fixture on both backends, as tests/conftest.py's db_url
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def seeded_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, n: int, seed: int
) -> Iterator[Seeded]:
    """The body of a module-scoped fixture (``params=BACKENDS``): one seeded store per backend
    that a module's tests only read."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('seeded') / 'overflowd.db'}"
        with Store.open(url) as store:
            yield seed_store(store, n, seed=seed)
        return
    from tests.conftest import SESSION_DATABASE

    server = request.getfixturevalue("postgres_server")
    request.getfixturevalue("postgres_url")  # creates the session's database
    with server.schema(SESSION_DATABASE) as url, Store.open(url) as store:
        yield seed_store(store, n, seed=seed)


def _address(rng: random.Random, nets: tuple[str, ...]) -> str:
    net = rng.choice(nets)
    if net.startswith("::ffff:"):
        return net + str(rng.randrange(1, 255))
    if ":" in net:
        return net + format(rng.randrange(1, 0xFFFF), "x")
    return net + str(rng.randrange(1, 255))


def seed_store(store: Store, n: int = 400, *, seed: int = 11) -> Seeded:
    rng = random.Random(seed)
    identities = tuple(NodeIdentity.generate() for _ in range(3))
    batch: list[tuple[rpt.SignedReport, int, str]] = []
    trust: dict[str, str] = {}
    for i in range(n):
        who = rng.randrange(3)
        family = rng.choice((4, 4, 6))
        first = BASE_MS + rng.randrange(0, 4 * HOUR_MS)
        last = first + rng.choice((0, 1_000, 60_000, 20 * 60_000))
        packets = rng.randrange(1, 5000)
        p = rng.choice((1.0, 1.0, 0.5, 0.01, 0.001, 0.0001))
        interval = rng.choice((1, 1, 1, 10))
        payload = rpt.Payload(
            kind=rng.choice(KINDS),
            nonce=rng.randbytes(rpt.NONCE_BYTES),
            time=last + 5_000,
            observer=rpt.Observer(
                contacts=(f"mailto:abuse@obs{who}.example",), point=f"edge-{who}"
            ),
            flow=rpt.Flow(
                src=ipaddress.ip_address(_address(rng, SRC_NETS[family])),
                dst=ipaddress.ip_address(_address(rng, DST_NETS[family])),
                sport=rng.choice(PORTS),
                dport=rng.choice(PORTS),
                proto=rng.choice((6, 17, 17, 1)),
                packets=packets,
                bytes=packets * rng.randrange(40, 1500),
                first=first,
                last=last,
                tcp_flags=0,
                tos=0,
            ),
            sampling=rpt.Sampling(probability=p, format="netflow-v5", interval=interval),
        )
        signed = identities[who].sign_report(payload)
        received = last + rng.randrange(1_000, 30 * 60_000)
        via = "local" if who == 0 else rng.choice(("udp", "webhook"))
        if via != "local":
            label = rng.choice((*TRUST_ORDER, None))
            if label is not None:
                trust[signed.report_id] = label
        batch.append((signed, received, via))
        if len(batch) == 100 or i == n - 1:
            store.add_reports(batch, trust=trust)
            batch = []
    stored = store.query_reports()
    assert len(stored) >= n
    return Seeded(store=store, identities=identities, reports=stored)


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: object) -> bool:
    assert isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network)
    return addr.version == net.version and addr in net


def matches(r: StoredReport, f: ReportFilter) -> bool:
    """The filter's meaning, written without SQL (what the docs say it means)."""
    checks = [
        f.since_ms is None or r.last_ms >= f.since_ms,
        f.until_ms is None or r.first_ms <= f.until_ms,
        f.received_since_ms is None or r.received_ms >= f.received_since_ms,
        f.received_until_ms is None or r.received_ms <= f.received_until_ms,
        f.src is None or _in(r.src, f.src),
        f.dst is None or _in(r.dst, f.dst),
        f.either is None or _in(r.src, f.either) or _in(r.dst, f.either),
        f.proto is None or r.proto == f.proto,
        f.port is None or f.port in (r.sport, r.dport),
        f.sport is None or r.sport == f.sport,
        f.dport is None or r.dport == f.dport,
        f.kind is None or r.kind == f.kind,
        not f.observers or r.observer_key in f.observers,
        f.min_trust is None
        or f.min_trust == TRUST_ORDER[0]
        or r.via == "local"
        or (
            r.trust in TRUST_ORDER and TRUST_ORDER.index(r.trust) >= TRUST_ORDER.index(f.min_trust)
        ),
    ]
    return all(checks)

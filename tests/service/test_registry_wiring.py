"""The registry wired into the daemon: received reports carry their observer's trust.

A real Knot DNS server (tests/support/knot.py) on 127.0.0.1 serves ``0.0.127.in-addr.arpa``,
which publishes node X's key at ``_overflowd.1.0.0.127.in-addr.arpa``: the reverse zone of
127.0.0.1, the address the test's datagrams really come from. A real :class:`NodeService`
(collector on 127.0.0.1:0, in-band listener on 127.0.0.1:0, SQLite store) asks that server.
Nothing leaves loopback.

Shown here: a report signed by X and sent from 127.0.0.1 is stored with trust ``dns``; a report
by an unpublished key is ``unknown`` (from 127.0.0.1, where another key is published, and from
127.0.0.2, where nothing is); a new key for a pinned observer raises a ``new_key`` event (log
line, counter, metric, ``overflowd-query events``); a resolver that never answers costs no
report; a slow label never blocks the receive loop.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from overflowd import report as rpt
from overflowd.cli import query
from overflowd.config import Settings
from overflowd.flows import make_row
from overflowd.identity import NodeIdentity
from overflowd.registry import RegistrySettings, format_record, split_txt
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.services.metrics import node_metrics
from overflowd.services.node import NodeService
from overflowd.store import Store
from overflowd.store.events import ObserverEvent, add_events, list_events
from overflowd.wire import datagram
from tests.support.knot import KnotServer, running_knot, soa_zone
from tests.support.reports import make_payload

TIMEOUT_S = 30
NODE = NodeIdentity(seed=b"\x31" * 32)  # the receiving node
X = NodeIdentity(seed=b"\x32" * 32)  # published for 127.0.0.1
Y = NodeIdentity(seed=b"\x33" * 32)  # published nowhere
P1 = NodeIdentity(seed=b"\x34" * 32)  # pinned by the operator
P2 = NodeIdentity(seed=b"\x35" * 32)  # P1's operator's new key, not pinned
PINNED_CONTACTS = ("mailto:noc@edge.example.net",)


def txt(key: bytes, *contacts: str, url: str | None = None, boost: float | None = None) -> str:
    return " ".join(f'"{s}"' for s in split_txt(format_record(key, contacts, url, boost)))


HOOK = "https://hooks.example.net/overflowd"
#: 127.0.0.3 asks for a boost and a webhook; 127.0.0.4 publishes a webhook at an internal address
HINTS = f"""
_overflowd.3 60 IN TXT {txt(Y.public_key, "mailto:y@example.net", url=HOOK, boost=50)}
_overflowd.4 60 IN TXT {txt(Y.public_key, url="https://127.0.0.1/steal")}
"""


ZONES = {
    "0.0.127.in-addr.arpa": soa_zone(
        "0.0.127.in-addr.arpa",
        f"_overflowd.1 60 IN TXT {txt(X.public_key, 'mailto:x@example.net')}\n{HINTS}",
        negative_ttl=60,
    ),
    # the parent, so the walk-up for 127.0.0.2 gets NXDOMAIN above the /24, not REFUSED
    "127.in-addr.arpa": soa_zone("127.in-addr.arpa", "", negative_ttl=60),
}


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with running_knot(ZONES) as server:
        yield server


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'node.sqlite'}"


def settings(nameservers: tuple[str, ...], **registry: object) -> Settings:
    return Settings(
        registry=RegistrySettings(nameservers=nameservers, timeout_s=1.0, **registry),  # type: ignore[arg-type]
        inband=InbandSettings(listen="127.0.0.1:0"),
    )


def signed(by: NodeIdentity, contacts: tuple[str, ...] = ("mailto:a@example.net",)) -> bytes:
    payload = make_payload(
        "192.0.2.1", "198.51.100.2", contacts=contacts, time_ms=int(time.time() * 1000)
    )
    return by.sign_report(payload).cose


async def send(cose: bytes, to: tuple[str, int], source: str = "127.0.0.1") -> str:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((source, 0))
        await sock.sendto(datagram.to_wire(cose), to)
    return rpt.report_id(cose)


async def wait_until(check: Callable[[], bool]) -> None:
    while not check():
        await trio.sleep(0.01)


def settled(listener: InbandListener) -> bool:
    """Every accepted report has its final label (relabels done or skipped)."""
    s = listener.statistics()
    return sum(s.trust.values()) == s.accepted


async def stored_trust(
    store: Store, report_id: str, listener: InbandListener | None = None
) -> str | None:
    """The stored label, once the report is stored and (given ``listener``) its relabel done:
    reports are stored at once with the trust book's label and relabelled after DNS answers."""

    async def get() -> str | None:
        row = await trio.to_thread.run_sync(store.get_report, report_id)
        return None if row is None else (row.trust or "")

    while (trust := await get()) is None:
        await trio.sleep(0.02)
    if listener is not None:
        await wait_until(lambda: settled(listener))
        trust = await get()
    return trust


async def start_node(nursery: trio.Nursery, s: Settings, store: Store) -> NodeService:
    node = NodeService(NODE, s, store, listen=["127.0.0.1:0"], inband_listen="127.0.0.1:0")
    await nursery.start(node.run)
    assert node.inband_bound is not None
    return node


async def test_published_key_is_dns_unpublished_is_unknown(
    knot: KnotServer, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, settings((knot.address,)), store)
            assert node.inband_bound is not None
            to = node.inband_bound
            by_x = await send(signed(X), to)
            assert await stored_trust(store, by_x, node.inband_listener) == "dns"
            # another key from the same address: the record there vouches only for X
            by_y = await send(signed(Y), to)
            assert await stored_trust(store, by_y, node.inband_listener) == "unknown"
            # X's key from an address whose reverse zone publishes nothing
            x_elsewhere = await send(signed(X), to, source="127.0.0.2")
            assert await stored_trust(store, x_elsewhere, node.inband_listener) == "unknown"
            stats = node.statistics()
            assert stats.inband_listener is not None
            assert stats.inband_listener.trust == {"dns": 1, "unknown": 2}
            assert stats.dns is not None and stats.dns.answers >= 1
            node.stop()
    # overflowd-query reports shows the label, in --json and in the table
    assert query.main(["reports", "--json", "--db", db_url]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["trust"] for r in rows) == ["dns", "unknown", "unknown"]
    assert query.main(["reports", "--db", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "TRUST" in out[0].split()
    assert sum(" dns " in line for line in out[1:]) == 1


async def test_new_key_for_pinned_observer_raises_the_event(
    knot: KnotServer,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pin = "edge.example.net=" + base64.b64encode(P1.public_key).decode()
    caplog.set_level(logging.WARNING, logger="overflowd.services.node")
    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, settings((knot.address,), pinned=(pin,)), store)
            assert node.inband_bound is not None
            to = node.inband_bound
            first = await send(signed(P1, PINNED_CONTACTS), to, source="127.0.0.2")
            assert await stored_trust(store, first, node.inband_listener) == "pinned"
            assert node.statistics().registry_events == {}
            # the same operator (same contacts) with a key nobody vouches for
            second = await send(signed(P2, PINNED_CONTACTS), to, source="127.0.0.2")
            assert await stored_trust(store, second, node.inband_listener) == "unknown"
            # the pinned key now gives other contacts
            third = await send(signed(P1, ("mailto:new@edge.example.net",)), to, "127.0.0.2")
            assert await stored_trust(store, third, node.inband_listener) == "pinned"
            stats = node.statistics()
            assert stats.registry_events == {"new_key": 1, "contacts_changed": 1}
            assert stats.registry_events_unstored == 0
            families = {m.name: m for m in node_metrics(stats)}
            samples = {
                (s.name, s.labels["kind"]): s.value
                for s in families["overflowd_registry_events"].samples
            }
            assert samples[("overflowd_registry_events_total", "new_key")] == 1
            assert samples[("overflowd_registry_events_total", "contacts_changed")] == 1
            events = await trio.to_thread.run_sync(lambda: list_events(store))
            node.stop()
    assert [e.kind for e in events] == ["contacts_changed", "new_key"]
    new_key = events[1]
    assert new_key.key == P2.public_key and new_key.pinned
    assert new_key.old_contacts == new_key.new_contacts == PINNED_CONTACTS
    assert new_key.sender == "127.0.0.2"
    assert rpt.key_fingerprint(P1.public_key) in (new_key.detail or "")
    # the log line an operator sees
    lines = [r.getMessage() for r in caplog.records if "registry.event" in r.getMessage()]
    fp2 = rpt.key_fingerprint(P2.public_key)
    assert any(f"kind=new_key key={fp2} pinned=True" in line for line in lines), lines
    assert any("kind=contacts_changed" in line for line in lines), lines
    # and overflowd-query events
    assert query.main(["events", "--json", "--db", db_url]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["kind"] for e in shown] == ["contacts_changed", "new_key"]
    assert shown[1]["fingerprint"] == fp2 and shown[1]["pinned"] is True
    assert shown[0]["old_contacts"] == list(PINNED_CONTACTS)
    assert shown[0]["new_contacts"] == ["mailto:new@edge.example.net"]
    assert query.main(["events", "--db", db_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["AT", "KIND", "KEY", "PINNED"]
    assert any(fp2 in line and "new_key" in line for line in table[1:])


async def test_dead_resolver_costs_no_report(db_url: str) -> None:
    """A resolver that never answers: the report is stored at once, and stays ``unknown``
    after the relabel's one timeout."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{blackhole.getsockname()[1]}"
    try:
        with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                node = await start_node(nursery, settings((address,)), store)
                assert node.inband_bound is not None
                started = trio.current_time()
                first = await send(signed(X), node.inband_bound)
                assert await stored_trust(store, first) == "unknown"  # stored, before DNS
                assert trio.current_time() - started < 0.9  # the question's timeout is 1 s
                assert await stored_trust(store, first, node.inband_listener) == "unknown"
                assert trio.current_time() - started < 5.0
                # the failure is cached: the next report from there waits for no timeout
                started = trio.current_time()
                second = await send(signed(X), node.inband_bound)
                assert await stored_trust(store, second, node.inband_listener) == "unknown"
                assert trio.current_time() - started < 0.9
                stats = node.statistics()
                assert stats.dns is not None and stats.dns.timeouts == 1
                node.stop()
    finally:
        blackhole.close()


async def test_slow_label_never_blocks_receiving(db_url: str) -> None:
    """Labellers stuck on DNS: the receive loop goes on counting, and drops on a full queue."""
    release = trio.Event()

    async def stuck(report: rpt.SignedReport, sender: str) -> str:
        await release.wait()
        return "dns"

    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener = InbandListener(
                InbandSettings(queue_reports=4),
                store,
                listen=("127.0.0.1", 0),
                label=stuck,
                label_workers=2,
            )
            to = await nursery.start(listener.run)
            for _ in range(20):
                await send(signed(X), to)
            await wait_until(lambda: listener.statistics().datagrams == 20)
            stats = listener.statistics()
            # at most the queue plus one report in each labeller's hands
            assert stats.accepted + stats.dropped["queue_full"] == 20
            assert 4 <= stats.accepted <= 6
            assert stats.stored == 0
            release.set()
            await wait_until(lambda: listener.statistics().stored == stats.accepted)
            assert listener.statistics().trust == {"dns": stats.accepted}
            listener.stop()


async def test_label_timeout_keeps_the_receive_time_label(db_url: str) -> None:
    async def forever(report: rpt.SignedReport, sender: str) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener = InbandListener(
                InbandSettings(),
                store,
                listen=("127.0.0.1", 0),
                trust_of=lambda key: "pinned",
                label=forever,
                label_timeout_s=0.2,
            )
            to = await nursery.start(listener.run)
            rid = await send(signed(X), to)
            assert await stored_trust(store, rid) == "pinned"
            assert listener.statistics().label_timeouts == 1
            listener.stop()


async def test_asked_boost_and_webhook_url_come_from_dns(knot: KnotServer, db_url: str) -> None:
    """Hints are looked up in the background for flow ends we may notify; the sampler and the
    webhook plan read them without waiting. Nothing is delivered here (the worker is not run)."""
    s = Settings(
        registry=RegistrySettings(nameservers=(knot.address,), timeout_s=1.0),
        inband=InbandSettings(listen="127.0.0.1:0", allowed_prefixes=("127.0.0.0/8",)),
    )
    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        node = NodeService(NODE, s, store, listen=["127.0.0.1:0"], inband_listen="127.0.0.1:0")
        assert node.hints is not None and node.webhook is not None
        # the samplers keep their fast path until some address asks for a boost
        assert node.sampler.policy.asked_boost is None
        assert node.batch_sampler.policy.asked_boost is None
        assert node._asked_policy is not None
        asked = node._asked_policy.asked_boost
        assert asked is not None
        wanted = NodeIdentity(seed=b"\x36" * 32).sign_report(
            make_payload("127.0.0.4", "127.0.0.3", time_ms=int(time.time() * 1000))
        )
        outside = NodeIdentity(seed=b"\x36" * 32).sign_report(
            make_payload("192.0.2.1", "198.51.100.3", time_ms=int(time.time() * 1000))
        )
        dst = wanted.payload.flow.dst
        # before the first lookup: no asked boost, no DNS webhook (documented)
        assert asked(dst) is None
        assert [p.url for p in node._webhook_plan(wanted, trio.current_time(), 0)] == []
        async with trio.open_nursery() as nursery:
            await nursery.start(node.hints.run)
            node._warm(wanted)
            node._warm(outside)  # outside the confinement: never asked
            hints = node.hints
            await wait_until(lambda: hints.statistics().lookups == 2)
            assert asked(dst) == 50.0
            assert asked(wanted.payload.flow.src) is None
            node._use_asked_boost()
            assert node.sampler.policy.asked_boost is asked
            assert node.batch_sampler.policy.asked_boost is asked
            assert node.hints.statistics().boosts == 1
            row = make_row(
                wanted.payload.flow.src, dst, 40000, 53, 17, 10, 5000, 0, 1, 0, 0, None, None,
                "exporter", 0, "ipfix", 1, "exporter",
            )  # fmt: skip
            boosted, _, _ = node.sampler.policy.evaluate(row)
            plain, _, _ = dataclasses.replace(node.sampler.policy, asked_boost=None).evaluate(row)
            assert boosted == pytest.approx(50 * plain)
            # 127.0.0.4's URL points at an internal address: refused like a static target would be
            assert [p.url for p in node._webhook_plan(wanted, trio.current_time(), 0)] == [HOOK]
            assert node.statistics().webhooks_from_dns == 1
            assert node.webhook_budget.statistics().dropped["ssrf"] == 1  # 127.0.0.4's, counted
            # the same flow again: the budget's de-duplication holds it back
            assert [p.url for p in node._webhook_plan(wanted, trio.current_time(), 0)] == []
            assert node.webhook_budget.statistics().dropped["duplicate"] == 1
            assert node.hints.statistics().warmed == 2
            nursery.cancel_scope.cancel()


async def test_observers_in_the_store_survive_a_restart(knot: KnotServer, db_url: str) -> None:
    """The trust book is seeded from the store: a new key for an observer known from before
    the restart still raises the event."""
    pin = base64.b64encode(P1.public_key).decode()
    with Store.open(db_url) as store, trio.fail_after(TIMEOUT_S):
        old = P1.sign_report(
            make_payload(contacts=PINNED_CONTACTS, time_ms=int(time.time() * 1000) - 60_000)
        )
        store.add_report(old, received_ms=int(time.time() * 1000) - 60_000, via="udp")
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, settings((knot.address,), pinned=(pin,)), store)
            assert node.inband_bound is not None
            rid = await send(signed(P2, PINNED_CONTACTS), node.inband_bound, "127.0.0.2")
            assert await stored_trust(store, rid, node.inband_listener) == "unknown"
            assert node.statistics().registry_events == {"new_key": 1}
            node.stop()
        events = list_events(store)
    assert len(events) == 1 and events[0].key == P2.public_key and events[0].pinned


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_trust_column_and_events_on_both_backends(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'x.sqlite'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("postgres_db_url"))
    )
    with Store.open(url) as store:
        a, b = (by.sign_report(make_payload()) for by in (X, Y))
        assert store.add_reports([(a, 1, "udp"), (b, 2, "udp")], trust={a.report_id: "dns"}) == 2
        assert store.get_report(a.report_id).trust == "dns"  # type: ignore[union-attr]
        assert store.get_report(b.report_id).trust is None  # type: ignore[union-attr]
        # a report stored before keeps its label
        store.add_reports([(a, 3, "webhook")], trust={a.report_id: "unknown"})
        assert store.get_report(a.report_id).trust == "dns"  # type: ignore[union-attr]
        add_events(
            store,
            [
                ObserverEvent("new_key", Y.public_key, ("mailto:a@x",), ("mailto:a@x",), True, 10),
                ObserverEvent("contacts_changed", X.public_key, (), ("mailto:b@x",), False, 20),
            ],
        )
        events = list_events(store)
        assert [(e.kind, e.pinned, e.at_ms) for e in events] == [
            ("contacts_changed", False, 20),
            ("new_key", True, 10),
        ]
        assert list_events(store, since_ms=15) == events[:1]
        assert len(list_events(store, limit=1)) == 1
        with pytest.raises(ValueError):
            add_events(store, [ObserverEvent("other", X.public_key, (), (), False, 1)])

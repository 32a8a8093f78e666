"""The report store, against both backends it supports: SQLite in tmp_path and a real
PostgreSQL server (tests/support/postgres.py), with the same assertions for both.
"""

from __future__ import annotations

import ipaddress
import secrets
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import StoreError
from overflowd.identity import NodeIdentity, verify_report
from overflowd.store import (
    ObserverRow,
    Store,
    StoredReport,
    address_to_key,
    default_url,
    key_to_address,
    network_range,
)
from overflowd.store.models import BIGINT_MAX, Base
from overflowd.store.repository import SCHEMA_HEAD
from tests.support.postgres import free_port

ALICE = NodeIdentity.generate()
BOB = NodeIdentity.generate()
T0 = 1_700_000_000_000


def signed(
    src: str = "192.0.2.1",
    dst: str = "198.51.100.2",
    *,
    by: NodeIdentity = ALICE,
    contacts: tuple[str, ...] = ("mailto:abuse@example.net",),
    point: str = "edge-1",
    time_ms: int = T0,
    packets: int = 1000,
    first_ms: int | None = None,
) -> rpt.SignedReport:
    payload = rpt.Payload(
        kind="flow-seen",
        nonce=secrets.token_bytes(rpt.NONCE_BYTES),
        time=time_ms,
        observer=rpt.Observer(contacts=contacts, point=point),
        flow=rpt.Flow(
            src=ipaddress.ip_address(src),
            dst=ipaddress.ip_address(dst),
            sport=53,
            dport=40000,
            proto=17,
            packets=packets,
            bytes=min(packets * 512, rpt.U64),
            first=time_ms - 10_000 if first_ms is None else first_ms,
            last=time_ms - 1,
            tcp_flags=0x12,
            tos=0x10,
            src_as=64500,
        ),
        sampling=rpt.Sampling(probability=0.001, format="netflow-v5", interval=100),
    )
    return by.sign_report(payload)


def ids(rows: list[StoredReport]) -> set[str]:
    return {r.report_id for r in rows}


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# ---------------------------------------------------------------------------------------------
# Storing and reading back


def test_add_then_get_returns_verbatim_bytes_that_still_verify(store: Store) -> None:
    report = signed()
    assert store.add_report(report, received_ms=T0 + 5, via="udp") is True

    got = store.get_report(report.report_id)
    assert got is not None
    assert got.cose == report.cose
    assert verify_report(got.cose).report_id == report.report_id
    assert got.signed_report() == report

    fl = report.payload.flow
    assert (got.received_ms, got.via, got.observer_key) == (T0 + 5, "udp", ALICE.public_key)
    assert (got.kind, got.report_time_ms) == ("flow-seen", T0)
    assert (got.src, got.dst) == (fl.src, fl.dst)
    assert isinstance(got.src, ipaddress.IPv4Address)
    assert (got.sport, got.dport, got.proto) == (53, 40000, 17)
    assert (got.packets, got.bytes, got.first_ms, got.last_ms) == (
        fl.packets,
        fl.bytes,
        fl.first,
        fl.last,
    )
    assert (got.tcp_flags, got.tos, got.src_as, got.dst_as) == (0x12, 0x10, 64500, None)
    assert (got.probability, got.sampling_format) == (0.001, "netflow-v5")
    assert (got.sampling_interval, got.sampling_provenance) == (100, "assumed")
    assert store.get_report(report.report_id.upper()) == got
    assert store.get_report("0" * 64) is None


def test_u64_counters_saturate_in_columns_but_the_signed_bytes_keep_them(store: Store) -> None:
    report = signed(packets=rpt.U64, first_ms=rpt.U64 - 5, time_ms=rpt.U64)
    store.add_report(report, received_ms=T0, via="import")
    got = store.get_report(report.report_id)
    assert got is not None
    assert got.packets == got.bytes == got.first_ms == got.report_time_ms == BIGINT_MAX
    flow = got.signed_report().payload.flow
    assert flow.packets == flow.bytes == rpt.U64
    assert flow.first == rpt.U64 - 5


def test_duplicate_add_returns_false_and_keeps_the_first_arrival(store: Store) -> None:
    report = signed()
    assert store.add_report(report, received_ms=T0, via="udp")
    assert not store.add_report(report, received_ms=T0 + 99, via="gossip")
    assert store.count_reports() == 1
    got = store.get_report(report.report_id)
    assert got is not None
    assert (got.received_ms, got.via) == (T0, "udp")
    stats = store.statistics()
    assert (stats.reports_new, stats.reports_duplicate, stats.errors) == (1, 1, 0)


def test_add_reports_is_one_batch_counting_only_new_reports(store: Store) -> None:
    old = signed("192.0.2.1")
    store.add_report(old, received_ms=T0, via="local")
    a, b, c = signed("192.0.2.2"), signed("2001:db8::1", "2001:db8::2"), signed("192.0.2.3")
    batch = [(a, T0 + 1, "udp"), (old, T0 + 2, "udp"), (b, T0 + 3, "webhook"), (a, T0 + 4, "udp")]
    batch.append((c, T0 + 5, "gossip"))
    assert store.add_reports(batch) == 3
    assert store.count_reports() == 4
    assert store.add_reports(batch) == 0
    assert store.add_reports([]) == 0
    assert store.count_reports() == 4
    got = store.get_report(a.report_id)
    assert got is not None and got.received_ms == T0 + 1  # the first entry of a repeat wins


def test_unknown_via_is_a_caller_bug(store: Store) -> None:
    with pytest.raises(ValueError, match="via"):
        store.add_report(signed(), received_ms=T0, via="carrier-pigeon")
    assert store.count_reports() == 0


# ---------------------------------------------------------------------------------------------
# Prefix queries


@pytest.fixture
def mixed(store: Store) -> dict[str, rpt.SignedReport]:
    """IPv4 and IPv6 reports, including a genuine IPv6 report about an IPv4-mapped address."""
    v4 = "198.51.100.9"
    v6 = "2001:db8:ffff::9"
    reports = {
        "192.0.2.0": signed("192.0.2.0", v4),
        "192.0.2.1": signed("192.0.2.1", v4),
        "192.0.2.255": signed("192.0.2.255", v4),
        "192.0.3.0": signed("192.0.3.0", v4),
        "10.0.0.1": signed("10.0.0.1", v4),
        "0.0.0.0": signed("0.0.0.0", v4),
        "255.255.255.255": signed("255.255.255.255", v4),
        "2001:db8::1": signed("2001:db8::1", v6),
        "2001:db8::ffff": signed("2001:db8::ffff", v6),
        "2001:db8:1::1": signed("2001:db8:1::1", v6),
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": signed(
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", v6
        ),
        "2001:db9::": signed("2001:db9::", v6),
        "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff": signed(
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", v6
        ),
        "::ffff:192.0.2.1": signed("::ffff:192.0.2.1", v6),
        "::": signed("::", v6),
    }
    store.add_reports([(r, T0 + i, "udp") for i, r in enumerate(reports.values())])
    return reports


def expect(mixed: dict[str, rpt.SignedReport], *names: str) -> set[str]:
    return {mixed[n].report_id for n in names}


V4_ALL = (
    *("192.0.2.0", "192.0.2.1", "192.0.2.255", "192.0.3.0"),
    *("10.0.0.1", "0.0.0.0", "255.255.255.255"),
)
V6_IN_32 = (
    "2001:db8::1",
    "2001:db8::ffff",
    "2001:db8:1::1",
    "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
)
V6_ALL = (
    *V6_IN_32,
    *("2001:db9::", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:192.0.2.1", "::"),
)


@pytest.mark.parametrize(
    ("prefix", "names"),
    [
        ("192.0.2.0/24", ("192.0.2.0", "192.0.2.1", "192.0.2.255")),
        ("192.0.2.1/32", ("192.0.2.1",)),
        ("192.0.2.2/32", ()),
        ("192.0.0.0/16", ("192.0.2.0", "192.0.2.1", "192.0.2.255", "192.0.3.0")),
        ("0.0.0.0/0", V4_ALL),
        ("2001:db8::/32", V6_IN_32),
        ("2001:db8::/48", ("2001:db8::1", "2001:db8::ffff")),
        ("2001:db8::1/128", ("2001:db8::1",)),
        ("2001:db8::2/128", ()),
        ("::/0", V6_ALL),
        # an IPv6 prefix over the mapped range finds IPv6 reports only, never IPv4 ones
        ("::ffff:0:0/96", ("::ffff:192.0.2.1",)),
        ("::/128", ("::",)),
    ],
)
def test_source_prefix_returns_exactly_its_reports(
    store: Store, mixed: dict[str, rpt.SignedReport], prefix: str, names: tuple[str, ...]
) -> None:
    rows = store.query_reports(src=net(prefix))
    assert ids(rows) == expect(mixed, *names)
    assert len(rows) == len(names)
    assert all(r.src.version == net(prefix).version for r in rows)


def test_addresses_come_back_in_their_own_family(
    store: Store, mixed: dict[str, rpt.SignedReport]
) -> None:
    got = store.get_report(mixed["::ffff:192.0.2.1"].report_id)
    assert got is not None
    assert got.src == ipaddress.IPv6Address("::ffff:192.0.2.1")
    got = store.get_report(mixed["192.0.2.1"].report_id)
    assert got is not None
    assert got.src == ipaddress.IPv4Address("192.0.2.1")


def test_destination_prefix_and_both_together(
    store: Store, mixed: dict[str, rpt.SignedReport]
) -> None:
    assert ids(store.query_reports(dst=net("198.51.100.0/24"))) == expect(mixed, *V4_ALL)
    assert ids(store.query_reports(dst=net("2001:db8:ffff::/48"))) == expect(mixed, *V6_ALL)
    both = store.query_reports(src=net("192.0.2.0/31"), dst=net("198.51.100.9/32"))
    assert ids(both) == expect(mixed, "192.0.2.0", "192.0.2.1")
    assert store.query_reports(src=net("0.0.0.0/0"), dst=net("::/0")) == []
    assert store.query_reports(dst=net("198.51.101.0/24")) == []


def test_since_filter_is_inclusive(store: Store) -> None:
    r = [signed(f"192.0.2.{i}") for i in range(3)]
    store.add_reports([(r[0], 100, "udp"), (r[1], 200, "udp"), (r[2], 300, "udp")])
    assert ids(store.query_reports(since_ms=200)) == {r[1].report_id, r[2].report_id}
    assert ids(store.query_reports(since_ms=301)) == set()
    assert len(store.query_reports(since_ms=0)) == 3
    assert ids(store.query_reports(src=net("192.0.2.2/32"), since_ms=200)) == {r[2].report_id}


def test_newest_received_first_and_limit(store: Store) -> None:
    received = [500, 100, 400, 300, 200]
    reports = [signed(f"192.0.2.{i}") for i in range(len(received))]
    for report, at in zip(reports, received, strict=True):
        store.add_report(report, received_ms=at, via="udp")
    rows = store.query_reports()
    assert [r.received_ms for r in rows] == [500, 400, 300, 200, 100]
    assert [r.received_ms for r in store.query_reports(limit=2)] == [500, 400]
    assert store.query_reports(limit=0) == []
    assert [r.received_ms for r in store.query_reports(limit=99)] == [500, 400, 300, 200, 100]
    with pytest.raises(ValueError):
        store.query_reports(limit=-1)


# ---------------------------------------------------------------------------------------------
# Observers


def observer(store: Store, identity: NodeIdentity) -> ObserverRow:
    (row,) = [o for o in store.observers() if o.key == identity.public_key]
    return row


def test_observer_row_follows_the_latest_received_report(store: Store) -> None:
    assert store.observers() == []
    store.add_report(signed(contacts=("mailto:a@x",), point="p1"), received_ms=1000, via="udp")
    row = observer(store, ALICE)
    assert row.fingerprint == ALICE.fingerprint
    assert (row.contacts, row.point) == (("mailto:a@x",), "p1")
    assert (row.first_seen_ms, row.last_seen_ms, row.reports) == (1000, 1000, 1)

    later = signed(contacts=("mailto:b@x", "https://x/hook"), point="p2")
    store.add_report(later, received_ms=2000, via="udp")
    row = observer(store, ALICE)
    assert (row.contacts, row.point) == (("mailto:b@x", "https://x/hook"), "p2")
    assert (row.first_seen_ms, row.last_seen_ms, row.reports) == (1000, 2000, 2)

    # an old report imported now moves first_seen back but does not overwrite contacts
    store.add_report(signed(contacts=("mailto:old@x",), point="p0"), received_ms=500, via="import")
    row = observer(store, ALICE)
    assert (row.contacts, row.point) == (("mailto:b@x", "https://x/hook"), "p2")
    assert (row.first_seen_ms, row.last_seen_ms, row.reports) == (500, 2000, 3)

    # a duplicate is not a new report
    store.add_report(later, received_ms=3000, via="gossip")
    assert observer(store, ALICE).reports == 3


def test_observers_in_one_batch_and_ordered_by_last_seen(store: Store) -> None:
    batch = [
        (signed(by=ALICE, contacts=("mailto:a1@x",)), 10, "udp"),
        (signed(by=BOB, contacts=("mailto:b@x",)), 15, "udp"),
        (signed(by=ALICE, contacts=("mailto:a3@x",)), 30, "udp"),
        (signed(by=ALICE, contacts=("mailto:a2@x",)), 20, "udp"),
    ]
    assert store.add_reports(batch) == 4
    rows = store.observers()
    assert [o.key for o in rows] == [ALICE.public_key, BOB.public_key]
    alice, bob = rows
    assert (alice.contacts, alice.first_seen_ms, alice.last_seen_ms, alice.reports) == (
        ("mailto:a3@x",),
        10,
        30,
        3,
    )
    assert (bob.contacts, bob.first_seen_ms, bob.last_seen_ms, bob.reports) == (
        ("mailto:b@x",),
        15,
        15,
        1,
    )
    store.add_reports([(signed(by=BOB, contacts=()), 40, "udp")])
    assert [o.key for o in store.observers()] == [BOB.public_key, ALICE.public_key]
    assert observer(store, BOB).contacts == ()


def test_concurrent_adds_of_the_same_reports_store_each_once(store: Store) -> None:
    reports = [signed(f"192.0.2.{i}") for i in range(20)]
    threads = 6
    barrier = threading.Barrier(threads)
    results: list[list[bool]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            for report in reports:
                results[n].append(store.add_report(report, received_ms=T0 + n, via="gossip"))
        except BaseException as exc:  # collected and re-raised by the test below
            failures.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not failures
    assert sum(map(sum, results)) == len(reports)
    for i in range(len(reports)):
        assert sum(r[i] for r in results) == 1
    assert store.count_reports() == len(reports)
    assert observer(store, ALICE).reports == len(reports)


# ---------------------------------------------------------------------------------------------
# Opening, migrations, errors


def test_open_twice_is_idempotent_and_at_migration_head(db_url: str) -> None:
    report = signed()
    with Store.open(db_url) as s:
        s.add_report(report, received_ms=T0, via="local")
    with Store.open(db_url) as s:
        assert s.count_reports() == 1
        assert s.get_report(report.report_id) is not None
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                (SCHEMA_HEAD,)
            ]
            # the models describe exactly what the migrations built
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_a_schema_from_a_newer_release_is_a_store_error(db_url: str) -> None:
    Store.open(db_url).close()
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="9999"):
        Store.open(db_url)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    url = default_url(tmp_path)
    assert url == f"sqlite:///{tmp_path / 'overflowd.db'}"
    with Store.open(url) as s:
        assert s.backend == "sqlite"
        engine = s._engine  # the store's own connections carry the pragmas
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


def test_in_memory_sqlite_works_across_threads() -> None:
    with Store.open("sqlite://") as s:
        report = signed()
        thread = threading.Thread(
            target=s.add_report, args=(report,), kwargs={"received_ms": 1, "via": "local"}
        )
        thread.start()
        thread.join(timeout=10)
        assert s.count_reports() == 1


def test_unreachable_postgres_is_a_store_error_naming_the_database() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://overflowd:s3cret@127.0.0.1:{port}/reports"
    with pytest.raises(StoreError) as info:
        Store.open(url)
    message = str(info.value)
    assert f"127.0.0.1:{port}/reports" in message
    assert "s3cret" not in message
    assert "***" in message
    assert "\n" not in message


def test_bare_postgresql_url_means_psycopg() -> None:
    # psycopg2 is not installed; a bare URL must still reach the server (and fail to connect)
    port = free_port()
    with pytest.raises(StoreError, match=r"connect|refused"):
        Store.open(f"postgresql://overflowd@127.0.0.1:{port}/reports")


def test_sqlite_path_under_a_file_is_a_store_error(tmp_path: Path) -> None:
    # The tests run as root, where permission bits do not stop us; a path that cannot be a
    # directory does.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "home" / "overflowd.db"
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{path}")
    assert str(path) in str(info.value)


def test_sqlite_path_that_is_a_directory_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "overflowd.db"
    path.mkdir()
    with pytest.raises(StoreError) as info:
        Store.open(f"sqlite:///{path}")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["mysql://u:pw@localhost/db", "not a url", "postgresql+nosuchdriver://h/db"]
)
def test_unusable_urls_are_store_errors(url: str) -> None:
    with pytest.raises(StoreError) as info:
        Store.open(url)
    assert "pw" not in str(info.value)


def test_failures_after_open_are_store_errors(db_url: str) -> None:
    with Store.open(db_url) as s:
        engine = sa.create_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE reports"))
        finally:
            engine.dispose()
        with pytest.raises(StoreError, match="counting reports"):
            s.count_reports()
        with pytest.raises(StoreError, match="storing reports"):
            s.add_report(signed(), received_ms=T0, via="udp")
        assert s.statistics().errors == 2


# ---------------------------------------------------------------------------------------------
# Address keys


def test_address_key_layout() -> None:
    v4 = ipaddress.IPv4Address("192.0.2.1")
    assert address_to_key(v4) == bytes(10) + b"\xff\xff" + v4.packed
    assert key_to_address(address_to_key(v4)) == v4
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert address_to_key(v6) == v6.packed
    assert network_range(net("192.0.2.0/24")) == (
        address_to_key(ipaddress.IPv4Address("192.0.2.0")),
        address_to_key(ipaddress.IPv4Address("192.0.2.255")),
    )
    assert network_range(net("0.0.0.0/0")) == (
        ipaddress.IPv6Address("::ffff:0:0").packed,
        ipaddress.IPv6Address("::ffff:ffff:ffff").packed,
    )
    with pytest.raises(ValueError):
        key_to_address(b"\x00" * 4)
    with pytest.raises(TypeError):
        network_range(v4)  # type: ignore[arg-type]


@given(st.ip_addresses())
def test_address_key_round_trip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    key = address_to_key(addr)
    assert len(key) == 16
    back = key_to_address(key)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        assert back == addr.ipv4_mapped  # the one documented ambiguity, resolved to IPv4
    else:
        assert back == addr
    assert address_to_key(back) == key


@given(st.ip_addresses(v=4), st.ip_addresses(v=4))
def test_ipv4_key_order_is_address_order(
    a: ipaddress.IPv4Address, b: ipaddress.IPv4Address
) -> None:
    assert (address_to_key(a) < address_to_key(b)) == (a < b)


@given(st.ip_addresses(v=6), st.ip_addresses(v=6))
def test_ipv6_key_order_is_address_order(
    a: ipaddress.IPv6Address, b: ipaddress.IPv6Address
) -> None:
    assert (address_to_key(a) < address_to_key(b)) == (a < b)


@given(st.ip_addresses(), st.data())
def test_range_holds_exactly_the_prefix(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, data: st.DataObject
) -> None:
    length = data.draw(st.integers(0, addr.max_prefixlen))
    prefix = ipaddress.ip_network(f"{addr}/{length}", strict=False)
    probe = data.draw(st.ip_addresses(v=addr.version))
    lo, hi = network_range(prefix)
    assert lo <= address_to_key(addr) <= hi
    assert (lo <= address_to_key(probe) <= hi) == (probe in prefix)


def test_schema_head_constant_is_alembics_head() -> None:
    """Store.open skips Alembic when the database is at SCHEMA_HEAD; it must be the real head."""
    import alembic.config
    import alembic.script

    from overflowd.store import repository

    config = alembic.config.Config()
    config.set_main_option("script_location", str(repository._MIGRATIONS))
    config.set_main_option("path_separator", "os")
    head = alembic.script.ScriptDirectory.from_config(config).get_current_head()
    assert head == repository.SCHEMA_HEAD


@pytest.mark.parametrize("name", ["a?b", "50%", "x#y", "%3F"])
def test_a_home_with_url_characters_opens_its_own_file(tmp_path: Path, name: str) -> None:
    home = tmp_path / name
    home.mkdir()
    with Store.open(default_url(home)) as s:
        s.add_report(signed(), received_ms=1, via="local")
    assert (home / "overflowd.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_home_under_tilde_is_written_and_read_in_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with Store.open("sqlite:///~/node/overflowd.db") as s:
        s.add_report(signed(), received_ms=1, via="local")
    assert (tmp_path / "node" / "overflowd.db").is_file()
    assert not (tmp_path / "~").exists()
    with Store.open("sqlite:///~/node/overflowd.db", create=False) as s:
        assert s.count_reports() == 1

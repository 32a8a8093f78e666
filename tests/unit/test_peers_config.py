"""``[[peers]]`` and ``[peering]``: strict parsing into PeerSettings/PeeringSettings, and the
durable peer state both peer services write (overflowd.store.peers)."""

from __future__ import annotations

import base64

import pytest

from overflowd.config import DEFAULT_CONFIG_TEXT, Settings, parse_settings
from overflowd.errors import ConfigError
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings, peer_channel
from overflowd.report import key_fingerprint
from overflowd.store import Store
from overflowd.store import peers as peer_store
from overflowd.store.outbox import enqueue

KEY_A = NodeIdentity(seed=bytes(range(32))).public_key
KEY_B = NodeIdentity(seed=bytes(range(1, 33))).public_key


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def peer_toml(
    name: str = "a", url: str = "http://127.0.0.1:9591", key: bytes = KEY_A, **extra: str
) -> str:
    lines = ["[[peers]]", f'name = "{name}"', f'url = "{url}"', f'key = "{b64(key)}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_defaults_have_no_peers_and_the_example_only_comments_them() -> None:
    assert Settings().peers == ()
    assert Settings().peering == PeeringSettings()
    assert "\n# [[peers]]\n" in DEFAULT_CONFIG_TEXT and "\n[[peers]]" not in DEFAULT_CONFIG_TEXT
    # every [peering] default is shown in the example, with its value
    for name, value in vars(PeeringSettings()).items():
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # TOML's
        assert f"# {name} = {shown}".replace("'", '"') in DEFAULT_CONFIG_TEXT, name


def test_a_peer_parses_with_its_defaults_and_a_normalised_url() -> None:
    settings = parse_settings(
        peer_toml()
        + peer_toml("b", "https://peer.example/api/", KEY_B, push="false", trust='"dns"')
    )
    a, b = settings.peers
    assert isinstance(a, PeerSettings)
    assert (a.name, a.url, a.key, a.trust, a.push, a.pull) == (
        "a",
        "http://127.0.0.1:9591/",
        KEY_A,
        "pinned",
        True,
        True,
    )
    assert a.pull_interval_s == 60.0 and a.in_reports_per_s == 100.0
    assert a.endpoint("v1/reports") == "http://127.0.0.1:9591/v1/reports"
    assert a.channel == peer_channel(KEY_A) == "peer:" + key_fingerprint(KEY_A)
    assert (b.url, b.push, b.trust) == ("https://peer.example/api/", False, "dns")
    assert b.endpoint("/v1/inbox") == "https://peer.example/api/v1/inbox"
    assert "key=" not in repr(a)  # a public key, but 44 characters of noise in every log


def test_peering_section_parses_and_is_bounded() -> None:
    s = parse_settings("[peering]\nhop_limit = 2\npull_page_reports = 50\nmax_report_age_s = 60\n")
    assert (s.peering.hop_limit, s.peering.pull_page_reports, s.peering.max_report_age_s) == (
        2,
        50,
        60.0,
    )
    with pytest.raises(
        ConfigError, match=r"t\.toml:3: 'peering\.pull_page_reports' must be between 1 and 1000"
    ):
        parse_settings("[peering]\nhop_limit = 2\npull_page_reports = 5000\n", "t.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'peering\.hops'"):
        parse_settings("[peering]\nhops = 2\n")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (peer_toml(colour='"red"'), r"t\.toml:5: unknown key 'peers\.colour'"),
        (
            peer_toml(key=b"\x01" * 31),
            r"t\.toml:4: 'peers\.key' is 31 bytes; an Ed25519 public key is 32",
        ),
        (
            '[[peers]]\nname = "a"\nurl = "http://h/"\nkey = "not base64!"\n',
            r"t\.toml:4: 'peers\.key' is not base64",
        ),
        (peer_toml(url="ftp://h/"), r"t\.toml:3: 'peers\.url' has 'ftp://h/': expected http"),
        (peer_toml(url="http://h/?x=1"), r"'peers\.url' has .*no query"),
        (peer_toml(url="http://h:99999/"), r"'peers\.url' has .*not a URL"),
        (peer_toml(name="two words"), r"t\.toml:2: 'peers\.name' has 'two words'"),
        (
            peer_toml(trust='"high"'),
            r"t\.toml:5: 'peers\.trust' must be one of unknown, continuity, dns, pinned",
        ),
        (peer_toml(push='"yes"'), r"t\.toml:5: 'peers\.push' must be true or false"),
        (peer_toml(pull_interval_s="0.1"), r"'peers\.pull_interval_s' must be between 1 and 86400"),
        (peer_toml(in_reports_per_s="0"), r"'peers\.in_reports_per_s' must be positive"),
        (peer_toml(out_bytes_burst="1.5"), r"'peers\.out_bytes_burst' must be an integer"),
        (
            '[[peers]]\nname = "a"\nurl = "http://h/"\n',
            r"t\.toml:1: \[\[peers\]\] entry 1 needs key",
        ),
        ("peers = 3\n", r"'peers' must be an array of tables"),
        (
            peer_toml() + peer_toml(url="http://other/", key=KEY_B),
            r"t\.toml:6: 'peers\.name': peers 1 and 2 have the same name",
        ),
        (
            peer_toml() + peer_toml(name="b", url="http://other/"),
            r"t\.toml:8: 'peers\.key': peers 1 and 2 have the same key",
        ),
        (
            peer_toml() + peer_toml(name="b", key=KEY_B),
            r"'peers\.url': peers 1 and 2 have the same url",
        ),
    ],
)
def test_bad_peer_config_names_file_line_and_key(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(toml, "t.toml")


# -- the durable state --------------------------------------------------------------------


def test_peer_rows_cursors_and_counts(store: Store) -> None:
    row = peer_store.ensure_peer(store, KEY_A, name="a", url="http://a/", now_ms=1000)
    assert (row.pull_cursor, row.push_cursor, row.reports_in, row.learned) == (0, 0, 0, False)
    assert row.last_contact_ms is None and row.banned_until_ms is None
    # ensuring again keeps the cursors, follows a renamed peer
    peer_store.advance_pull_cursor(store, KEY_A, 40, now_ms=2000, reports_in=7, duplicates=2)
    again = peer_store.ensure_peer(store, KEY_A, name="a2", url="http://a2/", now_ms=3000)
    assert (again.name, again.url, again.pull_cursor, again.reports_in, again.duplicates) == (
        "a2",
        "http://a2/",
        40,
        7,
        2,
    )
    assert again.last_contact_ms == 2000 and again.created_ms == 1000
    # cursors never move back, but a reset does (the peer's store was reset: 409)
    peer_store.advance_pull_cursor(store, KEY_A, 10, now_ms=4000)
    peer_store.advance_push_cursor(store, KEY_A, 99, now_ms=4000, reports_out=5)
    peer_store.advance_push_cursor(store, KEY_A, 50, now_ms=4000)
    got = peer_store.get_peer(store, KEY_A)
    assert got is not None and (got.pull_cursor, got.push_cursor, got.reports_out) == (40, 99, 5)
    peer_store.reset_pull_cursor(store, KEY_A, reason="peer answered 409", now_ms=5000)
    got = peer_store.get_peer(store, KEY_A)
    assert got is not None and (got.pull_cursor, got.last_error, got.last_error_ms) == (
        0,
        "peer answered 409",
        5000,
    )
    peer_store.record_error(store, KEY_A, "connect\n refused " + "x" * 500, now_ms=6000)
    peer_store.record_contact(store, KEY_A, now_ms=7000)
    peer_store.add_counts(store, KEY_A, now_ms=7000, reports_in=1, reports_out=2, duplicates=3)
    got = peer_store.get_peer(store, KEY_A)
    assert got is not None
    assert got.last_error is not None and got.last_error.startswith("connect refused x")
    assert len(got.last_error) == 400 and got.last_contact_ms == 7000
    assert (got.reports_in, got.reports_out, got.duplicates) == (8, 7, 5)
    assert peer_store.get_peer(store, KEY_B) is None
    with pytest.raises(ValueError, match="cursor"):
        peer_store.advance_pull_cursor(store, KEY_A, -1, now_ms=0)


def test_learned_rows_list_after_configured_and_turn_configured(store: Store) -> None:
    peer_store.ensure_peer(store, KEY_B, name="zz", url="http://b/", now_ms=1, learned=True)
    peer_store.ensure_peer(store, KEY_A, name="zz-learned-later", url="http://a/", now_ms=1)
    assert [r.key for r in peer_store.list_peers(store)] == [KEY_A, KEY_B]
    row = peer_store.ensure_peer(store, KEY_B, name="b", url="http://b/", now_ms=2)
    assert not row.learned
    row = peer_store.ensure_peer(store, KEY_B, name="b", url="http://b/", now_ms=3, learned=True)
    assert not row.learned  # once configured, a record learned later does not demote it


def test_the_cursor_commits_with_the_page_it_covers(store: Store) -> None:
    """advance_pull_cursor_in runs inside add_new_reports: one transaction, or neither."""
    from tests.support.reports import make_payload

    peer_store.ensure_peer(store, KEY_A, name="a", url="http://a/", now_ms=1)
    ident = NodeIdentity(seed=bytes(range(2, 34)))
    reports = [ident.sign_report(make_payload(dst=f"192.0.2.{i}")) for i in range(3)]

    def boom(conn: object) -> None:
        peer_store.advance_pull_cursor_in(conn, KEY_A, 3, now_ms=2, reports_in=3)  # type: ignore[arg-type]
        raise RuntimeError("crash after the cursor, before the commit")

    with pytest.raises(RuntimeError):
        store.add_new_reports([(r, 1, "gossip") for r in reports], alongside=boom)
    got = peer_store.get_peer(store, KEY_A)
    assert got is not None and got.pull_cursor == 0 and store.count_reports() == 0
    new = store.add_new_reports(
        [(r, 1, "gossip") for r in reports],
        alongside=lambda conn: peer_store.advance_pull_cursor_in(
            conn, KEY_A, 3, now_ms=2, reports_in=3
        ),
    )
    got = peer_store.get_peer(store, KEY_A)
    assert len(new) == 3 and got is not None and (got.pull_cursor, got.reports_in) == (3, 3)


def test_outbox_depth_counts_pending_rows_per_url(store: Store) -> None:
    from tests.support.reports import make_payload

    ident = NodeIdentity(seed=bytes(range(3, 35)))
    reports = [ident.sign_report(make_payload(dst=f"198.51.100.{i}")) for i in range(3)]
    for r in reports:
        enqueue(store, r, ["http://a/v1/inbox"], now_ms=1)
    enqueue(store, reports[0], ["http://b/v1/inbox"], now_ms=1)
    assert peer_store.outbox_depth(
        store, ["http://a/v1/inbox", "http://b/v1/inbox", "http://c/"]
    ) == {
        "http://a/v1/inbox": 3,
        "http://b/v1/inbox": 1,
        "http://c/": 0,
    }


def test_every_pull_metric_family_is_documented_with_its_labels() -> None:
    """docs/daemon.md "What the metrics say" lists overflowd_peer_pull_* as it does the rest."""
    import re
    from pathlib import Path

    from overflowd.services.peer_pull import PeerPull, peer_pull_metrics

    peer = PeerSettings(name="a", url="http://a/", key=KEY_A)
    stats = PeerPull([peer], PeeringSettings(), None).statistics()  # type: ignore[arg-type]
    families = list(peer_pull_metrics(stats))
    assert len(families) == 8  # with the page round trip window and its count
    doc = Path(__file__).resolve().parents[2] / "docs" / "daemon.md"
    section = doc.read_text(encoding="utf-8").split("## What the metrics say", 1)[1]
    for m in families:
        name = m.name + ("_total" if m.type == "counter" else "")
        assert re.search(rf"`{name}[`{{]", section), f"{name} is not in {doc.name}"
        row = next(line for line in section.splitlines() if f"`{name}" in line)
        for label in {k for sample in m.samples for k in sample.labels}:
            assert f"`{label}" in row, f"{name}: label {label} is not in its row"
        for sample in m.samples:  # every reason and kind listed at zero, named in the row
            for value in sample.labels.values():
                if value != "a":
                    assert f"`{value}`" in row, f"{name}: {value} is not in its row"


@pytest.mark.parametrize(
    ("api_url", "listen", "expected"),
    [
        ("https://node.example/api", "127.0.0.1:9591", "https://node.example/api/"),
        ("", "192.0.2.1:9591", "http://192.0.2.1:9591/"),
        ("", "[2001:db8::1]:9591", "http://[2001:db8::1]:9591/"),
        ("", "0.0.0.0:9591", ""),  # every address: which one would a peer use?
        ("", "[::]:9591", ""),
        ("", "127.0.0.1:0", ""),  # the port is not known yet
        ("", "", ""),
    ],
)
def test_the_record_endpoint_is_configured_or_derived(
    api_url: str, listen: str, expected: str
) -> None:
    assert PeeringSettings(api_url=api_url).endpoint(listen) == expected


def test_a_bad_api_url_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"t\.toml:2: 'peering\.api_url' has 'ftp://x/'"):
        parse_settings('[peering]\napi_url = "ftp://x/"\n', "t.toml")
    with pytest.raises(ConfigError, match=r"'peering\.api_url' is longer than 512 bytes"):
        parse_settings(f'[peering]\napi_url = "http://{"x" * 600}/"\n', "t.toml")

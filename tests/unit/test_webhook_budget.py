"""The webhook plan's budgets (notify.WebhookBudget), apart from the in-band Budget.

Property: for any sequence of (URL, target, flow, time), the first attempts scheduled for one
URL about one /24 or /48 never exceed ``burst + rate × window`` in any window of scheduled
times, no deferral exceeds ``max_defer_s``, nothing is dropped but by a counted reason, and
the tables stay within their caps whatever evictions happen.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import notify
from overflowd.config import load_settings, parse_settings
from overflowd.errors import ConfigError
from overflowd.notify import FlowKey, WebhookBudget, WebhookSettings, prefix_of

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ip = ipaddress.ip_address
URLS = ["https://a.example/h", "https://b.example/h"]
TARGETS = [ip("192.0.2.1"), ip("192.0.2.77"), ip("198.51.100.1"), ip("2001:db8::1")]
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def key(port: int, target: ipaddress.IPv4Address | ipaddress.IPv6Address) -> FlowKey:
    return FlowKey(
        ip("203.0.113.5") if target.version == 4 else ip("2001:db8:9::5"), target, 17, 53, port
    )


def test_burst_goes_now_the_rest_is_deferred_never_refused() -> None:
    b = WebhookBudget(WebhookSettings(prefix_reports_per_s=2.0, prefix_reports_burst=10))
    t = TARGETS[0]
    waits = [b.plan(URLS[0], t, key(i, t), 100.0) for i in range(30)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == [pytest.approx(0.5 * i) for i in range(1, 21)]
    s = b.statistics()
    assert s.deferred == 20 and sum(s.dropped.values()) == 0


def test_another_url_or_prefix_has_its_own_bucket() -> None:
    b = WebhookBudget(WebhookSettings(prefix_reports_per_s=1.0, prefix_reports_burst=1))
    t, same24, other = TARGETS[0], TARGETS[1], TARGETS[2]
    assert b.plan(URLS[0], t, key(1, t), 0.0) == 0.0
    assert b.plan(URLS[0], same24, key(2, same24), 0.0) == 1.0  # same /24, same URL
    assert b.plan(URLS[1], t, key(3, t), 0.0) == 0.0  # another URL
    assert b.plan(URLS[0], other, key(4, other), 0.0) == 0.0  # another /24


def test_over_max_defer_is_shed_as_prefix_backlog() -> None:
    b = WebhookBudget(
        WebhookSettings(prefix_reports_per_s=1.0, prefix_reports_burst=2, max_defer_s=3.0)
    )
    t = TARGETS[0]
    waits = [b.plan(URLS[0], t, key(i, t), 0.0) for i in range(8)]
    assert waits == [0.0, 0.0, 1.0, 2.0, 3.0, None, None, None]
    assert b.statistics().dropped["prefix_backlog"] == 3
    # A shed report costs no token: a second later the bucket is where it was, one on.
    assert b.plan(URLS[0], t, key(99, t), 1.0) == 3.0


def test_same_flow_to_the_same_url_within_the_window_is_a_duplicate() -> None:
    b = WebhookBudget(WebhookSettings(dedup_window_s=60.0))
    t = TARGETS[0]
    assert b.plan(URLS[0], t, key(1, t), 0.0) == 0.0
    assert b.plan(URLS[0], t, key(1, t), 59.0) is None
    assert b.plan(URLS[1], t, key(1, t), 59.0) == 0.0  # to another URL it is news
    assert b.plan(URLS[0], t, key(1, t), 60.5) == 0.0  # the window is over
    assert b.statistics().dropped["duplicate"] == 1


def test_drop_counts_only_known_reasons() -> None:
    b = WebhookBudget(WebhookSettings())
    b.drop("outbox_full", 3)
    b.drop("ssrf")
    assert b.statistics().dropped["outbox_full"] == 3 and b.statistics().dropped["ssrf"] == 1
    with pytest.raises(ValueError):
        b.drop("budget")


events = st.lists(
    st.tuples(
        st.sampled_from(URLS),
        st.sampled_from(TARGETS),
        st.integers(0, 40),  # flow (port)
        st.integers(0, 5_000),  # ms since the last event
    ),
    max_size=150,
)


@SETTINGS
@given(
    events=events,
    per_s=st.sampled_from([0.5, 1.0, 4.0]),
    burst=st.integers(1, 8),
    max_defer_s=st.sampled_from([0.0, 2.0, 30.0]),
    window_s=st.sampled_from([0.0, 1.0, 100.0]),
    max_prefixes=st.integers(1, 4),
    max_dedup=st.integers(1, 10),
)
def test_scheduled_first_attempts_never_exceed_the_bucket(
    events: list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]],
    per_s: float,
    burst: int,
    max_defer_s: float,
    window_s: float,
    max_prefixes: int,
    max_dedup: int,
) -> None:
    s = WebhookSettings(
        prefix_reports_per_s=per_s,
        prefix_reports_burst=burst,
        max_defer_s=max_defer_s,
        dedup_window_s=window_s,
        max_prefixes=max_prefixes,
        max_dedup_entries=max_dedup,
    )
    b = WebhookBudget(s)
    now_ms = 0
    scheduled: dict[tuple[str, tuple[int, int]], list[float]] = defaultdict(list)
    planned = dropped = 0
    for url, target, port, gap in events:
        now_ms += gap
        now = now_ms / 1000
        wait = b.plan(url, target, key(port, target), now)
        if wait is None:
            dropped += 1
            continue
        planned += 1
        assert 0 <= wait <= max_defer_s + 1e-6
        scheduled[(url, prefix_of(target))].append(now + wait)
        st_ = b.statistics()
        assert st_.prefixes <= max_prefixes and st_.dedup_entries <= max_dedup
    assert sum(b.statistics().dropped.values()) == dropped
    for times in scheduled.values():
        times.sort()
        for i in range(len(times)):
            for j in range(i, len(times)):
                span = times[j] - times[i]
                assert j - i + 1 <= burst + span * per_s + 1e-6


# -- [webhook] endpoints in overflowd.toml --------------------------------------------------------


def test_endpoints_parse_with_prefixes_and_secret() -> None:
    s = parse_settings(
        "[webhook]\n"
        'targets = [{ prefix = "192.0.2.0/24", url = "https://a.example/h" }]\n'
        "[[webhook.endpoints]]\n"
        'url = "https://b.example/h"\n'
        'prefixes = ["198.51.100.0/24", "2001:db8::/32"]\n'
        f'secret = "{SECRET}"\n'
    ).webhook
    (e,) = s.endpoints
    assert e.prefixes == ("198.51.100.0/24", "2001:db8::/32")
    assert [x.url for x in s.all_endpoints()] == ["https://a.example/h", "https://b.example/h"]
    assert set(s.secrets()) == {"https://b.example/h"}
    assert SECRET not in repr(e)  # never printed


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ('url = "https://b.example/h"\n', "prefixes"),
        ('url = "https://b.example/h"\nprefixes = []\n', "prefixes"),
        ('url = "https://b.example/h"\nprefixes = ["x"]\n', "endpoint"),
        ('url = "http://b.example/h"\nprefixes = ["192.0.2.0/24"]\n', "https"),
        ('url = "https://b.example/h"\nprefixes = ["192.0.2.0/24"]\nsecrett = "x"\n', "secrett"),
        (
            'url = "https://b.example/h"\nprefixes = ["192.0.2.0/24"]\nsecret = "hunter2"\n',
            "whsec_",
        ),
        (
            'url = "https://b.example/h"\nprefixes = ["192.0.2.0/24"]\n'
            f'secret = "{SECRET}"\nsecret_file = "f"\n',
            "not both",
        ),
    ],
)
def test_bad_endpoints_name_the_problem(table: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_settings("[[webhook.endpoints]]\n" + table, "overflowd.toml")


def test_secret_file_is_read_relative_to_the_home(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text(SECRET + "\n")
    (tmp_path / "overflowd.toml").write_text(
        "[[webhook.endpoints]]\n"
        'url = "https://b.example/h"\nprefixes = ["192.0.2.0/24"]\n'
        'secret_file = "hook.secret"\n'
    )
    s = load_settings(tmp_path).webhook
    assert s.endpoints[0].secret == SECRET
    assert s.secrets()["https://b.example/h"] == (notify.parse_secret(SECRET),)


@pytest.mark.parametrize("content", [None, "not a secret\n", "x" * 5000])
def test_bad_secret_file_is_one_clear_error(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "hook.secret").write_text(content)
    (tmp_path / "overflowd.toml").write_text(
        "[[webhook.endpoints]]\n"
        'url = "https://b.example/h"\nprefixes = ["192.0.2.0/24"]\n'
        'secret_file = "hook.secret"\n'
    )
    with pytest.raises(ConfigError, match=r"hook\.secret") as info:
        load_settings(tmp_path)
    assert "https://b.example/h" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_batch_reports", "0"),
        ("max_batch_bytes", "100"),
        ("endpoint_posts_per_s", "0"),
        ("prefix_reports_burst", "0"),
        ("max_defer_s", "-1"),
        ("max_pending", "0"),
        ("max_batch_reports", "2.5"),
    ],
)
def test_new_limits_are_checked(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_settings(f"[webhook]\n{key} = {value}\n", "overflowd.toml")

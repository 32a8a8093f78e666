"""The receiver's per-key budget (sans-IO, time injected) and what a "client" is."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd.receiver import KeyBudget, KeyCaps, client_key

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CAPS = KeyCaps(
    rate_per_s=2.0,
    burst=5,
    max_bytes=10_000,
    window_s=100.0,
    new_keys_per_s=0.5,
    new_keys_burst=3,
    all_keys_max_bytes=30_000,
    max_keys=1000,
)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 19),  # which key
            st.integers(1, 4000),  # bytes
            st.floats(0, 2, allow_nan=False),  # seconds since the previous delivery
        ),
        max_size=300,
    )
)
def test_no_sequence_of_deliveries_exceeds_any_cap(
    events: list[tuple[int, int, float]],
) -> None:
    budget = KeyBudget(CAPS)
    now = 0.0
    reports: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for key, nbytes, dt in events:
        now += dt
        refusal = budget.admit(bytes([key]) * 32, nbytes, now)
        if refusal is None:
            reports[key] = reports.get(key, 0) + 1
            sizes[key] = sizes.get(key, 0) + nbytes
        else:
            assert refusal.reason in ("key_rate", "key_bytes", "new_key_rate", "all_keys_bytes")
            assert 0 <= refusal.retry_after_s <= CAPS.window_s
    for key in reports:
        assert reports[key] <= CAPS.burst + CAPS.rate_per_s * now + 1e-9
        assert sizes[key] <= CAPS.max_bytes * (1 + now / CAPS.window_s) + 1e-6
    assert sum(sizes.values()) <= CAPS.all_keys_max_bytes * (1 + now / CAPS.window_s) + 1e-6
    assert len(reports) <= CAPS.new_keys_burst + CAPS.new_keys_per_s * now + 1e-9
    assert budget.statistics().keys == len(reports)


def test_refusals_say_why_and_when() -> None:
    budget = KeyBudget(CAPS)
    a = b"a" * 32
    for _ in range(5):
        assert budget.admit(a, 100, 0.0) is None
    refusal = budget.admit(a, 100, 0.0)
    assert refusal is not None and refusal.reason == "key_rate"
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert budget.admit(a, 100, 0.5) is None  # one token back
    # bytes: 10 000 per 100 s (100 B/s); 600 used, 100 back by t=1: 9 500 fit, 9 600 do not
    refusal = budget.admit(a, 9600, 1.0)
    assert refusal is not None and refusal.reason == "key_bytes"
    assert refusal.retry_after_s == pytest.approx(1.0)
    assert budget.admit(a, 9500, 1.0) is None
    big = KeyBudget(CAPS).admit(a, 10_001, 0.0)
    assert big is not None and big.reason == "key_bytes" and big.retry_after_s == 100.0
    # new keys: a burst of 3, then one per 2 s; a refused new key costs no token
    fresh = KeyBudget(CAPS)
    for n in range(3):
        assert fresh.admit(bytes([n]) * 32, 10, 0.0) is None
    late = fresh.admit(b"x" * 32, 10, 0.0)
    assert late is not None and late.reason == "new_key_rate"
    assert late.retry_after_s == pytest.approx(2.0)
    assert fresh.admit(b"x" * 32, 10, 2.0) is None
    assert fresh.admit(b"\x00" * 32, 10, 2.0) is None  # a known key is not new


def test_all_keys_together_have_a_byte_budget() -> None:
    caps = KeyCaps(max_bytes=10_000, all_keys_max_bytes=15_000, window_s=100.0)
    budget = KeyBudget(caps)
    assert budget.admit(b"a" * 32, 9000, 0.0) is None
    # b's own 10 000 would do, but all keys together have 6 000 left (150 B/s back)
    refusal = budget.admit(b"b" * 32, 9000, 0.0)
    assert refusal is not None and refusal.reason == "all_keys_bytes"
    assert refusal.retry_after_s == pytest.approx(20.0)
    assert budget.admit(b"b" * 32, 6000, 0.0) is None
    assert budget.admit(b"b" * 32, 3000, 20.0) is None


def test_keys_are_forgotten_least_recently_used_first() -> None:
    caps = KeyCaps(max_keys=2, new_keys_burst=10)
    budget = KeyBudget(caps)
    for key in (b"1", b"2", b"1", b"3"):
        assert budget.admit(key * 32, 10, 0.0) is None
    assert budget.statistics().keys == 2 and budget.statistics().evicted == 1


def test_bad_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyCaps(rate_per_s=0)
    with pytest.raises(ValueError):
        KeyCaps(burst=0)


def test_a_client_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::5") != client_key("2001:db8:1:2::5")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("/run/overflowd.sock") == "/run/overflowd.sock"

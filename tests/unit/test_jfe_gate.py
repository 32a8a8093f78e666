"""jfe's certificate gate (sans-IO) through its library calls: names, allow-list, budgets."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from jfe.certconfig import CertificateSettings
from jfe.gate import (
    Admitted,
    AllowList,
    BucketTable,
    Budget,
    Gate,
    Reason,
    RefusalMemory,
    check_pattern,
    client_key,
    normalize_name,
    registered_domain,
)
from overflowd.config import parse_section
from overflowd.errors import ConfigError

HOUR = 3600.0


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("A.Example.COM.", "a.example.com"),
        ("x-1.example.com", "x-1.example.com"),
        ("example", None),
        ("-a.example.com", None),
        ("a-.example.com", None),
        ("a..example.com", None),
        ("a_b.example.com", None),
        ("192.0.2.1", None),
        ("ex\u00e4mple.com", None),
        ("a/../b.example.com", None),
        ("a" * 64 + ".com", None),
        (("a" * 63 + ".") * 4 + "com", None),
        ("", None),
        (None, None),
    ],
)
def test_names_are_ldh_and_normalised(raw: str | None, want: str | None) -> None:
    assert normalize_name(raw) == want


def test_wildcards_match_one_label_and_patterns_are_checked() -> None:
    allow = AllowList(["*.example.com", "exact.example.org"])
    assert allow.allows("a.example.com")
    assert not allow.allows("example.com") and not allow.allows("a.b.example.com")
    assert allow.allows("exact.example.org") and not allow.allows("x.exact.example.org")
    assert check_pattern("*.example.com") == ""
    assert "public suffix" in check_pattern("*.co.uk")
    assert check_pattern("*.*.example.com") != "" and check_pattern("Example.com") != ""
    assert registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert registered_domain("co.uk") is None


def _gate(client: int = 5, domain: int = 40, total: int = 50, per_hour: float = 0.0) -> Gate:
    return Gate(
        AllowList(["*.example.com", "*.example.net"]),
        client_budget=Budget(client, per_hour / HOUR),
        domain_budget=Budget(domain, per_hour / HOUR),
        total_budget=Budget(total, per_hour / HOUR),
        has_other_checks=False,
    )


def test_ten_thousand_random_names_cause_at_most_the_budgeted_issuances() -> None:
    gate = _gate()
    rng = random.Random(12)
    clients = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 21)]
    issued: Counter[str] = Counter()
    reasons: Counter[Reason] = Counter()
    for i in range(10_000):
        label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        name = f"{label}.example.com" if i % 2 else f"{label}.example.net"
        client = rng.choice(clients)
        screened = gate.screen(name, client, now=i * 0.001)
        if isinstance(screened, Admitted):
            refusal = gate.charge(screened, now=i * 0.001)
            if refusal is None:
                issued[screened.client] += 1
            else:
                reasons[refusal] += 1
        else:
            reasons[screened] += 1
    assert sum(issued.values()) == 50  # the total budget, exactly: nothing refills (rate 0)
    assert max(issued.values()) <= 5
    assert reasons[Reason.TOTAL_BUDGET] + reasons[Reason.CLIENT_BUDGET] == 10_000 - 50


def test_budgets_refill_at_their_rate_and_bound_each_domain() -> None:
    gate = _gate(client=100, domain=3, total=100, per_hour=3600.0)  # 1 token per second
    client = ipaddress.ip_address("192.0.2.7")
    got = []
    for i in range(10):
        screened = gate.screen(f"h{i}.example.com", client, now=0.0)
        got.append(isinstance(screened, Admitted) and gate.charge(screened, 0.0) is None)
    assert got.count(True) == 3
    assert gate.screen("later.example.com", client, now=0.5) == Reason.DOMAIN_BUDGET
    screened = gate.screen("later.example.com", client, now=1.0)
    assert isinstance(screened, Admitted) and gate.charge(screened, 1.0) is None
    # another registered domain has its own bucket
    screened = gate.screen("a.example.net", client, now=1.0)
    assert isinstance(screened, Admitted)


def test_refusals_before_budget_cost_nothing_and_policy_is_required() -> None:
    gate = _gate(client=1)
    client = ipaddress.ip_address("192.0.2.8")
    for _ in range(100):
        assert gate.screen("x.other.org", client, 0.0) == Reason.NOT_ALLOWED
        assert gate.screen("bad_name.example.com", client, 0.0) == Reason.INVALID_NAME
        assert gate.screen(None, client, 0.0) == Reason.NO_SNI
    assert isinstance(gate.screen("ok.example.com", client, 0.0), Admitted)
    none = Gate(
        AllowList([]),
        client_budget=Budget(5, 0),
        domain_budget=Budget(5, 0),
        total_budget=Budget(5, 0),
        has_other_checks=False,
    )
    assert none.screen("a.example.com", client, 0.0) == Reason.NO_POLICY


def test_ipv6_clients_are_counted_per_64_and_tables_are_bounded() -> None:
    a = ipaddress.ip_address("2001:db8:1:2::1")
    b = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    assert client_key(a) == client_key(b) == "2001:db8:1:2::/64"
    assert client_key(ipaddress.ip_address("::ffff:192.0.2.1")) == "192.0.2.1"
    table = BucketTable(Budget(1, 0), max_entries=100)
    for i in range(1000):
        table.get(str(i), 0.0)
    assert len(table) == 100 and table.evicted == 900


def test_refusal_memory_expires_and_is_bounded() -> None:
    memory = RefusalMemory(hold_s=10.0, max_entries=3)
    memory.remember("a.example.com", Reason.ASK_REFUSED, now=0.0)
    assert memory.recalls("a.example.com", 5.0) == Reason.ASK_REFUSED
    assert memory.recalls("a.example.com", 10.0) is None
    for n in "bcde":
        memory.remember(f"{n}.example.com", Reason.DNS_ELSEWHERE, 0.0)
    assert memory.recalls("b.example.com", 1.0) is None  # forgotten first
    assert memory.recalls("e.example.com", 1.0) == Reason.DNS_ELSEWHERE


def test_the_certificates_section_parses_strictly() -> None:
    text = """
[jfe.certificates]
mode = "acme"
acme_directory_url = "https://acme.example/dir"
allow_names = ["*.example.com", "mail.example.org"]
per_client_burst = 3
"""
    s = parse_section(text, "jfe.certificates", CertificateSettings, "t.toml")
    assert s.mode == "acme" and s.allow_names == ("*.example.com", "mail.example.org")
    assert s.budget_client() == Budget(3, 5.0 / HOUR)
    bad = {
        'mode = "acme"\n': "acme_directory_url",
        'allow_names = ["*.co.uk"]\n': "public suffix",
        "nope_s = 1\n": "unknown key 'jfe.certificates.nope_s'",
        'ask_url = "ftp://x"\n': "ask_url",
        'local_addresses = ["192.0.2.1/24"]\n': "local_addresses",
        'dns_nameservers = ["resolver.example"]\n': "dns_nameservers",
        "renew_before_days = 100.0\n": "renew_before_days",
        'mode = "self"\n': "mode",
    }
    for body, needle in bad.items():
        with pytest.raises(ConfigError, match=needle.replace("*", r"\*").replace(".", r"\.")):
            parse_section(
                "[jfe.certificates]\n" + body, "jfe.certificates", CertificateSettings, "t.toml"
            )

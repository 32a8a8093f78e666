"""jfe's [jfe] section, its generated ruleset (pure), and its metrics' documentation."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from jfe import rules
from jfe.config import JfeSettings, load_jfe
from jfe.metrics import families
from jfe.proxy import PortStatistics, ProxyStatistics
from overflowd.config import parse_section
from overflowd.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "jfe.md"


def test_load_jfe_reads_the_section_and_defaults(tmp_path: Path) -> None:
    assert load_jfe(tmp_path).proxy == JfeSettings()
    (tmp_path / "overflowd.toml").write_text(
        "[jfe]\nports = [25, 80]\nproxy_v2_ports = [80]\nhandshake_timeout_s = 3\n"
    )
    proxy = load_jfe(tmp_path).proxy
    assert proxy.ports == (25, 80) and proxy.handshake_timeout_s == 3.0
    assert proxy.mode(80) == "proxy_v2" and proxy.mode(25) == "transparent"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("portz = [1]", r"x.toml:2: unknown key 'jfe.portz'"),
        ("ports = [0]", r"'jfe.ports'.*port 0"),
        ("ports = [8443]", r"'jfe.listen_port' must not be one of the intercepted ports"),
        ("ports = [25]\nproxy_v2_ports = [80]", r"'jfe.proxy_v2_ports' port 80 is not an interc"),
        ("ports = [22]\nproxy_v2_ports = [22]", r"'jfe.proxy_v2_ports' port 22 is not an interc"),
        ('addresses = ["2001:db8::/32"]', "IPv4 only"),
        ('addresses = ["nope"]', "not an address"),
        ('cgroups = ["/abs"]', "relative"),
        ('nft_table = "a-b"', "nft_table"),
        ("route_table = 254", "main or local"),
        ("max_connections = 0", "at least 1"),
        ("idle_timeout_s = 0", "positive"),
    ],
)
def test_bad_settings_name_the_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section(f"[jfe]\n{body}\n", "jfe", JfeSettings, "x.toml")


def test_plan_is_one_table_and_honours_every_setting() -> None:
    settings = JfeSettings(
        ports=(80, 25, 22),
        excluded_ports=(22,),
        addresses=("198.51.100.0/24",),
        cgroups=("system.slice/web.service",),
    )
    plan = rules.plan(settings, cgroup_prefix="unified/")
    text = plan.ruleset
    # Atomic replace of jfe's own table only: create-if-missing, delete, define.
    assert text.startswith("table inet jfe {}\ndelete table inet jfe\ntable inet jfe {\n")
    assert set(re.findall(r"table (\w+ \w+)", text)) == {"inet jfe"}
    assert "elements = { 25, 80 }" in text  # 22 excluded even though listed
    assert "tcp dport @excluded accept" in text
    assert "ip daddr @addresses" in text and "198.51.100.0/24" in text
    assert 'socket cgroupv2 level 2 "unified/system.slice/web.service"' in text
    assert "tproxy ip to 127.0.0.1:8443" in text
    lo = text.index('iifname "lo" accept')
    assert lo < text.index("tproxy"), "loopback (jfe's own upstream) is accepted first"
    assert "route_localnet" not in plan.describe()
    assert "dnat" not in text and "flush ruleset" not in text
    assert plan.ip_rule == ("fwmark", "0x6a66", "lookup", "27238", "priority", "27238")


def test_no_ports_means_no_tproxy() -> None:
    assert "tproxy" not in rules.plan(JfeSettings()).ruleset


def _stats() -> ProxyStatistics:
    port = PortStatistics(3, 1, 1, 1, {"reset": 1})
    return ProxyStatistics(0, 3, 1, 2, {"reset": 1}, 10, 20, 0.5, {25: port})


def test_every_metric_family_is_documented() -> None:
    section = DOC.read_text(encoding="utf-8").split("## Metrics", 1)[1]

    @dataclass(frozen=True)
    class Cert:
        granted: int = 1
        refused: tuple[tuple[str, int], ...] = (("not_allowed", 2),)

    found = families(_stats(), Cert())
    assert len(found) >= 8
    for m in found:
        name = m.name + ("_total" if m.type == "counter" else "")
        assert re.search(rf"`{name}[`{{]", section), f"{name} is not in docs/jfe.md"


def test_addresses_are_networks() -> None:
    plan = rules.plan(JfeSettings(ports=(80,), addresses=("192.0.2.7",)))
    assert str(ipaddress.ip_network("192.0.2.7")) in plan.ruleset

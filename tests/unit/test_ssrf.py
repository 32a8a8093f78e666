"""The SSRF address policy: internal targets refused unless a configured prefix allows them."""

from __future__ import annotations

import ipaddress

import pytest

from overflowd import ssrf
from overflowd.errors import DeliveryError

INTERNAL = [
    "127.0.0.1",
    "127.5.6.7",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2002:7f00:1::1",  # 6to4 embedding 127.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("text", INTERNAL)
def test_internal_addresses_are_refused(text: str) -> None:
    address = ipaddress.ip_address(text)
    assert ssrf.is_internal(address)
    with pytest.raises(ssrf.AddressRefused):
        ssrf.check_address(address)


@pytest.mark.parametrize("text", GLOBAL)
def test_global_addresses_pass(text: str) -> None:
    ssrf.check_address(ipaddress.ip_address(text))


def test_allow_prefixes_open_exactly_what_they_name() -> None:
    allow = ssrf.parse_prefixes(["127.0.0.0/8", "fd00::/8"])
    ssrf.check_address(ipaddress.ip_address("127.0.0.1"), allow)
    ssrf.check_address(ipaddress.ip_address("fd12::1"), allow)
    with pytest.raises(ssrf.AddressRefused):
        ssrf.check_address(ipaddress.ip_address("10.0.0.1"), allow)
    with pytest.raises(ssrf.AddressRefused):
        ssrf.check_address(ipaddress.ip_address("::1"), allow)


def test_one_internal_answer_taints_a_name() -> None:
    addrs = [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("127.0.0.1")]
    with pytest.raises(ssrf.AddressRefused):
        ssrf.check_addresses(addrs)
    with pytest.raises(DeliveryError, match="no address"):
        ssrf.check_addresses([])


def test_parse_target() -> None:
    t = ssrf.parse_target("https://hooks.example.net/x")
    assert (t.scheme, t.host, t.port, t.literal) == ("https", "hooks.example.net", 443, None)
    t = ssrf.parse_target("http://[::1]:8080/x", require_https=False)
    assert t.literal == ipaddress.ip_address("::1") and t.port == 8080
    for bad in [
        "http://127.0.0.1/",  # http refused by default
        "ftp://example.net/",
        "https://user:pw@example.net/",
        "https:///nohost",
        "https://example.net:99999/",
        "file:///etc/passwd",
    ]:
        with pytest.raises(DeliveryError):
            ssrf.parse_target(bad)


def test_bad_prefix_is_named() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        ssrf.parse_prefixes(["nonsense"])


@pytest.mark.parametrize(
    "url",
    [
        "https://" + "a" * 64 + ".example.com/hook",  # a label IDNA cannot encode
        "https://93.184.216.34/\x01",  # a control character httpx refuses
        "https://example.net/a b",
        "https://example.net/" + "x" * 3000,
    ],
)
def test_urls_that_could_never_be_sent_are_refused_up_front(url: str) -> None:
    """Found in review: these used to raise out of the delivery service."""
    with pytest.raises(DeliveryError):
        ssrf.parse_target(url)

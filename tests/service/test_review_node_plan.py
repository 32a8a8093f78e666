"""Review of #9: the webhook plan of a real :class:`NodeService` built from TOML, as
``overflowd run`` builds it (library call; nothing is delivered, the worker is not run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from overflowd.config import parse_settings
from overflowd.identity import NodeIdentity
from overflowd.services.node import NodeService
from overflowd.store import Store
from tests.support.reports import make_payload

NODE = NodeIdentity(seed=b"\x41" * 32)
OBSERVED = NodeIdentity(seed=b"\x42" * 32)
HOOK = "https://hooks.example.net/overflowd"


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("::ffff:192.0.2.1", "2001:db8::1"),  # an IPFIX v6 field holding an IPv4 host
        ("2001:db8::1", "::ffff:192.0.2.77"),
        ("198.51.100.2", "192.0.2.1"),  # the plain form, for contrast
    ],
)
def test_a_static_endpoint_gets_the_reports_about_an_ipv4_mapped_end(
    tmp_path: Path, src: str, dst: str
) -> None:
    """An IPv4-mapped address is its IPv4 host everywhere else in the node (confinement, the
    budgets, DNS hints: notify.normalize); the static endpoint's prefix match compared it as
    IPv6, so the operator's endpoint for 192.0.2.0/24 silently missed its reports."""
    s = parse_settings(
        f'[webhook]\ntargets = [{{prefix = "192.0.2.0/24", url = "{HOOK}"}}]\n', "overflowd.toml"
    )
    report = OBSERVED.sign_report(make_payload(src, dst, time_ms=int(time.time() * 1000)))
    with Store.open(f"sqlite:///{tmp_path / 'node.sqlite'}") as store:
        node = NodeService(NODE, s, store, listen=["127.0.0.1:0"])
        planned = node._webhook_plan(report, 0.0, 0)
    assert [p.url for p in planned] == [HOOK]

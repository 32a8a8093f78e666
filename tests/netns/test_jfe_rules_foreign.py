"""jfe's policy routing must be jfe's own: apply adds it beside a stranger, remove leaves the
stranger alone. Review (jfe #12): both looked only at the rule *priority*, so another rule at
jfe's priority (another tool, an operator's) made `apply` skip jfe's rule (TPROXYed packets then
had no route to the listener) and `remove` deleted the stranger's rule."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jfe.config import JfeSettings
from tests.support import netns

pytestmark = pytest.mark.netns

PRIORITY = JfeSettings().rule_priority
STRANGER = ["priority", str(PRIORITY), "from", "192.0.2.0/24", "lookup", "main"]
SCRIPT = (
    "import sys; from jfe import rules; from jfe.config import JfeSettings; "
    "getattr(rules, sys.argv[1])(JfeSettings(ports=(443,)))"
)


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[netns.Namespace]:
    try:
        netns.require("ip", "nft")
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"netns test cannot run: {exc}", pytrace=False)
    with netns.namespace(tmp_path, prefix="rvj") as space:
        yield space


def _rules(ns: netns.Namespace) -> str:
    return ns.run(["ip", "-4", "rule", "show", "priority", str(PRIORITY)]).stdout


def test_a_stranger_at_jfes_priority_neither_hides_nor_loses_a_rule(ns: netns.Namespace) -> None:
    ns.run(["ip", "-4", "rule", "add", *STRANGER])
    ns.run([sys.executable, "-c", SCRIPT, "apply"], timeout=30)
    shown = _rules(ns)
    assert "fwmark 0x6a66" in shown, shown
    assert "from 192.0.2.0/24" in shown, shown
    ns.run([sys.executable, "-c", SCRIPT, "remove"], timeout=30)
    shown = _rules(ns)
    assert "fwmark" not in shown, shown
    assert "from 192.0.2.0/24" in shown, shown

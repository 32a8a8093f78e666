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


def test_a_second_jfe_leaves_the_running_ones_rules_alone(
    ns: netns.Namespace, tmp_path: Path
) -> None:
    """Review (jfe #12): `jfe run` removed "leftovers" and applied its rules before it had a
    listener, then failed on the busy listen port and removed the rules on its way out: a
    second start by mistake silently switched the running jfe's interception off."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "overflowd.toml").write_text("[jfe]\nports = [443]\nlisten_port = 18443\n")
    first = ns.spawn([sys.executable, "-m", "tests.support.jfe_certs", str(home)], label="jfe1")
    try:
        first.wait_for_output(r"jfe running listen=", timeout=30)
        second = ns.run(
            [sys.executable, "-m", "tests.support.jfe_certs", str(home)], timeout=30, check=False
        )
        assert second.returncode != 0, second.stderr
        table = ns.run(["nft", "list", "table", "inet", "jfe"], check=False)
        assert table.returncode == 0, "the running jfe's table was removed"
        assert "fwmark 0x6a66" in _rules(ns)
    finally:
        first.stop()
    assert ns.run(["nft", "list", "table", "inet", "jfe"], check=False).returncode != 0

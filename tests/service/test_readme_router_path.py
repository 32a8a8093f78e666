"""The README's "Put it beside a router" path, run as written: five steps, no file edited."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from overflowd.config import load_settings
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.trace import send_udp, trace_payloads

README = Path(__file__).resolve().parents[2] / "README.md"


def _router_path_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Put it beside a router") :]
    block = section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh"))]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line and not line.startswith("#")]


def test_the_readme_router_path_is_five_steps_that_work(tmp_path: Path) -> None:
    commands = _router_path_commands()
    assert [c[:2] for c in commands] == [
        ["overflowd", "init"],
        ["overflowd", "key"],
        ["overflowd", "run"],
    ]
    numbered = re.findall(r"^# (\d)(?:-(\d))?\.", README.read_text(), flags=re.M)
    assert max(int(b or a) for a, b in numbered) <= 5
    home = tmp_path / "overflowd"

    def here(argv: list[str]) -> list[str]:
        return [str(home) if a == "/var/lib/overflowd" else a for a in argv]

    init, dns_record, daemon = (here(c) for c in commands)
    assert run(*init).code == 0
    settings = load_settings(home)
    assert settings.send.to_flow_addresses is True
    assert settings.node.contacts and settings.collector.allowed_exporters
    record = run(*dns_record)
    assert record.code == 0, record.err
    assert "v=OVF1; k=ed25519" in record.out
    assert settings.node.contacts[0] in record.out
    # The daemon as written, on loopback ports (a test binds no well-known port), fed the real
    # trace from 127.0.0.1, which is not the router the config names: every datagram refused.
    assert daemon[:2] == ["overflowd", "run"]
    node = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        assert node.udp is not None
        sent = send_udp(trace_payloads()[:20], node.udp)
        assert node.wait_for("overflowd_collector_exporter_refused_total", sent) == sent
        assert node.metric("overflowd_reports_signed_total") == 0
    finally:
        code, output = node.stop()
    assert code == 0, output

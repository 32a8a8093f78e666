"""``overflowd`` and ``overflowd-query`` through their processes, as operators use them."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from overflowd.config import DEFAULT_CONFIG_TEXT, load_settings
from overflowd.identity import identity_path, load_identity
from overflowd.registry import parse_record
from tests.support.cli import run


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    result = run("overflowd", "init", "--home", str(home))
    assert result.code == 0, result.err
    return home


def test_init_creates_private_identity_and_commented_config(home: Path) -> None:
    assert stat.S_IMODE(identity_path(home).stat().st_mode) == 0o600
    assert "Unknown keys are an error" in (home / "overflowd.toml").read_text()


def test_init_refuses_to_overwrite_without_force(home: Path) -> None:
    before = identity_path(home).read_bytes()
    result = run("overflowd", "init", "--home", str(home))
    assert result.code == 1
    assert result.err.count("\n") == 1 and "--force" in result.err
    assert identity_path(home).read_bytes() == before
    assert run("overflowd", "init", "--force", "--home", str(home)).code == 0
    assert identity_path(home).read_bytes() != before


def test_home_from_environment(tmp_path: Path) -> None:
    result = run("overflowd", "init", home=tmp_path / "env-home")
    assert result.code == 0 and identity_path(tmp_path / "env-home").exists()


def test_key_readable_by_group_is_refused_like_ssh(home: Path) -> None:
    os.chmod(identity_path(home), 0o640)
    result = run("overflowd", "key", "show", "--home", str(home))
    assert result.code == 1
    assert "too open" in result.err and "chmod 600" in result.err


def test_key_show_and_dns_record_parse_back(home: Path) -> None:
    shown = json.loads(run("overflowd", "key", "show", "--json", "--home", str(home)).out)
    key = load_identity(home).public_key
    assert base64.b64decode(shown["public_key"]) == key
    assert shown["fingerprint"] == load_identity(home).fingerprint
    result = run(
        "overflowd",
        "key",
        "dns-record",
        "--home",
        str(home),
        "--contact",
        "mailto:abuse@example.net",
        "--contact",
        "tel:+1-555-0100",
        "--url",
        "https://example.net/hook",
        "--name",
        "example.net",
    )
    assert result.code == 0, result.err
    owner, ttl, _, rtype, rdata = result.out.strip().split(" ", 4)
    assert (owner, ttl, rtype) == ("_overflowd.example.net.", "3600", "TXT")
    strings = [s.encode() for s in rdata.strip().strip('"').split('" "')]
    record = parse_record(strings)
    assert record.public_key == key
    assert record.contacts == ("mailto:abuse@example.net", "tel:+1-555-0100")


def test_bad_contact_is_one_line_naming_the_flag(home: Path) -> None:
    result = run("overflowd", "key", "dns-record", "--home", str(home), "--contact", "call us")
    assert result.code == 2 and result.err.startswith("overflowd: error: --contact: ")
    assert result.err.count("\n") == 1
    # The same contact from the config is our error (exit 1), naming the file, line and key.
    (home / "overflowd.toml").write_text('[node]\ncontacts = ["call us"]\n')
    result = run("overflowd", "key", "dns-record", "--home", str(home))
    assert result.code == 1 and result.err.count("\n") == 1
    assert f"{home / 'overflowd.toml'}:2: 'node.contacts'" in result.err


def test_usage_errors_exit_2(home: Path) -> None:
    assert run("overflowd").code == 2
    assert run("overflowd", "report", "--src", "nonsense", "--dst", "192.0.2.1").code == 2
    assert run("overflowd-query", "reports", "--dst", "300.1.1.1/8").code == 2


def test_bad_config_names_the_line(home: Path) -> None:
    (home / "overflowd.toml").write_text("[node]\ncontacts = []\ncontact = 'x'\n")
    result = run("overflowd", "key", "dns-record", "--home", str(home))
    assert result.code == 1
    assert f"{home / 'overflowd.toml'}:3: unknown key 'node.contact'" in result.err


def test_init_flags_fill_in_the_new_config_and_nothing_else(tmp_path: Path) -> None:
    new = tmp_path / "router-node"
    result = run(
        "overflowd", "init", "--home", str(new), "--contact", "mailto:abuse@example.net",
        "--exporter", "192.0.2.1", "--exporter", "2001:db8::/64", "--send",
    )  # fmt: skip
    assert result.code == 0, result.err
    settings = load_settings(new)
    assert settings.node.contacts == ("mailto:abuse@example.net",)
    assert settings.collector.allowed_exporters == ("192.0.2.1", "2001:db8::/64")
    assert settings.send.to_flow_addresses is True
    assert settings.inband.allowed_prefixes == ("0.0.0.0/0", "::/0")
    # Every other line is the documented default file, comments included.
    written = (new / "overflowd.toml").read_text().splitlines()
    default = DEFAULT_CONFIG_TEXT.splitlines()
    assert len(written) == len(default)
    assert sum(a != b for a, b in zip(written, default, strict=True)) == 3


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--contact", "nope", "--contact: 'node.contacts' has 'nope', which is not a URI"),
        ("--exporter", "300.1.1.1", "--exporter: 'collector.allowed_exporters' has '300.1.1.1'"),
    ],
)
def test_init_refuses_a_bad_flag_value_and_creates_nothing(
    tmp_path: Path, flag: str, value: str, says: str
) -> None:
    new = tmp_path / "never"
    result = run("overflowd", "init", "--home", str(new), flag, value)
    assert result.code == 2
    assert result.err.count("\n") == 1 and says in result.err and "Traceback" not in result.err
    assert not new.exists()


def test_init_flags_never_rewrite_an_existing_config(home: Path) -> None:
    before = (home / "overflowd.toml").read_text()
    result = run("overflowd", "init", "--force", "--home", str(home), "--send")
    assert result.code == 2 and "edit that file instead" in result.err
    assert (home / "overflowd.toml").read_text() == before

"""Strict TOML settings: mistakes name the file, the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from overflowd.config import (
    CONFIG_FILE,
    DEFAULT_CONFIG_TEXT,
    Settings,
    load_settings,
    parse_settings,
    resolve_home,
)
from overflowd.errors import ConfigError


def test_the_commented_default_file_is_the_defaults() -> None:
    assert parse_settings(DEFAULT_CONFIG_TEXT) == Settings()


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path) == Settings()


def test_values_are_typed_and_frozen(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(
        '[node]\ncontacts = ["mailto:abuse@example.net"]\n[sampling]\nrate = 1\n'
    )
    settings = load_settings(tmp_path)
    assert settings.node.contacts == ("mailto:abuse@example.net",)
    assert settings.sampling.rate == 1.0 and isinstance(settings.sampling.rate, float)
    with pytest.raises(AttributeError):
        settings.node.contacts = ()  # type: ignore[misc]


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("[node]\ncontacts = []\n\n[store]\nulr = 'x'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path)
    assert str(err.value) == f"{tmp_path / CONFIG_FILE}:5: unknown key 'store.ulr'"


def test_unknown_section_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.toml:2: unknown section or key 'strore'"):
        parse_settings("# hi\n[strore]\nurl = ''\n", "x.toml")
    with pytest.raises(ConfigError, match=r"x.toml:2: 'sampling.rate' must be a number"):
        parse_settings("[sampling]\nrate = 'fast'\n", "x.toml")
    with pytest.raises(ConfigError, match=r"x.toml:2: 'sampling.rate' must be in \(0, 1\]"):
        parse_settings("[sampling]\nrate = 2\n", "x.toml")
    with pytest.raises(ConfigError, match=r"'node.contacts' items must be a string"):
        parse_settings("[node]\ncontacts = [1]\n", "x.toml")
    with pytest.raises(ConfigError, match="not a URI"):
        parse_settings("[node]\ncontacts = ['abuse desk']\n", "x.toml")


def test_toml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"x.toml: .*line 3"):
        parse_settings("[node]\ncontacts = []\nrate = = 1\n", "x.toml")


def test_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OVERFLOWD_HOME", str(tmp_path / "env"))
    assert resolve_home(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("OVERFLOWD_HOME")
    assert resolve_home(None) == Path.home() / ".overflowd"


def test_shipped_example_config_is_the_commented_default() -> None:
    """deploy/overflowd.toml.example is what `overflowd init` writes, and it parses."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "overflowd.toml.example"
    assert example.read_text(encoding="utf-8") == DEFAULT_CONFIG_TEXT
    assert parse_settings(example.read_text(encoding="utf-8"), str(example)) == Settings()


def test_contacts_that_no_report_could_carry_are_refused() -> None:
    five = ", ".join(f'"mailto:a{i}@example.net"' for i in range(5))
    with pytest.raises(ConfigError, match=r"x.toml:2: 'node.contacts' has more than 4"):
        parse_settings(f"[node]\ncontacts = [{five}]\n", "x.toml")
    long = '"https://example.net/' + "x" * 520 + '"'
    with pytest.raises(ConfigError, match="512 bytes"):
        parse_settings(f"[node]\ncontacts = [{long}]\n", "x.toml")


def test_webhook_retry_budgets_come_from_the_config() -> None:
    settings = parse_settings(
        "[webhook]\nretry_per_url_burst = 2\nretry_per_host_per_s = 0.5\n", "x.toml"
    )
    assert settings.webhook.retry_per_url_burst == 2
    assert settings.webhook.retry_per_host_per_s == 0.5
    with pytest.raises(ConfigError, match="retry_per_url_burst must be an integer of at least 1"):
        parse_settings("[webhook]\nretry_per_url_burst = 0\n", "x.toml")


def test_send_is_off_by_default_and_the_one_switch_sets_the_confinement() -> None:
    off = parse_settings("")
    assert off.send.to_flow_addresses is False
    assert off.inband.confinement().allowed == ()
    on = parse_settings("[send]\nto_flow_addresses = true\n")
    assert on.inband.allowed_prefixes == ("0.0.0.0/0", "::/0")
    narrowed = parse_settings(
        '[send]\nto_flow_addresses = true\nallowed_prefixes = ["198.51.100.0/24"]\n'
    )
    assert narrowed.inband.allowed_prefixes == ("198.51.100.0/24",)
    # Prefixes listed with the switch off still send nothing: the switch decides.
    listed_off = parse_settings('[send]\nallowed_prefixes = ["198.51.100.0/24"]\n')
    assert listed_off.inband.allowed_prefixes == ()
    assert on.deprecations == () and off.deprecations == ()


def test_the_old_inband_allowed_prefixes_still_works_and_says_it_is_deprecated() -> None:
    old = parse_settings('[inband]\nallowed_prefixes = ["127.0.0.0/8"]\n', "/etc/o.toml")
    assert old.send.to_flow_addresses is True
    assert old.inband.allowed_prefixes == ("127.0.0.0/8",)
    assert len(old.deprecations) == 1 and "[send]" in old.deprecations[0]
    assert "/etc/o.toml" in old.deprecations[0]
    empty = parse_settings("[inband]\nallowed_prefixes = []\n")
    assert empty.send.to_flow_addresses is False and empty.inband.allowed_prefixes == ()


def test_send_and_the_old_key_together_are_refused_naming_the_line() -> None:
    text = '[send]\nto_flow_addresses = true\n\n[inband]\nallowed_prefixes = ["127.0.0.0/8"]\n'
    with pytest.raises(ConfigError, match=r"^/x\.toml:5: 'inband.allowed_prefixes' is the old"):
        parse_settings(text, "/x.toml")


def test_a_send_prefix_that_is_no_prefix_names_key_and_line() -> None:
    with pytest.raises(ConfigError, match=r"^/x\.toml:3: 'send.allowed_prefixes' has 'nope'"):
        parse_settings('[send]\nto_flow_addresses = true\nallowed_prefixes = ["nope"]\n', "/x.toml")

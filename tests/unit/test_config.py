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

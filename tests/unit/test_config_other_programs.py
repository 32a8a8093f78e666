"""The node home's overflowd.toml carries [jfe] and [ratelock] for the programs sharing it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from overflowd.config import ConfigError, load_section, parse_section, parse_settings


@dataclass(frozen=True)
class Example:
    ports: tuple[int, ...] = (443,)
    budget_per_min: int = 10

    def problems(self) -> list[tuple[str, str]]:
        return [("budget_per_min", "must be at least 1")] if self.budget_per_min < 1 else []


def test_node_skips_other_programs_sections() -> None:
    settings = parse_settings("[jfe]\nports = [25]\n[ratelock]\nanything = 1\n")
    assert not hasattr(settings, "jfe")


def test_section_parsed_strictly_with_file_and_key() -> None:
    text = "[node]\n\n[jfe]\nports = [25, 587]\n"
    assert parse_section(text, "jfe", Example, "x.toml") == Example(ports=(25, 587))
    with pytest.raises(ConfigError, match=r"x.toml:5: unknown key 'jfe.portz'"):
        parse_section("[node]\n\n[jfe]\nports = [1]\nportz = 2\n", "jfe", Example, "x.toml")
    with pytest.raises(ConfigError, match=r"'jfe.budget_per_min' must be at least 1"):
        parse_section("[jfe]\nbudget_per_min = 0\n", "jfe", Example, "x.toml")
    with pytest.raises(ConfigError, match="'jfe' must be a table"):
        parse_settings("jfe = 3\n")


def test_rest_of_file_still_checked_and_defaults(tmp_path: Path) -> None:
    assert load_section(tmp_path, "jfe", Example) == Example()
    (tmp_path / "overflowd.toml").write_text("[nodez]\n[jfe]\nports = [1]\n")
    with pytest.raises(ConfigError, match="unknown section or key 'nodez'"):
        load_section(tmp_path, "jfe", Example)


@dataclass(frozen=True)
class Sub:
    allow: tuple[str, ...] = ()


def test_dotted_subtable_parsed_by_its_own_class() -> None:
    text = '[jfe]\nports = [25]\n\n[jfe.certificates]\nallow = ["a.example"]\n'
    assert parse_section(text, "jfe", Example, subtables=("certificates",)) == Example(ports=(25,))
    assert parse_section(text, "jfe.certificates", Sub) == Sub(allow=("a.example",))
    with pytest.raises(ConfigError, match=r"unknown key 'jfe\.certificates'"):
        parse_section(text, "jfe", Example)
    with pytest.raises(ConfigError, match=r"x:5: unknown key 'jfe.certificates.alow'"):
        parse_section(text.replace("allow", "alow"), "jfe.certificates", Sub, "x")

"""``overflowd config check``: every mistake of a config at once, each with file:line and key."""

from __future__ import annotations

import json
from pathlib import Path

from overflowd.config import DEFAULT_CONFIG_TEXT
from tests.support.cli import call, run

#: Five mistakes of five kinds, and one in jfe's section (another program's, same file).
FIVE_MISTAKES = """\
[node]
contact = ["mailto:abuse@example.net"]
[collector]
queue_datagrams = "many"
listen = ["nowhere"]
[sampling]
rate = 5.0
[colector]
listen = ["127.0.0.1:2055"]
[jfe]
portz = 1
"""

EXPECTED = [
    (2, "unknown key 'node.contact'"),
    (4, "'collector.queue_datagrams' must be an integer"),
    (5, "'collector.listen' has 'nowhere', which is not ADDR:PORT"),
    (7, "'sampling.rate' must be in (0, 1]"),
    (8, "unknown section or key 'colector'"),
    (11, "unknown key 'jfe.portz'"),
]


def test_five_mistakes_are_each_named_with_file_and_line(tmp_path: Path) -> None:
    assert call("overflowd", "init", "--home", str(tmp_path)).code == 0
    config = tmp_path / "overflowd.toml"
    config.write_text(FIVE_MISTAKES)
    result = run("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 1, result.err
    lines = result.out.splitlines()
    assert lines[-1] == f"{config}: {len(EXPECTED)} problem(s)"
    assert len(lines) == len(EXPECTED) + 1, result.out
    for line, message in EXPECTED:
        assert any(o.startswith(f"{config}:{line}: ") and message in o for o in lines), (
            line, message, result.out,
        )
    # The daemon agrees: it refuses the same file, at the first of those lines.
    refused = call("overflowd", "run", "--home", str(tmp_path))
    assert refused.code == 1 and f"{config}:2: unknown key 'node.contact'" in refused.err


def test_json_and_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text(FIVE_MISTAKES)
    result = call("overflowd", "config", "check", "--file", str(other), "--json")
    assert result.code == 1
    doc = json.loads(result.out)
    assert doc["ok"] is False and doc["file"] == str(other)
    got = [(p["file"], p["line"]) for p in doc["problems"]]
    assert got == [(str(other), line) for line, _ in EXPECTED]


def test_the_default_config_and_no_config_pass(tmp_path: Path) -> None:
    result = call("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 0 and result.out.strip() == f"{tmp_path / 'overflowd.toml'}: ok"
    (tmp_path / "overflowd.toml").write_text(DEFAULT_CONFIG_TEXT)
    assert call("overflowd", "config", "check", "--home", str(tmp_path)).code == 0


def test_a_toml_syntax_error_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "overflowd.toml").write_text("[node]\ncontacts = [\n[api]\n")
    result = call("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 1 and "line 3" in result.out
    missing = call("overflowd", "config", "check", "--file", str(tmp_path / "nope.toml"))
    assert missing.code == 1 and "no such file" in missing.err


def test_a_cross_section_problem_is_found_too(tmp_path: Path) -> None:
    (tmp_path / "overflowd.toml").write_text(
        '[send]\nto_flow_addresses = true\n[inband]\nallowed_prefixes = ["192.0.2.0/24"]\n'
    )
    result = call("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 1 and ":4: 'inband.allowed_prefixes' is the old name" in result.out


def test_the_sandbox_section_is_checked_as_its_daemons_read_it(tmp_path: Path) -> None:
    """[sandbox] came with the seccomp allow-lists after config check was written: a typo there
    passed the check while every daemon then refused to start."""
    (tmp_path / "overflowd.toml").write_text('[sandbox]\nseccomp = true\nsecomp = "yes"\n')
    result = call("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 1 and ":3: unknown key 'sandbox.secomp'" in result.out, result.out


def test_a_deeply_nested_config_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    """tomllib recurses per nesting level: a config nested past the stack raised
    RecursionError out of config check (and of every daemon's start)."""
    assert call("overflowd", "init", "--home", str(tmp_path)).code == 0
    config = tmp_path / "overflowd.toml"
    config.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    result = call("overflowd", "config", "check", "--home", str(tmp_path))
    assert result.code == 1 and "nested too deeply" in result.out, (result.out, result.err)
    refused = call("overflowd", "run", "--home", str(tmp_path))
    assert refused.code == 1 and "nested too deeply" in refused.err, refused.err


def test_a_config_of_thousands_of_bad_keys_is_checked_in_bounded_work(tmp_path: Path) -> None:
    """Each bad key cost a rebuild of its section and a scan of the file for its line: 200,000
    unknown keys ran for minutes. The check stops after MAX_CHECK_PROBLEMS and says so."""
    from overflowd.config import MAX_CHECK_PROBLEMS

    config = tmp_path / "overflowd.toml"
    config.write_text("[node]\n" + "".join(f"k{i} = 1\n" for i in range(5000)))
    result = call("overflowd", "config", "check", "--home", str(tmp_path), timeout=30)
    assert result.code == 1
    lines = result.out.splitlines()
    assert len(lines) <= MAX_CHECK_PROBLEMS + 2, len(lines)
    assert f"{config}:2: unknown key 'node.k0'" in lines[0]
    assert any("stopped" in line for line in lines), lines[-3:]

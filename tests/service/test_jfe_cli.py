"""The ``jfe`` console script as a person meets it: one clear line and exit 1 for bad input,
exit 2 for usage, nothing created on failure."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import run


def test_bad_config_names_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "overflowd.toml").write_text("[jfe]\nports = [80]\nportz = 1\n")
    for argv in (("rules", "show"), ("run",), ("rules", "apply")):
        result = run("jfe", "--home", str(tmp_path), *argv)
        assert result.code == 1, result
        assert result.err.strip().count("\n") == 0 and "Traceback" not in result.err
        assert "overflowd.toml:3: unknown key 'jfe.portz'" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflowd.toml"]


def test_status_without_a_run_is_one_line(tmp_path: Path) -> None:
    result = run("jfe", "--home", str(tmp_path), "status")
    assert result.code == 1 and "no status (jfe has not run with this home)" in result.err


def test_usage_is_exit_2(tmp_path: Path) -> None:
    assert run("jfe", "--home", str(tmp_path), "bogus").code == 2
    assert run("jfe", "--home", str(tmp_path), "rules", "flush").code == 2


def test_rules_show_prints_the_plan(tmp_path: Path) -> None:
    (tmp_path / "overflowd.toml").write_text("[jfe]\nports = [25, 80]\nexcluded_ports = []\n")
    result = run("jfe", "--home", str(tmp_path), "rules", "show")
    assert result.code == 0, result.err
    assert "elements = { 25, 80 }" in result.out
    assert "tproxy ip to 127.0.0.1:8443" in result.out
    assert "# installed:" in result.out

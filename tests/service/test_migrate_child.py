"""Review of ``overflowd run``'s migration child (#16): it migrates whatever the home's path,
is not steered by the environment or the working directory, and wherever it stops the daemon's
own Store.open still brings the store to the schema."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from overflowd.cli import cmd_run
from overflowd.store import Store
from overflowd.store.base import default_url
from overflowd.store.repository import SCHEMA_HEAD


def revision(path: Path) -> list[tuple[str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


SHADOW = "open({marker!r}, 'w').write('imported'); raise SystemExit(3)\n"


@pytest.mark.parametrize(
    "name", ["with space", "quo'te\"s", "unic\u00f6de-\u2603", "at@colon:$HOME;`x`", "new\nline"]
)
def test_the_child_migrates_any_home_and_ignores_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # an `overflowd` (and a sitecustomize) where the environment and the working directory
    # point: the child must use the daemon's own modules
    marker = tmp_path / "shadow-imported"
    evil = tmp_path / "evil"
    (evil / "overflowd").mkdir(parents=True)
    (evil / "overflowd" / "__init__.py").write_text(SHADOW.format(marker=str(marker)))
    (evil / "sitecustomize.py").write_text(SHADOW.format(marker=str(marker)))
    (evil / "startup.py").write_text(SHADOW.format(marker=str(marker)))
    monkeypatch.setenv("PYTHONPATH", str(evil))
    monkeypatch.setenv("PYTHONSTARTUP", str(evil / "startup.py"))
    monkeypatch.setenv("PYTHONINSPECT", "1")
    monkeypatch.chdir(evil)
    home = tmp_path / name
    url = default_url(home)
    argvs: list[object] = []
    real = subprocess.run

    def spy(args: list[str], **kwargs: object) -> object:
        argvs.append(args)
        return real(args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", spy)
    cmd_run._migrate_apart(url)
    assert len(argvs) == 1 and "-I" in argvs[0]  # type: ignore[operator]
    assert not any(str(home) in str(a) for a in argvs[0])  # type: ignore[attr-defined]
    assert not marker.exists()
    assert revision(home / "overflowd.db") == [(SCHEMA_HEAD,)]  # by the child, not here


@pytest.mark.parametrize("after_s", [0.05, 0.3, 0.6, 0.9, 1.2, 1.6, 2.5])
def test_a_child_killed_at_any_moment_leaves_a_store_the_daemon_migrates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_s: float
) -> None:
    """The child is killed (its timeout) somewhere between its start and the end of the
    migration: the daemon's own Store.open then migrates, and the file is sound."""
    path = tmp_path / "home" / "overflowd.db"
    url = default_url(path.parent)
    ran = []
    real = subprocess.run

    def short(*args: object, **kwargs: object) -> object:
        kwargs["timeout"] = after_s
        try:
            return real(*args, **kwargs)  # type: ignore[call-overload]
        except subprocess.TimeoutExpired:
            ran.append("killed")
            raise

    monkeypatch.setattr(subprocess, "run", short)
    cmd_run._migrate_apart(url)
    if path.exists():
        assert revision(path) in ([], [(SCHEMA_HEAD,)])  # nothing half-done is committed
    with Store.open(url) as store:
        assert store.backend == "sqlite"
    assert revision(path) == [(SCHEMA_HEAD,)]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_a_child_that_fails_is_said_in_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a store the child cannot migrate (its directory is a file): the daemon would carry
    # Alembic after all, and the operator reads why instead of only a bigger RSS
    blocker = tmp_path / "home"
    blocker.write_text("not a directory")
    url = default_url(blocker)
    with caplog.at_level("WARNING", logger="overflowd.daemon"):
        cmd_run._migrate_apart(url)
    failed = [r for r in caplog.records if "store.migrate_child_failed" in r.getMessage()]
    assert len(failed) == 1, caplog.text
    assert "exit=1" in failed[0].getMessage()


def test_a_child_past_its_timeout_is_said_in_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cmd_run, "MIGRATE_TIMEOUT_S", 0.001)
    url = default_url(tmp_path / "home")
    with caplog.at_level("WARNING", logger="overflowd.daemon"):
        cmd_run._migrate_apart(url)
    failed = [r for r in caplog.records if "store.migrate_child_failed" in r.getMessage()]
    assert [r.getMessage() for r in failed] == ["store.migrate_child_failed error=TimeoutExpired"]

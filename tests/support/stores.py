"""SQLite stores for tests, at the schema head without running the migrations for each one.

Migrating a new SQLite file is a quarter of a second of Alembic; copying a file migrated once
is 10 ms, and a fixture per test made that a large part of the suite. The copy has the same
schema and rows a migration writes, and ``Store.open`` on it still checks the revision.
Tests about migrating itself open a URL of a file that does not exist yet, as before.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from overflowd.store import Store

_template: Path | None = None


def _migrated_template() -> Path:
    """One SQLite file migrated to the head in this process, closed: one file, no WAL left."""
    global _template
    if _template is None or not _template.exists():
        base = Path(tempfile.mkdtemp(prefix="overflowd-store-template-"))
        atexit.register(shutil.rmtree, base, True)
        path = base / "overflowd.db"
        Store.open(f"sqlite:///{path}").close()
        assert [p.name for p in base.iterdir()] == [path.name], "the template is one file"
        _template = path
    return _template


def sqlite_at_head(path: Path) -> str:
    """The ``sqlite:///`` URL of a new store at ``path`` (which must not exist yet), already
    at the schema head; its parent directory is created as ``Store.open`` would."""
    if path.exists():
        raise FileExistsError(f"{path}: a test store starts new")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_migrated_template(), path)
    return f"sqlite:///{path}"

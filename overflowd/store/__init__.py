"""The report store: its SQLAlchemy Core tables, the repository and its Alembic migrations.

Import from here; :mod:`overflowd.store.repository` is the one module that talks to the
database, and the only thing services need is :class:`Store`.

The names are imported when first used (PEP 562), not with the package: SQLAlchemy is a quarter
second of start-up, and ``overflowd-query reports`` on SQLite reads through
:mod:`overflowd.store.fastread` (stdlib ``sqlite3``) without it (issue #16).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from overflowd.store.base import default_url
    from overflowd.store.repository import (
        VIAS,
        ObserverRow,
        Store,
        StoredReport,
        StoreStatistics,
        address_to_key,
        key_to_address,
        network_range,
    )

__all__ = [
    "VIAS",
    "ObserverRow",
    "Store",
    "StoreStatistics",
    "StoredReport",
    "address_to_key",
    "default_url",
    "key_to_address",
    "network_range",
]


def __getattr__(name: str) -> Any:
    if name == "default_url":
        from overflowd.store.base import default_url

        return default_url
    if name in __all__:
        return getattr(importlib.import_module("overflowd.store.repository"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
